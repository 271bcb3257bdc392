"""Patching: how bytes are grouped into patches (paper section 2).

A patching function decides, for every byte, whether a new patch starts there. The global model runs once
per patch, so the average patch size sets the compute of the whole model (paper section 2.1).

Schemes (paper section 2.1-2.3):
  strided   a patch every k bytes (MEGABYTE)
  space     a patch starts after a space-like byte (SpaceByte)
  entropy   a patch starts where a small byte LM is unsure of the next byte:
              global rule      H(x_t) > theta_g                    (paper eq. 4, first rule)
              monotonic rule   H(x_t) - H(x_t-1) > theta_r         (paper eq. 4, second rule)
  any scheme can be followed by a maximum patch length, which splits long patches into chunks.

Index convention (the released code's; every function here follows it):
  * Token ids are bytes + 4 with BOS = 1 at position 0 (see `tokenize`).
  * Position 0 (BOS) and position 1 always start a patch, so BOS is a patch of its own. The local decoder's
    one-patch shift (decoder.py) relies on that: BOS must be able to read a complete patch.
  * H[j], the entropy computed AT position j, is the model's uncertainty about byte j+1, so it decides
    whether byte j+1 starts a patch. The released code (and this file) index it that way; the paper writes
    H(x_t) for the entropy of byte t itself, which is the same number shifted by one.
  * Next-byte slot: for T input positions we decide T+1 boundaries. Position T is the byte the model is
    about to predict; whether it starts a patch is decided by H[T-1], i.e. by the input alone. Patch
    lengths of a row therefore sum to T+1. The decoder uses the slot to know whether the last input byte
    closes its patch (the Hugging Face port omits the slot; its rows sum to T).

Worked example (also a test): entropies H = [3.0, .1, .1, 2.0, .1, .1, .1, 2.0] for T = 8 positions and
theta = 1.0.
    positions 0 and 1 start patches (always);
    H[3] = 2.0 > 1  -> position 4 starts a patch;
    H[7] = 2.0 > 1  -> position 8, the next-byte slot, starts a patch;
    H[0] = 3.0 > 1  -> position 1 (already a start).
  starts = [1,1,0,0,1,0,0,0,1]  ->  patch lengths [1, 3, 4, 1].

Incrementality (paper section 2.4): f(x_<i) = f(x)_<i. Every rule here looks only at the past, so patching a
prefix gives the prefix of the patching. The released code's fallback "take the top-k entropies of the
whole sequence" looks at the future and is deliberately absent.

Shapes: B = batch, T = input positions (bytes incl. BOS), P = patches (rows are right-padded with length 0).
"""
import torch

# The released models' byte ids: 4 special ids first, then the 256 bytes.
PAD_ID = 0  # also "beginning of example" in the released code
BOS_ID = 1
EOS_ID = 2
OFFSET = 4  # byte b has id b + 4
VOCAB_SIZE = 260


def tokenize(data: bytes, bos: bool = True, eos: bool = False) -> list[int]:
    """bytes -> ids: [BOS] + (byte + 4) (+ [EOS]). Any byte string is valid, not only UTF-8."""
    return ([BOS_ID] if bos else []) + [b + OFFSET for b in data] + ([EOS_ID] if eos else [])


def detokenize(ids) -> bytes:
    """ids -> bytes, dropping special ids (< 4)."""
    return bytes(int(i) - OFFSET for i in ids if int(i) >= OFFSET)


def _with_forced_starts(starts: torch.Tensor) -> torch.Tensor:
    """Positions 0 (BOS) and 1 always start a patch. starts: (B, T+1) bool."""
    starts = starts.clone()
    starts[:, :2] = True
    return starts


def strided_patch_starts(tokens: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Fixed-stride patches after the BOS patch: starts at 0, 1, 1+k, 1+2k, ...

    tokens: (B, T) ids. Returns starts: (B, T+1) bool (the last column is the next-byte slot).
    """
    B, T = tokens.shape
    pos = torch.arange(T + 1, device=tokens.device)
    starts = ((pos - 1) % patch_size == 0).expand(B, T + 1)
    return _with_forced_starts(starts)


def is_space_like(tokens: torch.Tensor) -> torch.Tensor:
    """Space-like bytes (SpaceByte's rule, as in the released code; paper section 2.2): not an ASCII letter, not an ASCII digit, and not a UTF-8
    continuation byte (0x80-0xBF). So spaces, punctuation, control bytes and UTF-8 lead bytes are space-like.
    Special ids (BOS, EOS, pad) count as space-like: they are boundaries too."""
    b = tokens - OFFSET
    letter = ((b >= ord("a")) & (b <= ord("z"))) | ((b >= ord("A")) & (b <= ord("Z")))
    digit = (b >= ord("0")) & (b <= ord("9"))
    continuation = (b >= 0x80) & (b <= 0xBF)
    return ~(letter | digit | continuation)


def space_patch_starts(tokens: torch.Tensor) -> torch.Tensor:
    """Space patching: a patch ends with a space-like byte that follows a non-space-like byte.

    Byte t starts a patch if byte t-1 is space-like and byte t-2 is not. A run of space-like bytes therefore
    counts once, and every patch (after the first) holds at least one non-space-like byte (paper footnote 2).
    Example: "Hi there, you." -> [BOS] | "Hi " | "there," | " you." (the slot after "." starts a patch).

    tokens: (B, T). Returns starts: (B, T+1) bool.
    """
    # --- solution: lesson 2: space patching: starts after a space-like byte (paper §2.2) ---
    B, T = tokens.shape
    space = is_space_like(tokens)  # (B, T)
    starts = torch.zeros(B, T + 1, dtype=torch.bool, device=tokens.device)
    # starts[:, t] for t >= 2 looks at bytes t-1 and t-2 only (incremental).
    starts[:, 2:] = space[:, 1:] & ~space[:, :-1]
    return _with_forced_starts(starts)
    # --- end solution ---


def entropy_patch_starts(entropies: torch.Tensor, threshold: float, monotonic: bool = False) -> torch.Tensor:
    """Entropy patching with the released index convention (H[j] decides whether byte j+1 starts a patch).

    global rule:    byte j+1 starts a patch if H[j] > threshold
    monotonic rule: byte j+1 starts a patch if H[j] - H[j-1] > threshold   (the approximate monotonic
                    constraint of paper eq. 4: a patch starts where entropy stops decreasing)

    entropies: (B, T) next-byte entropies in nats. Returns starts: (B, T+1) bool.
    """
    # --- solution: lesson 2: global and monotonic entropy rules (paper §2.3, eq. 4) ---
    B, T = entropies.shape
    starts = torch.zeros(B, T + 1, dtype=torch.bool, device=entropies.device)
    if monotonic:
        starts[:, 2:] = (entropies[:, 1:] - entropies[:, :-1]) > threshold
    else:
        starts[:, 1:] = entropies > threshold
    return _with_forced_starts(starts)
    # --- end solution ---


def limit_patch_length(starts: torch.Tensor, max_patch_length: int | None) -> torch.Tensor:
    """Split patches longer than max_patch_length into chunks of that length (counted from each patch's
    start, so the rule stays incremental). starts: (B, N) bool -> (B, N) bool."""
    # --- solution: lesson 2: split patches longer than max_patch_length (paper §2.4, incremental) ---
    if max_patch_length is None:
        return starts
    B, N = starts.shape
    pos = torch.arange(N, device=starts.device).expand(B, N)
    # position of the latest patch start at or before each position: a running max
    last_start = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values
    return starts | (((pos - last_start) % max_patch_length == 0) & (pos > last_start))
    # --- end solution ---


def lengths_from_starts(starts: torch.Tensor) -> torch.Tensor:
    """Boolean starts (B, N) -> patch lengths (B, P), right-padded with 0, P = max patches in a row.

    Example: starts [1,1,0,0,1,0,0,0,1] -> lengths [1, 3, 4, 1].
    """
    # --- solution: lesson 2: patch starts to right-padded patch lengths (paper §2) ---
    B, N = starts.shape
    patch_index = starts.long().cumsum(dim=1) - 1  # (B, N) index of the patch holding each position
    P = int(patch_index.max()) + 1
    lengths = torch.zeros(B, P, dtype=torch.long, device=starts.device)
    lengths.scatter_add_(1, patch_index, torch.ones_like(patch_index))
    return lengths
    # --- end solution ---


def patch_ids_from_lengths(patch_lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Patch lengths (B, P) -> patch id of each position (B, seq_len): the number of (non-empty) patches
    starting at or before the position, minus one.

    Example: lengths [1, 3, 4, 1], seq_len 8 -> [0, 1, 1, 1, 2, 2, 2, 2]. Positions past the end of the last
    patch stay in the last patch. Right-padding patches (length 0) never get a position.
    """
    starts = patch_lengths.cumsum(dim=1) - patch_lengths  # (B, P) first position of each patch
    starts = starts.masked_fill(patch_lengths == 0, torch.iinfo(starts.dtype).max)
    pos = torch.arange(seq_len, device=patch_lengths.device).expand(patch_lengths.shape[0], seq_len)
    return torch.searchsorted(starts.contiguous(), pos.contiguous(), right=True) - 1


def patch_starts(
    tokens: torch.Tensor,
    scheme: str,
    *,
    patch_size: int = 4,
    entropies: torch.Tensor | None = None,
    threshold: float | None = None,
    max_patch_length: int | None = None,
) -> torch.Tensor:
    """One entry point for every scheme. tokens: (B, T) ids (BOS first) -> starts (B, T+1) bool, the last
    column being the next-byte slot.

    scheme: "strided" (uses patch_size), "space", "entropy" or "monotonic" (use entropies and threshold).
    """
    if scheme == "strided":
        starts = strided_patch_starts(tokens, patch_size)
    elif scheme == "space":
        starts = space_patch_starts(tokens)
    elif scheme in ("entropy", "monotonic"):
        if entropies is None or threshold is None:
            raise ValueError(f"{scheme} patching needs entropies and a threshold")
        starts = entropy_patch_starts(entropies, threshold, monotonic=scheme == "monotonic")
    else:
        raise ValueError(f"unknown patching scheme {scheme!r} (strided, space, entropy, monotonic)")
    return limit_patch_length(starts, max_patch_length)


def patch_lengths(tokens: torch.Tensor, scheme: str, **kwargs) -> torch.Tensor:
    """`patch_starts` as lengths (B, P) that sum to T+1 per row (the next-byte slot), right-padded with 0."""
    return lengths_from_starts(patch_starts(tokens, scheme, **kwargs))


def average_patch_size(patch_lengths: torch.Tensor) -> float:
    """Positions per global-model step: sum of lengths / number of (non-empty) patches, over the batch.
    On windows of hundreds of bytes the BOS patch and the next-byte slot change this by well under 1%."""
    return float(patch_lengths.sum()) / float((patch_lengths > 0).sum())


def calibrate_threshold(
    entropies: torch.Tensor,
    target_patch_size: float,
    monotonic: bool = False,
    max_patch_length: int | None = None,
    iters: int = 50,
) -> float:
    """Find theta whose average patch size on these entropies hits target_patch_size (bisection).

    Thresholds do not transfer between entropy models or corpora (a threshold belongs to one entropy model
    on one kind of text, paper section 2.3), so calibrate on the training split. Larger theta -> fewer starts -> larger patches, so the average patch size is monotone
    non-decreasing in theta and bisection applies.

    entropies: (B, T) entropies from the frozen entropy model on sample windows of the training split.
    """
    def size_at(theta: float) -> float:
        starts = limit_patch_length(entropy_patch_starts(entropies, theta, monotonic), max_patch_length)
        lengths = lengths_from_starts(starts)
        return average_patch_size(lengths)

    diffs = entropies[:, 1:] - entropies[:, :-1]
    values = diffs if monotonic else entropies
    lo, hi = float(values.min()) - 1.0, float(values.max()) + 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if size_at(mid) < target_patch_size:
            lo = mid
        else:
            hi = mid
    # return the end of the bracket whose size is closer to the target
    return hi if abs(size_at(hi) - target_patch_size) <= abs(size_at(lo) - target_patch_size) else lo

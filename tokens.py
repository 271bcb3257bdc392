"""The BPE baseline: a byte-level BPE tokenizer, a token-level transformer, and their bits and FLOPs per byte.

The paper's title claim, "patches scale better than tokens", compares BLT with BPE-token transformers
(Llama 2 and Llama 3 tokenizers, paper section 5) at matched compute. The comparison is only fair if both
sides are measured in the same units:
  * quality in bits per byte on the same validation bytes (paper section 4.6): a token model's summed
    next-token cross-entropy, divided by ln 2 and by the number of BYTES those tokens spell;
  * compute in FLOPs per byte (paper section 4.5): a token model runs once per token, so its FLOPs per byte
    are its FLOPs per token divided by the average number of bytes per token -- the same role the average
    patch size plays for BLT's global model (blt.flops_per_byte).

Tokenizer (`ByteBPE`, `train_bpe`, `cached_bpe`). A byte-level BPE trained with the Hugging Face
`tokenizers` package on the training split only. Its input is text, so bytes are mapped to text losslessly:
byte b becomes the character chr(b) (a latin-1 decode), and all 256 such characters are in the initial
alphabet. Any byte string -- random bytes, invalid UTF-8 -- therefore encodes, and decodes back exactly
(decode = concatenate the tokens' characters and encode them as latin-1). Before merging, text is split into
pieces by GPT-2's regex (words with their leading space, numbers, punctuation runs, whitespace runs); merges
never cross a piece. Ids: 0 = BOS ("<bos>", never produced by encoding text, even text that spells
"<bos>"), 1..256 = the single bytes 0..255, then one id per merge in the order it was learned.

Model (`TokenLMConfig`, `TokenLM`). The same Llama-style stack as the rest of the project (layers.py), one
step per token, with vocab_size outputs.

Data and evaluation (`TokenSplit`, `tokenize_split`, `get_token_batch`, `eval_token_windows`,
`evaluate_bpb`). A split is encoded once into the stream [BOS, t_1, ..., t_N]; training samples random
windows of it and evaluation tiles it so that every token t_1..t_N is predicted exactly once.

What train.py needs (`TokenSetup`, `prepare_tokens`): the tokenizer, the window length in tokens that spans
as many bytes as the byte models' windows (T_tok = round(seq_len / bytes per token of the training split)),
and the encoded training split (cached beside the tokenizer). A checkpoint stores the tokenizer's JSON, so
it rebuilds the whole token model alone (checkpoint.load_checkpoint).

Shapes: B = batch, T = tokens per window (= input positions), V = vocab_size, D = width, N = tokens in a split.
"""
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

from blt import bits_per_byte, init_weights, transformer_flops
from data import DATA_DIR
from entropy_model import check, check_transformer, whole
from layers import RMSNorm, TransformerBlock, causal_mask, rope_cos_sin, swiglu_hidden_dim

# ---- the tokenizer ----

BOS = "<bos>"
N_BYTES = 256
MIN_VOCAB_SIZE = N_BYTES + 1  # the 256 single bytes + BOS: a vocabulary with no merges at all
# GPT-2's pre-tokenization regex, applied to the latin-1 text (so \p{L} also matches the bytes 0xC0-0xFF etc.)
PIECE_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
MIN_FREQUENCY = 2  # a pair seen once is not merged: on a tiny text the vocabulary may stay below the request
CHUNK_BYTES = 1 << 16  # texts are handed to `tokenizers` in pieces of about this size (parallel, low memory)
# A safe place to cut a text: after a newline that has a printable, non-space ASCII byte on both sides.
# There the regex above always ends one piece and starts the next (a newline between two such bytes is a
# piece of its own), so encoding or counting the chunks separately gives exactly what the whole text gives.
# (A newline after a space is not safe: at the end of a chunk, "\s+(?!\S)" would take " \n" as one piece.)
_SAFE_CUT = re.compile(rb"(?<=[!-~])\n(?=[!-~])")


def _as_bytes(data) -> bytes:
    """bytes, bytearray or a uint8 numpy array (a memmap split) -> bytes."""
    return data.tobytes() if isinstance(data, np.ndarray) else bytes(data)


def _text_chunks(data: bytes, chunk_bytes: int) -> list[str]:
    """Bytes -> latin-1 texts of about chunk_bytes each, cut only at safe places (see _SAFE_CUT)."""
    cuts = [0]
    while cuts[-1] + chunk_bytes < len(data):
        m = _SAFE_CUT.search(data, cuts[-1] + chunk_bytes)
        if m is None:
            break
        cuts.append(m.end())
    cuts.append(len(data))
    return [data[a:b].decode("latin-1") for a, b in zip(cuts, cuts[1:]) if b > a]


def check_vocab_size(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"BPE vocab_size must be an integer >= {MIN_VOCAB_SIZE} (256 single bytes + BOS), "
                         f"got {vocab_size!r}")


class ByteBPE:
    """A trained byte-level BPE: bytes <-> token ids. Wraps a `tokenizers.Tokenizer`.

    vocab_size: the number of ids the model needs (BOS included); at most the size asked for in training.
    bos_id: 0. token_bytes[i]: the bytes token i stands for (b"" for BOS).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        # Text that happens to spell "<bos>" must stay text: special tokens are not matched in the input.
        self.tokenizer.encode_special_tokens = True
        self.bos_id = tokenizer.token_to_id(BOS)
        assert self.bos_id == 0, "the BOS token must have id 0"
        self.vocab_size = tokenizer.get_vocab_size()
        self.token_bytes = [b"" if i == self.bos_id else tokenizer.id_to_token(i).encode("latin-1")
                            for i in range(self.vocab_size)]

    def encode(self, data) -> np.ndarray:
        """Bytes (or a uint8 array) -> (N,) int32 token ids, without BOS. decode(encode(x)) == x for any x."""
        chunks = _text_chunks(_as_bytes(data), CHUNK_BYTES)
        encode_batch = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        parts = [np.asarray(e.ids, dtype=np.int32) for e in encode_batch(chunks, add_special_tokens=False)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)

    def decode(self, ids) -> bytes:
        """Token ids -> bytes; BOS decodes to nothing."""
        return b"".join(self.token_bytes[int(i)] for i in ids)

    def save(self, path) -> None:
        self.tokenizer.save(str(path))

    @classmethod
    def load(cls, path) -> "ByteBPE":
        return cls(Tokenizer.from_file(str(path)))

    @classmethod
    def from_str(cls, text: str) -> "ByteBPE":
        return cls(Tokenizer.from_str(text))

    def to_str(self) -> str:
        """The whole tokenizer (vocabulary, merges, settings) as the JSON text that save() writes."""
        return self.tokenizer.to_str()


def train_bpe(train_data, vocab_size: int) -> ByteBPE:
    """Train a byte-level BPE of (at most) vocab_size ids on train_data (bytes or a uint8 array).

    Deterministic: the same bytes and vocab_size give the same merges and ids (the trainer breaks ties
    between equally frequent pairs by the pairs themselves, not by hash order).
    """
    check_vocab_size(vocab_size)
    tokenizer = Tokenizer(models.BPE())  # no unk token needed: every byte is in the alphabet
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE_PATTERN), behavior="isolated")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=MIN_FREQUENCY, show_progress=False,
                                  special_tokens=[BOS], initial_alphabet=[chr(b) for b in range(N_BYTES)])
    tokenizer.train_from_iterator(_text_chunks(_as_bytes(train_data), CHUNK_BYTES), trainer)
    return ByteBPE(tokenizer)


def tokenizer_cache_path(train_data, vocab_size: int, cache_dir) -> Path:
    """cache_dir/bpe-<vocab_size>-<digest>.json; the digest covers the training bytes and the settings
    above, so a different corpus, split or recipe never picks up a stale tokenizer."""
    h = hashlib.sha256(json.dumps([PIECE_PATTERN, MIN_FREQUENCY, BOS]).encode())
    h.update(memoryview(np.ascontiguousarray(np.frombuffer(_as_bytes(train_data), dtype=np.uint8))))
    return Path(cache_dir) / f"bpe-{vocab_size}-{h.hexdigest()[:16]}.json"


def cached_bpe(train_data, vocab_size: int, cache_dir) -> ByteBPE:
    """Load the tokenizer for (train_data, vocab_size) from cache_dir, or train and save it there.

    cache_dir: put it beside the prepared corpus (e.g. data.DATA_DIR / "tokenizers", or the corpus folder).
    The file is written atomically, so an interrupted run leaves no half-written tokenizer.
    """
    check_vocab_size(vocab_size)
    path = tokenizer_cache_path(train_data, vocab_size, cache_dir)
    if path.exists():
        return ByteBPE.load(path)
    tok = train_bpe(train_data, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        tok.save(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache beside the corpus is for every user
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return tok


def bytes_per_token(tok: ByteBPE, data) -> float:
    """Average bytes per token of `data` (the token model's counterpart of BLT's average patch size)."""
    n_bytes = len(_as_bytes(data))
    return n_bytes / max(1, len(tok.encode(data)))


# ---- the token-level transformer ----

@dataclass
class TokenLMConfig:
    vocab_size: int = 4096  # must equal the tokenizer's vocab_size (ByteBPE.vocab_size)
    dim: int = 256
    layers: int = 4
    heads: int = 4
    window: int | None = None  # sliding attention window in tokens; None = full causal attention
    rope_theta: float = 500000.0  # as BLT's global model
    multiple_of: int = 256  # SwiGLU hidden width rounding (Llama convention)
    norm_eps: float = 1e-5
    dropout: float = 0.0  # training only, on every residual branch

    def __post_init__(self):
        check(self, "vocab_size", whole(self.vocab_size, MIN_VOCAB_SIZE), f"must be a whole number >= {MIN_VOCAB_SIZE}")
        check_transformer(self)

    def build(self) -> "TokenLM":
        return TokenLM(self)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TokenLMConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"config has unknown fields {sorted(unknown)}")
        return cls(**d)


class TokenLM(nn.Module):
    """Causal Llama-style token LM (the pattern of entropy_model.EntropyModel, with V = cfg.vocab_size).

    forward(tokens (B, T)) -> logits (B, T, V); with targets (B, T) (-1 = ignore) also the mean cross-entropy
    in nats per predicted token."""

    def __init__(self, cfg: TokenLMConfig):
        super().__init__()
        self.cfg, self.head_dim = cfg, cfg.dim // cfg.heads
        self.rope_theta, self.window = cfg.rope_theta, cfg.window  # as EntropyModel's: incremental.CachedByteLM reads them
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        hidden = swiglu_hidden_dim(cfg.dim, cfg.multiple_of)
        self.layers = nn.ModuleList(TransformerBlock(cfg.dim, cfg.heads, hidden, cfg.norm_eps, cfg.dropout)
                                    for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.apply(init_weights)
        self.tokens: TokenSetup | None = None  # set by checkpoint.load_checkpoint: tokenizer and window length

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = tokens.shape
        pos = torch.arange(T, device=tokens.device)  # (T,)
        cos, sin = rope_cos_sin(pos, self.head_dim, self.cfg.rope_theta)  # (T, Dh)
        mask = causal_mask(pos, pos, self.cfg.window)  # (1, 1, T, T)
        h = self.tok_embeddings(tokens)  # (B, T, D)
        for layer in self.layers:
            h = layer(h, mask, cos, sin)
        logits = self.output(self.norm(h))  # (B, T, V)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)
        return logits, loss


# ---- tokenized splits: training batches and bits per byte ----

@dataclass
class TokenSplit:
    """A split encoded once. ids: (N + 1,) int32, the stream [BOS, t_1, ..., t_N]; n_bytes: the number of
    bytes t_1..t_N spell, i.e. the length of the byte split itself."""
    ids: np.ndarray
    n_bytes: int

    @property
    def n_tokens(self) -> int:  # N: the tokens to predict (BOS is never a target)
        return len(self.ids) - 1


def tokenize_split(tok: ByteBPE, data) -> TokenSplit:
    """Bytes (a train or validation split, or a prefix of one) -> TokenSplit."""
    ids = np.concatenate([np.array([tok.bos_id], dtype=np.int32), tok.encode(data)])
    return TokenSplit(ids, len(_as_bytes(data)))


def get_token_batch(split: TokenSplit, batch_size: int, seq_len: int, seed: int, index: int,
                    rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch number `index` of a run: B random windows of T + 1 consecutive ids -> inputs (B, T), targets
    (B, T), targets = inputs shifted by one. Seeded by (seed, index) like data.get_batch, so a resumed run
    sees the same batches; `rows` takes a distributed rank's share. A window that starts at 0 begins with
    BOS, as the first evaluation window does."""
    if len(split.ids) < seq_len + 1:
        raise ValueError(f"the split has {split.n_tokens:,} tokens; a window needs seq_len + 1 = {seq_len + 1} ids")
    rng = np.random.default_rng([seed, index])
    starts = rng.integers(0, len(split.ids) - seq_len, size=batch_size)[rows]
    windows = torch.from_numpy(np.stack([split.ids[s : s + seq_len + 1] for s in starts]).astype(np.int64))
    return windows[:, :-1], windows[:, 1:]  # (B, T), (B, T)


def eval_token_windows(split: TokenSplit, seq_len: int, batch_size: int):
    """Yield (inputs, targets) batches that predict every token t_1..t_N of the split exactly once.

    The stream s = [BOS, t_1, ..., t_N] is cut into consecutive windows of T = seq_len TARGETS:
        window w: inputs s[wT : wT + T], targets s[wT + 1 : wT + T + 1]
    so window 0 starts with BOS and predicts t_1 from BOS alone; window w > 0 starts with t_wT, the last
    target of window w - 1 (as input only), and predicts t_(wT+1) .. t_(wT+T). Consecutive windows share one
    id, the input/target hand-over, and no target: the targets of all windows are t_1..t_N, each once, in
    order. The last window may be shorter (it comes in a batch of its own). Summing the cross-entropies and
    dividing by ln 2 and by the split's byte count (evaluate_bpb) pays for every byte exactly once, because
    the tokens t_1..t_N spell exactly the bytes of the split. (data.eval_windows differs in one detail: every
    byte window restarts from BOS. Either way each unit is predicted once.)
    """
    T, s = seq_len, split.ids
    full = split.n_tokens // T
    if full:
        windows = np.lib.stride_tricks.sliding_window_view(s, T + 1)[::T][:full]  # (full, T + 1): starts 0, T, 2T, ...
        for first in range(0, full, batch_size):
            ids = torch.from_numpy(windows[first : first + batch_size].astype(np.int64))
            yield ids[:, :-1], ids[:, 1:]
    if split.n_tokens % T:
        ids = torch.from_numpy(s[full * T :].astype(np.int64))[None]  # (1, N % T + 1)
        yield ids[:, :-1], ids[:, 1:]


@torch.no_grad()
def evaluate_bpb(model: nn.Module, split: TokenSplit, seq_len: int, batch_size: int,
                 device: str | torch.device = "cpu") -> dict:
    """Bits per byte of a token model on a split (paper section 4.6):
        bpb = sum over t_1..t_N of -ln p(t_i | window context) / (ln 2 * n_bytes)
    model(inputs (B, T)) must return logits (B, T, V). Returns {"bpb", "nats", "tokens", "bytes"}."""
    was_training = model.training
    model.eval()
    nats, predicted = 0.0, 0
    for inputs, targets in eval_token_windows(split, seq_len, batch_size):
        logits = model(inputs.to(device))  # (B, T, V)
        losses = F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten(), reduction="none")
        nats += losses.double().sum().item()  # float64 sum: a float32 one drifts over ~10^6 tokens
        predicted += targets.numel()
    model.train(was_training)
    assert predicted == split.n_tokens, f"{predicted} targets for {split.n_tokens} tokens"
    return {"bpb": bits_per_byte(nats, split.n_bytes), "nats": nats, "tokens": predicted, "bytes": split.n_bytes}


# ---- FLOPs per byte (paper section 4.5) ----

def token_flops_per_byte(cfg: TokenLMConfig, bytes_per_token: float, seq_len: int) -> dict:
    """Forward and training FLOPs per byte of a token model, with blt.flops_per_byte's accounting:

        FL_token = Transf(h, l, m = context, V) / bytes_per_token     (paper eq. 14, once per token)

    seq_len is in TOKENS; the attention context m is min(window, seq_len), the full window per query as for
    every model (blt.py states the convention). Training = 3 x forward
    (backward = 2 x forward). Embedding lookups are free."""
    context = min(cfg.window or seq_len, seq_len)
    per_token = transformer_flops(cfg.dim, cfg.layers, context, cfg.vocab_size,
                                  swiglu_hidden_dim(cfg.dim, cfg.multiple_of))
    forward = per_token / bytes_per_token
    return {"forward_per_token": per_token, "forward_total": forward, "train_total": 3 * forward}


# ---- what train.py needs: tokenizer, window length in tokens, encoded training split ----

TOKENIZER_DIR = DATA_DIR / "tokenizers"  # beside the prepared corpora; files are keyed by the training bytes


@dataclass
class TokenSetup:
    """A token model's tokenizer and windows. seq_len: T_tok, tokens per window; train: the encoded training
    split (None when only evaluating); train_bytes_per_token: its bytes / tokens."""
    tokenizer: ByteBPE
    seq_len: int
    train_bytes_per_token: float
    train: TokenSplit | None = None

    def __post_init__(self):
        self._last = (None, None, None)  # (data, max_bytes, TokenSplit): periodic evaluations reuse one prefix

    @property
    def bytes_per_window(self) -> float:
        """Bytes a training window of T_tok tokens spans, on average (the byte models': seq_len)."""
        return self.seq_len * self.train_bytes_per_token

    def split(self, data, max_bytes: int | None = None) -> TokenSplit:
        """data[:max_bytes] encoded: exactly the bytes a byte model evaluated with the same max_bytes predicts."""
        if self._last[0] is not data or self._last[1] != max_bytes:
            self._last = (data, max_bytes, tokenize_split(self.tokenizer, data[:max_bytes]))
        return self._last[2]

    def saved(self) -> dict:
        """What a checkpoint stores: the tokenizer itself, and ("tokens") what a resumed run must share."""
        text = self.tokenizer.to_str()
        return {"tokenizer": text, "tokens": {"seq_len": self.seq_len, "train_bytes_per_token": self.train_bytes_per_token,
                                              "tokenizer_sha256": hashlib.sha256(text.encode()).hexdigest()[:16]}}

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "TokenSetup":
        return cls(ByteBPE.from_str(ckpt["tokenizer"]), ckpt["tokens"]["seq_len"], ckpt["tokens"]["train_bytes_per_token"])


def prepare_tokens(train_data, vocab_size: int, seq_len_bytes: int, cache_dir=None) -> TokenSetup:
    """Tokenizer for (train_data, vocab_size) (trained once, cached), the encoded training split (cached
    beside it: encoding a few MB takes seconds), and T_tok = round(seq_len_bytes / bytes per token)."""
    path = tokenizer_cache_path(train_data, vocab_size, cache_dir or TOKENIZER_DIR)
    tok = cached_bpe(train_data, vocab_size, path.parent)
    ids_path = path.with_suffix(".train.npy")
    if ids_path.exists():
        split = TokenSplit(np.load(ids_path), len(train_data))
    else:
        split = tokenize_split(tok, train_data)
        tmp = ids_path.with_name(f".{ids_path.name}.{os.getpid()}.npy")
        np.save(tmp, split.ids)
        os.replace(tmp, ids_path)
    bpt = split.n_bytes / max(1, split.n_tokens)
    return TokenSetup(tok, max(1, round(seq_len_bytes / bpt)), bpt, split)


if __name__ == "__main__":
    # python tokens.py [corpus] [vocab sizes ...]: bytes per token of the validation split, trained on train.
    from data import DataError, load_corpus
    args = sys.argv[1:]
    spec = args[0] if args else "shakespeare"
    sizes = [int(a) for a in args[1:]] or [512, 1024, 2048, 4096]
    try:
        corpus = load_corpus(spec)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(corpus.describe())
    print(f"{'vocab':>6} {'vocab used':>10} {'train s':>8} {'bytes/token train':>18} {'bytes/token val':>16}")
    for v in sizes:
        t0 = time.perf_counter()
        tok = train_bpe(corpus.train, v)
        seconds = time.perf_counter() - t0
        print(f"{v:>6} {tok.vocab_size:>10} {seconds:>8.2f} {bytes_per_token(tok, corpus.train):>18.3f} "
              f"{bytes_per_token(tok, corpus.val):>16.3f}")

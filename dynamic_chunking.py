"""Learned boundaries: H-Net's dynamic chunking, one stage (Hwang, Wang, Gu, "Dynamic Chunking for End-to-End
Hierarchical Sequence Modeling", arXiv 2507.07955, section 2.2).

BLT cuts bytes where a separately trained entropy model is unsure (patching.py). H-Net learns where to cut,
end to end, from the next-byte loss alone plus a ratio loss that sets how many cuts. Four pieces, each a
function or module below:

  router       (section 2.2.1, eq. 4)  q_t = W_q x_t, k_t = W_k x_t (no bias; identity at initialisation, as
               released);  p_t = 1/2 (1 - cos(q_{t-1}, k_t)) clamped to [0, 1], p_0 = 1 (and 1 at every BOS);
               b_t = [p_t > 1/2] says whether byte t starts a chunk. Two neighbouring encoder states that
               point in different directions make a boundary.
  selection    (section 2.2.1, downsampling) the chunk vectors are the encoder states at the boundaries, in
               order: chunk j is the bytes s_j .. s_{j+1} - 1 and its vector is the state of its first byte.
  smoothing    (section 2.2.2, eq. 5) an exponential moving average over the chunk outputs z_j of the main
               (global) network:  zbar_j = P_j z_j + (1 - P_j) zbar_{j-1},  P_j = p_{s_j} clamped to
               [1e-4, 1 - 1e-4]. A confident boundary keeps its own output; an unsure one blends in the
               previous chunk's, which gives the discrete choice a gradient (the release uses a Mamba-2 scan
               kernel; here a loop and a closed form, which the tests hold equal).
  upsampling   (section 2.2.2, eqs. 6-9) byte t takes zbar of the chunk it belongs to, times its confidence
               c_t = max(p_t, 1 - p_t) through a straight-through estimator (forward value exactly 1, gradient
               as if c_t), so the router also learns from every byte's next-byte loss.
  ratio loss   (section 2.3.3, eq. 10) F = mean b_t (no gradient), G = mean p_t, over real bytes;
               L_ratio = N / (N - 1) * ((N - 1) F G + (1 - F)(1 - G)), minimal (value 1) at F = G = 1/N:
               about one byte in N starts a chunk. Training minimises L_AR + alpha L_ratio, alpha = 0.03.

Causality in this project's conventions (BOS at position 0; position t's output predicts byte t+1; the
encoder is causal, so x_t = encoder state of byte t has seen bytes 0..t):
  * p_t reads x_{t-1} and x_t, so b_t is known once byte t has arrived: bytes 0..t decide the chunks
    that cover positions 0..t.
  * chunk j's vector is x_{s_j}, and the global network is causal over chunks, so z_j has seen bytes
    0..s_j; zbar_j mixes z_0..z_j and P_0..P_j, so it too has seen bytes 0..s_j, nothing later.
  * byte t reads zbar_j of its own chunk j (s_j <= t < s_{j+1}): it has seen bytes 0..s_j, s_j <= t.
So, unlike BLT's patches (decoder.py), no one-chunk shift is needed: a chunk is represented by its FIRST
byte, which every byte of the chunk follows, where BLT's patch representation pools ALL its bytes and may be
read only once complete. What is forbidden is reading a later chunk: byte t must never read zbar_{j+1}, not
even when byte t+1 (the byte it predicts) starts chunk j+1 - that chunk's vector is the encoder state of the
target itself. tests/test_learned.py perturbs every byte and checks that no earlier output moves, and that
the check fails for exactly that mistake.

Where this file departs from the release: one stage, transformers instead of Mamba-2 layers around it (the
project's local encoder and decoder), and the smoothing as a loop or a closed form instead of the scan kernel.

Shapes: B = batch, T = bytes (incl. BOS), P = chunks (rows right-padded to the longest), D = width.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from patching import BOS_ID

SMOOTHING_EPS = 1e-4  # P_j is clamped to [eps, 1 - eps] in the smoothing (as released)


class Router(nn.Module):
    """Boundary probabilities from adjacent encoder states (H-Net section 2.2.1, eq. 4)."""

    def __init__(self, dim: int):
        super().__init__()
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        """Identity, as released: at first p_t compares the two encoder states themselves."""
        with torch.no_grad():
            self.wq.weight.copy_(torch.eye(self.wq.weight.shape[0]))
            self.wk.weight.copy_(torch.eye(self.wk.weight.shape[0]))

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D) encoder states, tokens: (B, T) ids -> p: (B, T) float32 in [0, 1], p = 1 at BOS."""
        q, k = self.wq(x[:, :-1]).float(), self.wk(x[:, 1:]).float()  # (B, T-1, D): q_{t-1}, k_t
        cos = F.cosine_similarity(q, k, dim=-1)  # (B, T-1)
        p = torch.clamp(0.5 * (1 - cos), 0.0, 1.0)
        p = F.pad(p, (1, 0), value=1.0)  # p_0 = 1: the first byte always starts a chunk
        return p.masked_fill(tokens == BOS_ID, 1.0)  # and so does every document start

    def step(self, x_prev: torch.Tensor | None, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """p_t of one new position: x_prev, x (B, D) encoder states at t-1 and t (x_prev None at t = 0),
        token (B,) -> (B,) float32. What forward computes at position t (generation, sample.py)."""
        if x_prev is None:
            return torch.ones(x.shape[0], device=x.device)
        cos = F.cosine_similarity(self.wq(x_prev).float(), self.wk(x).float(), dim=-1)
        return torch.clamp(0.5 * (1 - cos), 0.0, 1.0).masked_fill(token == BOS_ID, 1.0)


def boundaries(p: torch.Tensor) -> torch.Tensor:
    """b_t = [p_t > 1/2]: (B, T) -> (B, T) bool."""
    return p > 0.5


def chunk_ids(b: torch.Tensor) -> torch.Tensor:
    """The chunk each byte belongs to: the number of boundaries up to and including it, minus one.
    Example: b = [1, 0, 0, 1, 0, 1] -> [0, 0, 0, 1, 1, 2]. (B, T) bool -> (B, T) int64."""
    return b.long().cumsum(dim=1) - 1


def select(x: torch.Tensor, b: torch.Tensor, pad_to: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Downsampling by selection (section 2.2.1): the states at the boundaries, in order.

    x: (B, T, D), b: (B, T) bool with b[:, 0] True. Returns chunks (B, P, D), starts (B, P) int64 (the
    position of each chunk's first byte) and real (B, P) bool (False for the padding after a row's last
    chunk; padded chunks repeat position 0 and come after every real one, so a causal model never lets a
    real chunk see them). P is the most chunks in any row, rounded up to a multiple of pad_to (a bounded
    set of shapes for torch.compile).
    Example: b = [1, 0, 0, 1, 0, 1] -> starts [0, 3, 5].
    """
    B, T, D = x.shape
    counts = b.sum(dim=1)  # (B,)
    P = int(counts.max())
    P = -(-P // pad_to) * pad_to
    ids = torch.where(b, chunk_ids(b), P)  # (B, T): non-boundaries go to a spare column P, dropped below
    positions = torch.arange(T, device=x.device).expand(B, T)
    starts = x.new_zeros(B, P + 1, dtype=torch.long).scatter_(1, ids, positions)[:, :P]  # (B, P)
    chunks = x.gather(1, starts[..., None].expand(B, P, D))  # (B, P, D)
    real = torch.arange(P, device=x.device) < counts[:, None]  # (B, P)
    return chunks, starts, real


def smooth_loop(z: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """The definition (section 2.2.2, eq. 5): zbar_j = P_j z_j + (1 - P_j) zbar_{j-1}, zbar_{-1} = 0.
    z: (B, P, D), P: (B, P) already clamped -> (B, P, D). One chunk at a time: the reference."""
    out, prev = [], torch.zeros_like(z[:, 0])
    for j in range(z.shape[1]):
        prev = P[:, j, None] * z[:, j] + (1 - P[:, j, None]) * prev
        out.append(prev)
    return torch.stack(out, dim=1)


def smooth(z: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """smooth_loop in closed form: unrolling the recurrence,

        zbar_j = sum_{i <= j} w_{j,i} z_i,    w_{j,i} = P_i * prod_{m = i+1 .. j} (1 - P_m)

    and prod (1 - P_m) = exp(sum log(1 - P_m)). The sums over m = i+1..j are taken as cumulative sums of a
    masked (P, P) matrix (each entry a sum of its own terms, never a difference of two long cumulative sums,
    which would cancel in float32). O(P^2 D) instead of P sequential steps: P is small (T / bytes per chunk).
    z: (B, P, D), P: (B, P) clamped to [eps, 1 - eps] -> (B, P, D)."""
    n = P.shape[1]
    log_keep = torch.log1p(-P.float())  # (B, P): log(1 - P_m)
    strictly_lower = torch.ones(n, n, dtype=torch.bool, device=P.device).tril(-1)  # [j, i]: m = j > i
    terms = log_keep[:, :, None].expand(-1, n, n).masked_fill(~strictly_lower, 0.0)  # [b, m, i] = log(1 - P_m), m > i
    segment = terms.cumsum(dim=1)  # [b, j, i] = sum_{m = i+1 .. j} log(1 - P_m) for j >= i
    lower = strictly_lower | torch.eye(n, dtype=torch.bool, device=P.device)
    weights = segment.masked_fill(~lower, float("-inf")).exp() * P.float()[:, None, :]  # (B, P, P): w_{j,i}
    return (weights.to(z.dtype) @ z)  # (B, P, D)


def straight_through_ones(c: torch.Tensor) -> torch.Tensor:
    """Forward value exactly 1, gradient that of c (section 2.2.2, eq. 7): c - c.detach() is exactly 0."""
    return 1.0 + (c - c.detach())


def upsample(zbar: torch.Tensor, b: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Every byte reads its own chunk's smoothed output, scaled by its straight-through confidence.

    zbar: (B, P, D), b, p: (B, T) -> (B, T, D), with out[:, t] = zbar[:, chunk_ids[t]] * STE(max(p_t, 1 - p_t))."""
    B, T = b.shape
    ids = chunk_ids(b)  # (B, T): byte t -> its chunk j, s_j <= t
    gathered = zbar.gather(1, ids[..., None].expand(B, T, zbar.shape[-1]))  # (B, T, D)
    confidence = torch.maximum(p, 1 - p)  # (B, T): the probability of the choice the router made
    return gathered * straight_through_ones(confidence)[..., None].to(gathered.dtype)


def ratio_loss(b: torch.Tensor, p: torch.Tensor, target: float, real: torch.Tensor | None = None) -> torch.Tensor:
    """L_ratio (section 2.3.3, eq. 10) for a target of N = target bytes per chunk (N > 1).

    F, the fraction of real bytes that start a chunk, carries no gradient; G, their mean probability, does.
    At F = G = 1/N the loss is 1, its minimum along F = G; with F fixed, dL/dG = N (N F - 1) / (N - 1), so
    too many boundaries (F > 1/N) push every p_t down and too few push them up.
    b, p: (B, T); real: (B, T) bool, the bytes that count (default all) -> scalar float32."""
    N = float(target)
    real = torch.ones_like(b) if real is None else real
    n = real.sum().clamp(min=1)
    F_ = (b & real).sum().float() / n
    G = (p.float() * real).sum() / n
    return N / (N - 1) * ((N - 1) * F_ * G + (1 - F_) * (1 - G))


class DynamicChunking(nn.Module):
    """The router, selection, smoothing and upsampling around a main network, with the residual path.

    down(x, tokens) -> chunks and what up needs; up(z, ...) -> per-byte states for the decoder:
        out_t = zbar_{chunk(t)} * STE(c_t) + W_res x_t      (W_res zero at initialisation, as released)
    """

    def __init__(self, dim: int):
        super().__init__()
        self.router = Router(dim)
        self.residual = nn.Linear(dim, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        self.router.reset_parameters()
        nn.init.zeros_(self.residual.weight)

    def down(self, x: torch.Tensor, tokens: torch.Tensor, pad_to: int = 1) -> dict:
        """x: (B, T, D), tokens: (B, T) -> {"chunks" (B, P, D), "p" (B, T), "b" (B, T), "starts" (B, P),
        "real" (B, P)}."""
        p = self.router(x, tokens)  # (B, T)
        b = boundaries(p)
        chunks, starts, real = select(x, b, pad_to)
        return {"chunks": chunks, "p": p, "b": b, "starts": starts, "real": real}

    def up(self, z: torch.Tensor, x: torch.Tensor, chunking: dict) -> torch.Tensor:
        """z: (B, P, D) main-network outputs (already in this width), x: (B, T, D) encoder states -> (B, T, D)."""
        P_j = chunking["p"].gather(1, chunking["starts"]).clamp(SMOOTHING_EPS, 1 - SMOOTHING_EPS)  # (B, P)
        zbar = smooth(z, P_j)
        # in x's dtype (float32): the decoder's residual stream, as the encoder's, stays float32 under autocast
        return upsample(zbar, chunking["b"], chunking["p"]).to(x.dtype) + self.residual(x).to(x.dtype)

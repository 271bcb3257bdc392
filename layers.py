"""Shared building blocks used by every transformer in BLT (paper section 3, "Transformer architecture").

All BLT transformers (entropy model, local encoder, global latent transformer, local decoder) are Llama-style:
pre-norm RMSNorm, rotary position embeddings (RoPE), SwiGLU feed-forward, linear layers without bias. The
cross-attention of the local encoder and decoder (paper sections 3.2.2 and 3.3) lives here too, since both
use the same module.

Masks are booleans (True = may attend) and are the specification: every attention below computes exactly
the masked softmax of `attend`, and the faster paths only skip pairs the mask forbids.
  * self-attention with a sliding window (`attend_sliding_window`): blocks of `window` queries attend to
    their own and the previous block, 2 * window keys instead of T;
  * cross-attention where each query may read at most n keys (the decoder: the k slots of one patch,
    `attend_few_keys`) or each key may be read by at most n queries (the encoder: a byte is read by the
    k queries of its own patch, `attend_few_queries`): O(T * n * D) instead of O(T * S * D).
FlexAttention would be faster on GPU, but it has no CPU backward, and this project trains on CPU.

Precision under bf16 autocast: activations are computed in bf16, with no float32 round trips inside a
layer. Float32 stays where it matters: the residual stream (autocast adds bf16 branches to it), the mean of
squares in RMSNorm, the RoPE angles (computed once per forward, then stored in bf16) and the loss.

Shapes: B = batch, T = query length, S = key length, H = heads, Dh = head width, D = model width,
n = keys (or queries) allowed per query (or key).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: the autocast dtype inside torch.autocast, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class RMSNorm(nn.Module):
    """x / rms(x) * weight. The mean of squares accumulates in float32 (a bf16 sum of D squares would lose
    precision); the output is in the compute dtype, ready for the linear layer that always follows."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        return self.normalise(x) * self.weight.to(dtype)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """x / rms(x) without the weight, for a linear layer that folds the weight into its matrix (one pass
        over the activations fewer: W (w * x) = (W diag(w)) x, see TransformerBlock)."""
        mean_square = x.pow(2).mean(dim=-1, keepdim=True, dtype=torch.float32)  # (..., 1) float32
        return (x * torch.rsqrt(mean_square + self.eps).to(x.dtype)).to(compute_dtype(x))


def fused_weight(linears, norm_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The weights of bias-free linear layers that read the same input, stacked (sum of D_out, D_in): one product
    gives all their outputs side by side. norm_weight: (D_in,), the weight of the RMSNorm that the input comes
    out of, folded in, W (w * x) = (W diag(w)) x: then the input is norm.normalise(x), one pass fewer."""
    weight = torch.cat([linear.weight for linear in linears]) if len(linears) > 1 else linears[0].weight
    return weight if norm_weight is None else weight * norm_weight


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation angles for RoPE. positions: (..., T) -> cos, sin: (..., T, Dh) in `dtype`.

    Channel pair (2i, 2i+1) of each head is rotated by angle position * theta^(-2i/Dh). This interleaved
    layout is the released code's (complex-number RoPE) and the Hugging Face port's; Llama's port uses
    (i, i + Dh/2) instead, and weights are not interchangeable between the two layouts. The angles are
    computed in float32 (position * frequency needs the precision); callers compute the tables once per
    forward, in the dtype the queries and keys come out of their projections (bf16 under autocast).
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (..., T, Dh/2)
    angles = angles.repeat_interleave(2, dim=-1)  # (..., T, Dh): each angle for both channels of its pair
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, n, H, Dh), n projections rotated alike (the queries and the keys, side by side); cos, sin:
    (T, Dh) or (B, T, Dh). (x_2i, x_2i+1) -> rotation of that pair by its angle.

    In eager float32 each pair is one complex number and the rotation one complex product (two passes over x
    fewer than the real form). The real form stays for bf16 (PyTorch has no bf16 complex type) and under
    torch.compile (inductor fuses it, but not complex products). Computed in x's dtype (the tables are cast if
    they differ, a no-op when made with rope_cos_sin(dtype))."""
    cos, sin = (c[..., None, None, :].to(x.dtype) for c in (cos, sin))  # (B or 1, T, 1, 1, Dh): over n and heads
    pairs = x.unflatten(-1, (-1, 2))  # (B, T, n, H, Dh/2, 2)
    if x.dtype in (torch.float32, torch.float64) and not torch.compiler.is_compiling():
        rotation = torch.complex(cos[..., ::2], sin[..., ::2])  # e^(i angle), (.., Dh/2)
        return torch.view_as_real(torch.view_as_complex(pairs) * rotation).flatten(-2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)  # (-x_2i+1, x_2i)
    return x * cos + rotated * sin


def _explicit_math(q: torch.Tensor) -> bool:
    """True where scores = q k^T, softmax, @ v is faster than F.scaled_dot_product_attention: training in
    bf16 on CPU, where the fused kernel's backward is several times slower than its forward (torch 2.13)."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled()


def host_checks_are_free(t: torch.Tensor) -> bool:
    """True where looking at a tensor's values from Python costs nothing: on the CPU, in eager mode. The
    shortcuts that look first (is any query empty? is there padding? is the mask causal?) run only there; on a
    GPU the look would wait for the device, and under torch.compile it would break the graph, so there the
    general path runs (the same result either way). tests/device_audit.py's virtual accelerator, which runs on
    the CPU, turns this off."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def not_any(flags: torch.Tensor) -> bool:
    """True when the bool tensor is known to hold no True, so that a masking pass can be skipped (checked only
    where host_checks_are_free; elsewhere False, and the masking runs)."""
    return host_checks_are_free(flags) and not bool(flags.any())


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked softmax attention. q: (B, H, T, Dh), k, v: (B, H, S, Dh), mask: (B or 1, 1, T, S) bool.

    A query whose mask row is all False (an empty patch, or a padding patch) gets a zero output instead of
    the NaN a fully masked softmax would give; a NaN would otherwise leak into real positions through 0 * NaN.
    """
    empty = ~mask.any(dim=-1, keepdim=True)  # (B, 1, T, 1)
    if not_any(empty):  # causal self-attention: every query sees itself; no pass over the output for nothing
        empty = None
    else:
        mask = mask | empty
    if _explicit_math(q):
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2) + bias  # (B, H, T, S), -inf where forbidden
        out = scores.softmax(dim=-1) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out if empty is None else out.masked_fill(empty, 0.0)


def attend_sliding_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                          window: int) -> torch.Tensor | None:
    """`attend` for a mask that allows key s to query t only when t - window < s <= t: O(T * window).

    Queries are cut into blocks of `window` positions. The keys a block may see lie in that block and the
    one before, so block 0 attends to itself only and every later block to 2 * window keys, under the
    matching piece of `mask` (the later blocks in one batched call). q, k, v: (B, H, T, Dh),
    mask: (B or 1, 1, T, T) -> (B, H, T, Dh).
    Returns None when `mask` allows a pair outside those pieces (then use `attend`).
    """
    B, H, T, Dh = q.shape
    W = window
    if T <= W:
        return attend(q, k, v, mask)  # one block
    nb = -(-(T - W) // W)  # blocks after the first
    pad = (nb + 1) * W - T  # the last block is padded with queries and keys that the mask forbids
    t = W + torch.arange(nb * W, device=q.device).view(nb, W, 1)  # (nb, W, 1): query positions of blocks 1..
    s = t[:, :1] - W + torch.arange(2 * W, device=q.device)  # (nb, 1, 2W): the previous and the own block
    pieces = F.pad(mask, (0, pad, 0, pad))[:, :, t, s]  # (B or 1, 1, nb, W, 2W)
    first = mask[:, :, :W, :W]  # (B or 1, 1, W, W): block 0 sees only itself
    if not torch.compiler.is_compiling() and pieces.sum() + first.sum() != mask.sum():
        return None  # the mask allows a key further back than the previous block
    out0 = attend(q[:, :, :W], k[:, :, :W], v[:, :, :W], first)  # (B, H, W, Dh)
    if nb == 1:  # T <= 2W: the second block sees every key, no need to cut
        return torch.cat([out0, attend(q[:, :, W:], k, v, mask[:, :, W:])], dim=2)
    qb = F.pad(q[:, :, W:], (0, 0, 0, pad)).reshape(B, H * nb, W, Dh)
    kb, vb = (F.pad(x, (0, 0, 0, pad)).unflatten(2, (nb + 1, W)) for x in (k, v))  # (B, H, nb+1, W, Dh)
    kb, vb = (torch.cat([x[:, :, :-1], x[:, :, 1:]], dim=3).reshape(B, H * nb, 2 * W, Dh)  # previous + own
              for x in (kb, vb))  # a copy: each key serves two blocks
    pieces = pieces.expand(-1, H, -1, -1, -1).reshape(-1, H * nb, W, 2 * W)  # (B or 1, H*nb, W, 2W)
    out = attend(qb, kb, vb, pieces).view(B, H, nb * W, Dh)
    return torch.cat([out0, out[:, :, :T - W]], dim=2)


def few_allowed(mask: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The at most n True entries of every row of a bool mask (..., R, C), shape-static: their column
    indices (..., R, n) and whether each is really allowed (a row with fewer than n Trues is filled with
    forbidden columns). None when some row has more than n Trues."""
    allowed, index = mask.to(torch.uint8).topk(min(n + 1, mask.shape[-1]), dim=-1)
    if not torch.compiler.is_compiling() and n < mask.shape[-1] and allowed[..., n].any():
        return None
    return index[..., :n], allowed[..., :n].bool()


def mask_from_pairs(index: torch.Tensor, allowed: torch.Tensor, n_columns: int) -> torch.Tensor:
    """The bool mask (..., R, n_columns) whose True entries are the allowed pairs (index, allowed): (..., R, n),
    as few_allowed returns them. For the dense reference path."""
    hits = torch.zeros(*index.shape[:-1], n_columns, dtype=torch.uint8, device=index.device)
    return hits.scatter_add_(-1, index, allowed.to(torch.uint8)) > 0


def patch_slot_pairs(patch_ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The allowed pairs between positions and the k slots of each patch, as CrossAttention's pairs: position t
    goes with slots p*k .. p*k + k-1 of its patch p = patch_ids[t]. patch_ids: (B, T), -1 for a position with
    no patch (it pairs with nothing) -> index, allowed: (B, T, k). The encoder's queries and the decoder's
    keys are both laid out this way (slot j of patch p at p*k + j)."""
    index = patch_ids.clamp(min=0)[..., None] * k + torch.arange(k, device=patch_ids.device)
    return index, (patch_ids >= 0)[..., None].expand_as(index)


def _rows(index: torch.Tensor, n_rows: int) -> torch.Tensor:
    """index: (B, T, n) row numbers within each batch element -> (B*T*n,) rows of the flattened (B*n_rows)."""
    return (index + n_rows * torch.arange(index.shape[0], device=index.device)[:, None, None]).flatten()


def attend_few_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                    allowed: torch.Tensor) -> torch.Tensor:
    """`attend` when each query may read at most n keys (the decoder: the k slots of one patch).
    q: (B, T, H, Dh), k, v: (B, S, H, Dh), index, allowed: (B, T, n) from few_allowed -> (B, T, H, Dh).
    Each query's n keys are gathered and scored: O(T * n * D), and no (T, S) scores."""
    (B, T, n), (S, H, Dh) = index.shape, k.shape[1:]
    rows = _rows(index, S)  # (B*T*n,)
    kq, vq = (x.reshape(B * S, H, Dh).index_select(0, rows).view(B, T, n, H, Dh) for x in (k, v))
    scores = (q[:, :, None] * kq).sum(-1) * Dh ** -0.5  # (B, T, n, H)
    if not_any(~allowed):  # every query reads all n of its keys (the decoder, but for bytes with no patch)
        return (scores.softmax(dim=2)[..., None] * vq).sum(2)  # (B, T, H, Dh)
    empty = ~allowed.any(dim=-1, keepdim=True)  # (B, T, 1): as in attend, a query with no key gets 0
    weights = scores.masked_fill(~(allowed | empty)[..., None], float("-inf")).softmax(dim=2)
    out = (weights[..., None] * vq).sum(2)  # (B, T, H, Dh)
    return out.masked_fill(empty[..., None], 0.0)


def attend_few_queries(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                       allowed: torch.Tensor) -> torch.Tensor:
    """`attend` when each key may be read by at most n queries (the encoder: byte t by the k queries of
    its own patch). q: (B, Q, H, Dh), k, v: (B, T, H, Dh), index, allowed: (B, T, n) from few_allowed on
    the transposed mask (the queries of each key) -> (B, Q, H, Dh).

    Each (key, query) pair is scored once, O(T * n * D). The softmax of a query runs over the segment of
    pairs that share it: its max and its sum are reduced into per-query slots (scatter_reduce amax,
    index_add), and so is the weighted sum of values. A query that no key allows (an empty patch) gets 0.
    """
    (B, T, n), (Q, H, Dh) = index.shape, q.shape[1:]
    rows = _rows(index, Q)  # (B*T*n,): the query of each pair, in the flattened (B*Q)
    qk = q.reshape(B * Q, H, Dh).index_select(0, rows).view(B, T, n, H, Dh)
    scores = (qk * k[:, :, None]).sum(-1) * Dh ** -0.5  # (B, T, n, H)
    scores = scores.masked_fill(~allowed[..., None], float("-inf")).view(B * T * n, H)
    with torch.no_grad():  # softmax is shift-invariant: any per-query shift is exact; the max avoids overflow
        top = scores.new_full((B * Q, H), float("-inf"))
        top = top.scatter_reduce(0, rows[:, None].expand(-1, H), scores, reduce="amax")  # (B*Q, H) per-query max
        top = top.masked_fill(top == float("-inf"), 0.0)  # a query without an allowed pair
    e = torch.exp(scores - top[rows])  # (B*T*n, H): 0 where forbidden, 1 at each query's max
    total = torch.zeros_like(top).index_add(0, rows, e)  # (B*Q, H): >= 1 for a query with a key, else 0
    values = (e.view(B, T, n, H, 1) * v[:, :, None]).view(B * T * n, H, Dh)  # each pair's value, weighted
    out = torch.zeros(B * Q, H, Dh, dtype=values.dtype, device=q.device).index_add(0, rows, values)
    return (out / total.clamp(min=1.0)[..., None]).view(B, Q, H, Dh)


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Causal (optionally sliding-window) mask from positions. q_pos: (T,) or (B, T); k_pos: (S,) or (B, S).

    Query at position t may attend key at position s when s <= t and (window is None or t - s < window).
    Returns (B or 1, 1, T, S) bool.
    """
    q_pos = q_pos if q_pos.dim() == 2 else q_pos[None]
    k_pos = k_pos if k_pos.dim() == 2 else k_pos[None]
    delta = q_pos[:, :, None] - k_pos[:, None, :]  # (B, T, S)
    mask = delta >= 0
    if window is not None:
        mask = mask & (delta < window)
    return mask[:, None]


class KVCache:
    """Keys and values of past positions for incremental decoding.

    k, v: (B, H, S, Dh); positions: (S,) absolute positions of the cached keys. With a sliding window only
    the keys a future query can still see are kept: the last window - 1 before each new chunk.
    """

    def __init__(self, window: int | None = None):
        self.window = window
        self.k = self.v = self.positions = None

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Append k, v: (B, H, T, Dh) at positions (T,); return all keys, values and positions to attend."""
        if self.k is not None:
            S = self.k.shape[2]
            first = 0 if self.window is None else max(0, S - (self.window - 1))
            k = torch.cat([self.k[:, :, first:], k], dim=2)
            v = torch.cat([self.v[:, :, first:], v], dim=2)
            positions = torch.cat([self.positions[first:], positions])
        self.k, self.v, self.positions = k, v, positions
        return k, v, positions


class Packing:
    """The real positions of a right-padded batch, packed into one row: the global transformer's patches, where
    rows of a batch hold different numbers of patches and a quarter of the padded (B, P) layout can be padding.

    Norms, projections, feed-forward layers and residuals act on each position alone, so they run on the N real
    positions (1, N, D) only; attention needs the rows, so Attention unpacks its q, k, v to (B, P, ...) and packs
    its output again. Padding must come after every real position of its row: under a causal mask no real
    position then reads one, and the real outputs are those of the padded batch.
    real: (B, P) bool, True at the real positions (a prefix of each row)."""

    def __init__(self, real: torch.Tensor):
        self.shape = real.shape
        self.rows = real.flatten().nonzero().squeeze(1)  # (N,): index of each real position in the flat (B*P)

    @staticmethod
    def of(real: torch.Tensor) -> "Packing | None":
        """The packing of the real positions, or None: where there is no padding, and where finding the real
        positions would wait for the device (see host_checks_are_free), so that every padded position runs."""
        return Packing(real) if host_checks_are_free(real) and not bool(real.all()) else None

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P, ...) -> (1, N, ...)."""
        return x.flatten(0, 1).index_select(0, self.rows)[None]

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(1, N, ...) -> (B, P, ...), zeros at the padding."""
        out = x.new_zeros(self.shape.numel(), *x.shape[2:]).index_copy(0, self.rows, x[0])
        return out.view(*self.shape, *x.shape[2:])


HALVES_FROM = 64  # from this many positions, causal self-attention runs in two halves (measured: 13% faster at 128)


class Attention(nn.Module):
    """Multi-head self-attention with RoPE on queries and keys.

    window: the layer's sliding window, if any. Its masks then allow only the window - 1 keys before each
    query and the query itself; for sequences longer than 4 * window (1 * window for the explicit bf16
    path of `attend`, where scores dominate) attention runs blockwise, each block of `window` queries
    against its own and the previous block (`attend_sliding_window`), and falls back to `attend` for a
    mask that reaches further.
    """

    def __init__(self, dim: int, n_heads: int, window: int | None = None):
        super().__init__()
        assert dim % n_heads == 0, f"width {dim} is not divisible by {n_heads} heads"
        self.n_heads, self.head_dim, self.window = n_heads, dim // n_heads, window
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x, mask, cos, sin, cache: KVCache | None = None, positions=None, norm_weight=None,
                packed: "Packing | None" = None):
        """x: (B, T, D); mask: (B or 1, 1, T, T) bool. With a cache, x holds the next T positions
        (`positions`, shape (T,)) and the causal sliding-window mask over cached keys is built here.
        norm_weight: (D,), the weight of the RMSNorm that x comes out of (without it), if any.
        packed: x is (1, N, D), the N real positions of a right-padded (B, T) batch (see Packing); the
        projections run on those only, and attention on the padded layout."""
        weight = fused_weight((self.wq, self.wk, self.wv), norm_weight)  # (3D, D): one product, not three
        qkv = F.linear(x, weight)  # (B, T, 3D), or (1, N, 3D) packed
        if packed is not None:
            qkv = packed.unpack(qkv)  # (B, T, 3D), zeros at the padding
        B, T, D = qkv.shape[0], qkv.shape[1], x.shape[-1]
        qkv = qkv.view(B, T, 3, self.n_heads, self.head_dim)
        q, k = apply_rope(qkv[:, :, :2], cos, sin).transpose(1, 3).unbind(2)  # (B, H, T, Dh) each
        v = qkv[:, :, 2].transpose(1, 2)  # (B, H, T, Dh)
        out = None
        if cache is not None:
            k, v, key_positions = cache.update(k, v, positions)  # (B, H, S, Dh), S = kept + T
            mask = causal_mask(positions, key_positions, cache.window)  # (1, 1, T, S)
        elif mask is None:  # say what is missing, rather than fail inside attend
            raise ValueError("self-attention without a KV cache needs a mask (B or 1, 1, T, T), got None: build it "
                             "with layers.causal_mask (mask=None goes only with caches)")
        elif self.window is not None and T > (1 if _explicit_math(q) else 4) * self.window:  # measured thresholds
            out = attend_sliding_window(q, k, v, mask, self.window)  # None if the mask reaches further
        elif T >= HALVES_FROM and not _explicit_math(q) and host_checks_are_free(q):
            # Causal: the first half of the queries needs only the first half of the keys, so cut there (3/4 of
            # the pairs scored; the same outputs). Checked against the mask, so only where that costs nothing.
            out = attend_sliding_window(q, k, v, mask, -(-T // 2))
        if out is None:
            out = attend(q, k, v, mask)  # (B, H, T, Dh)
        out = out.transpose(1, 2).reshape(B, T, D)
        return self.wo(packed.pack(out) if packed is not None else out)  # (B, T, D) or (1, N, D)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x, norm_weight=None):
        """x: (B, T, D) -> (B, T, D). norm_weight: as in Attention.forward."""
        gate, up = F.linear(x, fused_weight((self.w1, self.w3), norm_weight)).chunk(2, dim=-1)  # (B, T, F) each
        return self.w2(F.silu(gate) * up)


def swiglu_hidden_dim(dim: int, multiple_of: int = 256) -> int:
    """Llama's SwiGLU width: 2/3 of 4*dim (same parameters as a 4x MLP), rounded up to multiple_of."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then x + feed_forward(norm(x)).

    dropout (on each residual branch, training only) is 0 in the released models; small corpora need it.
    window: the sliding window of the masks this block gets, if any (see Attention)."""

    def __init__(self, dim: int, n_heads: int, hidden_dim: int, eps: float = 1e-5, dropout: float = 0.0,
                 window: int | None = None):
        super().__init__()
        self.attention_norm = RMSNorm(dim, eps)
        self.attention = Attention(dim, n_heads, window)
        self.ffn_norm = RMSNorm(dim, eps)
        self.feed_forward = FeedForward(dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, mask, cos, sin, cache: KVCache | None = None, positions=None, packed=None):
        # Each norm's weight is folded into the matrix that reads its output, W (w * x) = (W diag(w)) x: the
        # same function as attention(attention_norm(x)), with one pass over the activations fewer.
        h = self.attention(self.attention_norm.normalise(x), mask, cos, sin, cache, positions,
                           norm_weight=self.attention_norm.weight, packed=packed)
        x = x + self.dropout(h)
        return x + self.dropout(self.feed_forward(self.ffn_norm.normalise(x), norm_weight=self.ffn_norm.weight))


class CrossAttention(nn.Module):
    """Cross-attention between bytes and patches (paper sections 3.2.2 and 3.3), no positional encoding.

    RMSNorm on the queries and on the keys/values. Queries and keys/values have the same width (the caller
    projects). The caller adds the residual. Released-code quirk, kept for weight compatibility: this block
    itself returns queries + attention, and the caller adds the queries again (2 * queries + attention).
    """

    def __init__(self, dim: int, n_heads: int, eps: float = 1e-5):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.query_norm = RMSNorm(dim, eps)
        self.kv_norm = RMSNorm(dim, eps)
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, queries: torch.Tensor, keys_values: torch.Tensor, mask: torch.Tensor | None,
                keys_per_query: int | None = None, queries_per_key: int | None = None,
                pairs: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """queries: (B, T, D), keys_values: (B, S, D), mask: (B or 1, 1, T, S) bool -> (B, T, D).

        By default dense masked attention (`attend`, the reference). keys_per_query=n promises that every
        mask row allows at most n keys (the decoder: a byte reads the k slots of one patch),
        queries_per_key=n that every mask column allows at most n queries (the encoder: a byte is read by
        the k queries of its patch). Then only the allowed pairs are scored, with the same result; a mask
        that breaks the promise gets the dense path.

        pairs=(index, allowed) lists the allowed pairs directly, as few_allowed would find them in the mask
        (each (B, T, n) with keys_per_query, (B, S, n) with queries_per_key): the encoder and the decoder
        know them from patch ids, so they build no (T, S) mask at all (mask=None; the dense path, kept as
        the reference, rebuilds it from the pairs).
        """
        if pairs is None and mask is None:
            raise ValueError("cross-attention needs a mask or the allowed pairs")
        if pairs is not None and (keys_per_query is None) == (queries_per_key is None):
            raise ValueError("pairs need exactly one of keys_per_query (each query's keys) and queries_per_key")
        B, T, D = queries.shape
        S, H, Dh = keys_values.shape[1], self.n_heads, self.head_dim
        # As in TransformerBlock, each norm's weight is folded into the matrix that reads it; k and v are one product.
        wq, wkv = fused_weight((self.wq,), self.query_norm.weight), fused_weight((self.wk, self.wv), self.kv_norm.weight)
        q = F.linear(self.query_norm.normalise(queries), wq).view(B, T, H, Dh)
        k, v = F.linear(self.kv_norm.normalise(keys_values), wkv).view(B, S, 2, H, Dh).unbind(2)  # (B, S, H, Dh) each
        if mask is not None:
            mask = mask.expand(B, 1, T, S)[:, 0]  # (B, T, S)
        out = None
        if keys_per_query is not None:
            few = pairs or few_allowed(mask, keys_per_query)  # each query's keys
            out = attend_few_keys(q, k, v, *few) if few else None
        elif queries_per_key is not None:
            few = pairs or few_allowed(mask.transpose(1, 2), queries_per_key)  # each key's queries
            out = attend_few_queries(q, k, v, *few) if few else None
        if out is None:  # dense: every (query, key) pair scored, the forbidden ones masked
            if mask is None:
                mask = mask_from_pairs(*pairs, S if keys_per_query is not None else T)
                mask = mask if keys_per_query is not None else mask.transpose(1, 2)
            out = attend(*(x.transpose(1, 2) for x in (q, k, v)), mask[:, None]).transpose(1, 2)  # (B, T, H, Dh)
        return self.wo(out.reshape(B, T, D)) + queries

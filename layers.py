"""Shared building blocks used by every transformer in BLT (paper section 3, "Transformer architecture").

All BLT transformers (entropy model, local encoder, global latent transformer, local decoder) are Llama-style:
pre-norm RMSNorm, rotary position embeddings (RoPE), SwiGLU feed-forward, linear layers without bias. The
cross-attention of the local encoder and decoder (paper sections 3.2.2 and 3.3) lives here too, since both
use the same module.

Attention goes through torch.nn.functional.scaled_dot_product_attention with a boolean mask (True = may
attend). FlexAttention would be faster on GPU, but it has no CPU backward, and this project trains on CPU.

Shapes: B = batch, T = query length, S = key length, H = heads, Dh = head width, D = model width.
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
        mean_square = x.pow(2).mean(dim=-1, keepdim=True, dtype=torch.float32)  # (..., 1) float32
        dtype = compute_dtype(x)
        return (x * torch.rsqrt(mean_square + self.eps).to(x.dtype)).to(dtype) * self.weight.to(dtype)


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
    """x: (B, H, T, Dh); cos, sin: (T, Dh) or (B, T, Dh). (x_2i, x_2i+1) -> rotation of that pair.
    Computed in x's dtype (the tables are cast if they differ, a no-op when made with rope_cos_sin(dtype))."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, Dh) to broadcast over heads
    pairs = x.unflatten(-1, (-1, 2))  # (B, H, T, Dh/2, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)  # (-x_2i+1, x_2i)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def _explicit_math(q: torch.Tensor) -> bool:
    """True where scores = q k^T, softmax, @ v is faster than F.scaled_dot_product_attention: training in
    bf16 on CPU, where the fused kernel's backward is several times slower than its forward (torch 2.13)."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked softmax attention. q: (B, H, T, Dh), k, v: (B, H, S, Dh), mask: (B or 1, 1, T, S) bool.

    A query whose mask row is all False (an empty patch, or a padding patch) gets a zero output instead of
    the NaN a fully masked softmax would give; a NaN would otherwise leak into real positions through 0 * NaN.
    """
    empty = ~mask.any(dim=-1, keepdim=True)  # (B, 1, T, 1)
    mask = mask | empty
    if _explicit_math(q):
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2) + bias  # (B, H, T, S), -inf where forbidden
        out = scores.softmax(dim=-1) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.masked_fill(empty, 0.0)


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


class Attention(nn.Module):
    """Multi-head self-attention with RoPE on queries and keys."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        assert dim % n_heads == 0, f"width {dim} is not divisible by {n_heads} heads"
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x, mask, cos, sin, cache: KVCache | None = None, positions=None):
        """x: (B, T, D); mask: (B or 1, 1, T, T) bool. With a cache, x holds the next T positions
        (`positions`, shape (T,)) and the causal sliding-window mask over cached keys is built here."""
        B, T, D = x.shape
        q, k, v = (w(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, H, T, Dh)
        if cache is not None:
            k, v, key_positions = cache.update(k, v, positions)  # (B, H, S, Dh), S = kept + T
            mask = causal_mask(positions, key_positions, cache.window)  # (1, 1, T, S)
        out = attend(q, k, v, mask)  # (B, H, T, Dh)
        return self.wo(out.transpose(1, 2).reshape(B, T, D))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def swiglu_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """Llama's SwiGLU width: 2/3 of 4*dim (same parameters as a 4x MLP), scaled, rounded up to multiple_of."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then x + feed_forward(norm(x)).

    dropout (on each residual branch, training only) is 0 in the released models; small corpora need it."""

    def __init__(self, dim: int, n_heads: int, hidden_dim: int, eps: float = 1e-5, dropout: float = 0.0):
        super().__init__()
        self.attention_norm = RMSNorm(dim, eps)
        self.attention = Attention(dim, n_heads)
        self.ffn_norm = RMSNorm(dim, eps)
        self.feed_forward = FeedForward(dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, mask, cos, sin, cache: KVCache | None = None, positions=None):
        x = x + self.dropout(self.attention(self.attention_norm(x), mask, cos, sin, cache, positions))
        return x + self.dropout(self.feed_forward(self.ffn_norm(x)))


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

    def forward(self, queries: torch.Tensor, keys_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """queries: (B, T, D), keys_values: (B, S, D), mask: (B, 1, T, S) bool -> (B, T, D)."""
        B, T, D = queries.shape
        S = keys_values.shape[1]
        q = self.wq(self.query_norm(queries)).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        kv = self.kv_norm(keys_values)
        k = self.wk(kv).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.wv(kv).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        out = attend(q, k, v, mask)  # (B, H, T, Dh)
        return self.wo(out.transpose(1, 2).reshape(B, T, D)) + queries

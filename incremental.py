"""Incremental decoding: the transformers of BLT, and the byte-level baseline, one position per step.

layers.py's modules already decode incrementally when given KV caches (`caches=`), and they are the reference:
tests/test_sample.py checks that generation through this file equals recomputing the whole prefix with them.
They are written for training and for reading, though, and at one position per step, with matrices this
small, their bookkeeping costs more than their arithmetic: each step concatenates the new key onto the cache,
rebuilds the causal mask and the RoPE angles, and makes a dozen nn.Module calls per layer. Here the same
weights do the same arithmetic, arranged for one new position:

  * keys and values live in buffers allocated once and written in place: a ring of `window` slots for a
    sliding window (the one query of a step sees every slot filled so far, so no mask is needed), else a
    buffer that doubles when full;
  * RoPE rotations for every position come from one table (layers.rope_cos_sin), applied to the query and the
    key together as one complex multiplication (the same rotation of channel pairs as layers.apply_rope);
  * weights are copied once, at construction (build these after loading the weights), into the layout a
    one-row product reads fastest: transposed, contiguous, q|k|v side by side and w1|w3 side by side, with
    each RMSNorm's weight folded into the matrix that reads the normalised vector;
  * each residual addition rides on its output projection (torch.addmm).

Shapes: B = batch rows, D = width, H = heads, Dh = head width, S = slots of the key/value buffers.
"""
import math

import torch
import torch.nn.functional as F

from encoder import HASH_PRIMES
from layers import RMSNorm, fused_weight, rope_cos_sin


def normalise(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x / rms(x): layers.RMSNorm.normalise (its weight folded into the next matrix), for float32 x; eps is a
    0-d tensor. rms(x)^2 = |x|^2 / D + eps, from the vector norm: fewer small kernels than mean(x^2)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x * torch.addcmul(eps, norm, norm, value=1 / x.shape[-1]).rsqrt_()


def folded(norm: RMSNorm, *linears) -> torch.Tensor:
    """The (D_in, D_out) matrix M with normalise(x) @ M = torch.cat([l(norm(x)) for l in linears], -1):
    layers.fused_weight, transposed for one-row products."""
    return fused_weight(linears, norm.weight).t().contiguous().detach()


def epsilon(norm: RMSNorm) -> torch.Tensor:
    """The norm's eps as a 0-d tensor, for normalise()."""
    return torch.tensor(norm.eps, device=norm.weight.device)


def transposed(linear) -> torch.Tensor:
    """(D_in, D_out) with x @ M = linear(x)."""
    return linear.weight.t().contiguous().detach()


class RopeTable:
    """RoPE rotations e^(i * position * theta^(-2j/Dh)) for positions 0..capacity-1, (capacity, Dh/2) complex,
    from layers.rope_cos_sin (whose cos and sin repeat each angle for both channels of a pair)."""

    def __init__(self, head_dim: int, theta: float, capacity: int, device=None):
        self.head_dim, self.theta, self.device = head_dim, theta, device
        self.table = self._make(capacity)

    def _make(self, capacity: int) -> torch.Tensor:
        cos, sin = rope_cos_sin(torch.arange(capacity, device=self.device), self.head_dim, self.theta)
        return torch.complex(cos[:, ::2], sin[:, ::2])

    def __getitem__(self, pos: int) -> torch.Tensor:
        if pos >= len(self.table):
            self.table = self._make(max(pos + 1, 2 * len(self.table)))
        return self.table[pos]


class BlockWeights:
    """One layers.TransformerBlock's weights, laid out for one-row products (see the module docstring)."""

    def __init__(self, block):
        attention, ffn = block.attention, block.feed_forward
        self.attention_eps, self.ffn_eps = epsilon(block.attention_norm), epsilon(block.ffn_norm)
        self.wqkv = folded(block.attention_norm, attention.wq, attention.wk, attention.wv)  # (D, 3D)
        self.wo = transposed(attention.wo)  # (D, D)
        self.w13 = folded(block.ffn_norm, ffn.w1, ffn.w3)  # (D, 2F)
        self.w2 = transposed(ffn.w2)  # (F, D)


class CachedStack:
    """A stack of layers.TransformerBlock decoding one position per step for B rows, with preallocated caches.

    window: the stack's sliding attention window (None: every earlier position). step(x, pos) runs all B rows
    at one position, through buffers and views made once (every small tensor a step would otherwise create
    costs time: for these matrices, as much as the arithmetic). step_rows runs some rows, each at its own
    position (the global model, whose rows complete patches at different bytes).
    """

    def __init__(self, blocks, rope_theta: float, window: int | None, batch_size: int, capacity: int = 256):
        first = blocks[0].attention
        H, Dh, B = first.n_heads, first.head_dim, batch_size
        self.n_heads, self.head_dim, self.window = H, Dh, window
        self.layers = [BlockWeights(b) for b in blocks]
        weight = first.wq.weight
        slots = window if window is not None else capacity
        self.kv = [weight.new_zeros(B, 2, H, slots, Dh) for _ in blocks]  # per layer: keys and values
        self._cache_views()
        self.rope = RopeTable(Dh, rope_theta, capacity, weight.device)
        # step's products land in these buffers; views of them are the queries, keys, values and SwiGLU halves
        self.qkv = weight.new_zeros(B, 3 * H * Dh)
        self.q = self.qkv.view(B, 3, H, 1, Dh)[:, 0]  # (B, H, 1, Dh)
        self.new_kv = self.qkv.view(B, 3, H, Dh)[:, 1:]  # (B, 2, H, Dh)
        self.qk = torch.view_as_complex(self.qkv.view(B, 3, H, Dh // 2, 2)[:, :2])  # (B, 2, H, Dh/2) for RoPE
        hidden = self.layers[0].w2.shape[0]
        self.h13 = weight.new_zeros(B, 2 * hidden)
        self.gate, self.up = self.h13[:, :hidden], self.h13[:, hidden:]

    def _cache_views(self):
        """Keys and values (B, H, S, Dh) of each layer, and, for a ring, each slot (B, 2, H, Dh)."""
        self.keys, self.values = [kv[:, 0] for kv in self.kv], [kv[:, 1] for kv in self.kv]
        if self.window is not None:
            self.slot_views = [[kv[:, :, :, s] for s in range(self.window)] for kv in self.kv]

    def position(self, pos: int) -> tuple[torch.Tensor, int, int]:
        """What every block needs at position pos: the RoPE rotation (Dh/2,) complex, the buffer slot of the
        new key and value, and how many slots the query attends to."""
        if self.window is not None:
            return self.rope[pos], pos % self.window, min(pos + 1, self.window)
        if pos >= self.kv[0].shape[3]:  # full: double the buffers
            self.kv = [torch.cat([t, torch.zeros_like(t)], dim=3) for t in self.kv]
            self._cache_views()
        return self.rope[pos], pos, pos + 1

    def block(self, i: int, x: torch.Tensor, position: tuple) -> torch.Tensor:
        """Block i on x: (B, D), every row at `position` (from position()) -> (B, D)."""
        rotation, slot, n = position
        w = self.layers[i]
        torch.matmul(normalise(x, w.attention_eps), w.wqkv, out=self.qkv)
        self.qk.mul_(rotation)  # RoPE on q and k
        (self.slot_views[i][slot] if self.window is not None else self.kv[i].select(3, slot)).copy_(self.new_kv)
        keys, values = self.keys[i], self.values[i]
        if n < keys.shape[2]:
            keys, values = keys[:, :, :n], values[:, :, :n]
        out = F.scaled_dot_product_attention(self.q, keys, values)  # (B, H, 1, Dh)
        x = torch.addmm(x, out.view(x.shape), w.wo)
        torch.matmul(normalise(x, w.ffn_eps), w.w13, out=self.h13)
        return torch.addmm(x, F.silu(self.gate, inplace=True).mul_(self.up), w.w2)

    def step(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        """x: (B, D), every row at position pos -> (B, D) outputs of the last block (no final norm)."""
        position = self.position(pos)
        for i in range(len(self.layers)):
            x = self.block(i, x, position)
        return x

    def step_rows(self, x: torch.Tensor, rows: list[int], positions: list[int]) -> torch.Tensor:
        """Some rows, each at its own position: x (R, D) -> (R, D). The same block as `block`, with products
        batched over the R rows and attention row by row, over each row's own cache."""
        R, H, Dh = x.shape[0], self.n_heads, self.head_dim
        at = [self.position(p) for p in positions]  # (rotation, slot, n) per row
        rotation = torch.stack([r for r, _, _ in at])[:, None, None]  # (R, 1, 1, Dh/2)
        for i, w in enumerate(self.layers):
            qkv = (normalise(x, w.attention_eps) @ w.wqkv).view(R, 3, H, Dh // 2, 2)
            torch.view_as_complex(qkv[:, :2]).mul_(rotation)
            qkv = qkv.view(R, 3, H, 1, Dh)
            out = []
            for j, (b, (_, slot, n)) in enumerate(zip(rows, at)):
                kv = self.kv[i][b]  # (2, H, S, Dh)
                kv[:, :, slot] = qkv[j, 1:, :, 0]
                out.append(F.scaled_dot_product_attention(qkv[j, 0], kv[0, :, :n], kv[1, :, :n]))  # (H, 1, Dh)
            x = torch.addmm(x, torch.stack(out).view(x.shape), w.wo)
            gate, up = (normalise(x, w.ffn_eps) @ w.w13).chunk(2, dim=-1)
            x = torch.addmm(x, F.silu(gate) * up, w.w2)
        return x


class Head:
    """Final RMSNorm and output projection: (B, D) -> (B, V) logits."""

    def __init__(self, norm: RMSNorm, output):
        self.eps, self.weight = epsilon(norm), folded(norm, output)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return normalise(h, self.eps) @ self.weight


class CachedByteLM:
    """entropy_model.EntropyModel (the entropy model, or the byte-level baseline) one byte per step:
    step(ids (B,), pos) -> next-byte logits (B, V)."""

    def __init__(self, model, batch_size: int, capacity: int = 256):
        self.embedding = model.tok_embeddings.weight
        self.stack = CachedStack(model.layers, model.rope_theta, model.window, batch_size, capacity)
        self.head = Head(model.norm, model.output)
        # a byte model with BLT's hash n-gram embeddings (ByteLMConfig.hash_ngram_sizes) reads the last N ids
        self.hashes = NewestByteEmbedding(model) if getattr(model, "hash_sizes", ()) else None
        if self.hashes is not None:
            self.recent = torch.zeros(batch_size, self.hashes.N, dtype=torch.long, device=self.embedding.device)

    def step(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        if self.hashes is None:
            return self.head(self.stack.step(F.embedding(ids, self.embedding), pos))
        if pos == 0:  # a new sequence: n-grams reach back before it as zeros, as encoder.hash_ngram_ids pads
            self.recent.zero_()
        self.recent = torch.cat([self.recent[:, 1:], ids[:, None].to(self.recent)], dim=1)  # (B, N), newest last
        return self.head(self.stack.step(self.hashes(self.recent), pos))


class NewestByteEmbedding:
    """encoder.embed(window)[:, -1]: the newest byte's embedding plus its hash n-gram embeddings (paper section
    3.2.1), from window (B, N), the last N = max(n) ids (left-padded with 0 at the start of a sequence).

    The RollPolyHash of encoder.hash_ngram_ids, sum_m g[m] * prime^m over the n-gram g ending at the newest
    byte, is linear in the ids: for every hash function and size at once it is one int64 product
    window @ P, with P[N - n + m, (f, n)] = prime_f^m (int64 products and sums wrap around the same way in
    any order). Column 0 of P passes the newest id through for the byte table. When the tables are small (up
    to ONE_TABLE floats), a copy of them all, end to end, serves every lookup and the sum in one call.
    """
    ONE_TABLE = 1 << 26

    def __init__(self, encoder):
        self.sizes, self.buckets, self.functions = encoder.hash_sizes, encoder.hash_buckets, encoder.hash_functions
        self.N = max(self.sizes, default=1)
        self.tables = [encoder.tok_embeddings.weight.detach()] + [t.weight.detach() for t in encoder.hash_embeddings]
        device = self.tables[0].device
        columns = [torch.zeros(self.N, dtype=torch.long).index_fill_(0, torch.tensor([self.N - 1]), 1)]
        for f in range(self.functions):  # encoder.embed's order of tables: per function, per size
            prime = torch.tensor(HASH_PRIMES[f % len(HASH_PRIMES)], dtype=torch.int64)
            for n in self.sizes:
                column = torch.zeros(self.N, dtype=torch.long)
                column[self.N - n:] = prime ** torch.arange(n)  # as hash_ngram_ids computes its powers
                columns.append(column)
        self.powers = torch.stack(columns, dim=1).to(device)  # (N, tables)
        # the byte column keeps its id (a modulus above any id), the hash columns wrap at buckets
        self.modulus = torch.tensor([1 << 62] + [self.buckets] * (len(columns) - 1), device=device)
        self.table = None
        if sum(t.numel() for t in self.tables) <= self.ONE_TABLE:
            self.table = torch.cat(self.tables)  # table j's rows start at offsets[j]
            self.offsets = torch.tensor([0] + [len(t) for t in self.tables[:-1]], device=device).cumsum(0)

    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        # (B, N, 1) * (N, tables) summed over N: the product window @ P, which CUDA has no int64 kernel for
        ids = torch.remainder((window[:, :, None] * self.powers).sum(dim=1), self.modulus)  # (B, tables)
        if self.table is not None:
            return F.embedding_bag(ids.add_(self.offsets), self.table, mode="sum")
        return torch.stack([F.embedding(i, table) for i, table in zip(ids.unbind(1), self.tables)]).sum(0)


class PatchPooler:
    """encoder.pool (the encoder's patch cross-attention, paper section 3.2.2) for one complete patch per row.

    Its general form handles every patch of a sequence at once, scoring (byte, query) pairs through scatter
    and index operations; here each row has one patch, so its k queries attend to the patch's bytes with one
    dense attention call. pool(states (R, n, D), before (R, n) bool or None) -> (R, k * D), where before marks
    the bytes (at the front) that precede a row's patch.
    """

    def __init__(self, encoder):
        cross = encoder.cross_attn
        self.k, self.n_heads, self.head_dim = encoder.k, cross.n_heads, cross.head_dim
        self.projection = transposed(encoder.patch_projection)  # (D, k * D)
        self.query_eps, self.kv_eps = epsilon(cross.query_norm), epsilon(cross.kv_norm)
        self.wq = folded(cross.query_norm, cross.wq)  # (D, D)
        self.wkv = folded(cross.kv_norm, cross.wk, cross.wv)  # (D, 2D)
        self.wo = transposed(cross.wo)  # (D, D)

    def __call__(self, states: torch.Tensor, before: torch.Tensor | None = None) -> torch.Tensor:
        (R, n, D), H, Dh, k = states.shape, self.n_heads, self.head_dim, self.k
        mask = None if before is None else ~before[:, None, None, :]  # (R, 1, 1, n)
        if before is not None:  # amax over the patch's bytes only
            states_in_patch = states.masked_fill(before[..., None], float("-inf"))
        pooled = (states if before is None else states_in_patch).amax(dim=1)  # (R, D)
        queries = (pooled @ self.projection).view(R * k, D)
        q = (normalise(queries, self.query_eps) @ self.wq).view(R, k, H, Dh).transpose(1, 2)  # (R, H, k, Dh)
        kv = (normalise(states, self.kv_eps) @ self.wkv).view(R, n, 2, H, Dh).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask)  # (R, H, k, Dh)
        # released: 2 * queries + attention (layers.CrossAttention returns queries + attention)
        return torch.addmm(queries, out.transpose(1, 2).reshape(R * k, D), self.wo, beta=2).view(R, k * D)


class PatchReader:
    """The local decoder's cross-attention (layers.CrossAttention) for bytes that all read the same k slots:
    those of one global output o_j, until the next patch completes (paper section 3.3).

    With fixed keys and values, the query and output projections fold into them once per patch: per head h,
    the scores of a byte are normalise(h) @ A_h^T and its output softmax(scores) @ U_h, with
        A_h = k_slots,h w_q,h / sqrt(Dh)   (k, D)   and   U_h = v_slots,h w_o,h^T   (k, D),
    two products of D x Hk per byte instead of two of D x D. set(b, slots) prepares row b; read(h) reads.
    """

    def __init__(self, cross_attn, k: int, batch_size: int):
        self.k, self.n_heads, self.head_dim = k, cross_attn.n_heads, cross_attn.head_dim
        H, Dh = self.n_heads, self.head_dim
        D = H * Dh
        self.query_eps, self.kv_eps = epsilon(cross_attn.query_norm), epsilon(cross_attn.kv_norm)
        scale = cross_attn.query_norm.weight / math.sqrt(Dh)  # (D,): folded into A
        self.wq = (cross_attn.wq.weight * scale).view(H, Dh, D).detach()  # (H, Dh, D)
        self.wkv = folded(cross_attn.kv_norm, cross_attn.wk, cross_attn.wv)  # (D, 2D)
        self.wo = cross_attn.wo.weight.t().reshape(H, Dh, D).detach()  # (H, Dh, D): w_o,h^T
        self.A = self.wq.new_zeros(batch_size, H * k, D)
        self.U = self.wq.new_zeros(batch_size, H * k, D)
        self.scores = self.wq.new_zeros(batch_size, H * k, 1)  # read's products land here
        self.out = self.wq.new_zeros(batch_size, 1, D)

    def set(self, b: int, slots: torch.Tensor):
        """Row b now reads the k slots (k, D) of a new global output (decoder.patch_projection of it)."""
        H, Dh, k = self.n_heads, self.head_dim, self.k
        kv = (normalise(slots, self.kv_eps) @ self.wkv).view(k, 2, H, Dh).permute(1, 2, 0, 3)  # (2, H, k, Dh)
        torch.bmm(kv[0], self.wq, out=self.A[b].view(H, k, -1))
        torch.bmm(kv[1], self.wo, out=self.U[b].view(H, k, -1))

    def read(self, h: torch.Tensor) -> torch.Tensor:
        """h: (B, D) -> 2 h + wo(attention) (B, D): the residual and the released code's extra h (see
        layers.CrossAttention) ride on the last product."""
        B, D = h.shape
        torch.bmm(self.A, normalise(h, self.query_eps).view(B, D, 1), out=self.scores)  # (B, H * k, 1)
        weights = self.scores.view(B, self.n_heads, self.k).softmax(dim=-1).view(B, 1, -1)
        return torch.baddbmm(h.view(B, 1, D), weights, self.U, beta=2, out=self.out).view(B, D)

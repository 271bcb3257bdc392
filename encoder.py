"""The local encoder (paper section 3.2): bytes -> patch representations.

Three steps, each a method below:
  1. embed   (section 3.2.1)  e_i = x_i + sum_{n=3..8} E_n[Hash(g_{i,n})]                   (paper eqs. 5-6)
             x_i is the byte embedding, g_{i,n} = (b_{i-n+1}, ..., b_i) the n-gram ending at byte i, and
             Hash is a rolling polynomial hash taken modulo the number of rows of table E_n.
  2. layers  a small transformer over bytes with a causal sliding-window mask; the window may cross patch
             boundaries.
  3. pool    (section 3.2.2) cross-attention with patches as queries and bytes as keys/values. The queries
             start as a max-pool of the byte states of each patch, projected to k vectors of width D_E; each
             patch attends only to its own bytes; RMSNorm on queries and keys/values, no positional encoding.
             The k vectors are concatenated into one patch representation of width k * D_E (paper figure 5).

Where the released code departs from the paper (kept here so the released weights work, see convert.py):
  * e_i is not divided by (number of n-gram sizes + 1) (paper eq. 6 divides).
  * Pooling reads the last layer's byte states (paper: the embeddings), and cross-attention runs once after
    the last layer (the released model has one encoder layer, where the two readings agree).
  * The cross-attention block returns queries + attention and the caller adds the queries again.

Shapes: B = batch, T = bytes, P = patches, k = query slots per patch, D = D_E (encoder width).
"""
import torch
import torch.nn as nn

from layers import (CrossAttention, TransformerBlock, causal_mask, compute_dtype, patch_slot_pairs, rope_cos_sin,
                    swiglu_hidden_dim)
from patching import VOCAB_SIZE, patch_ids_from_lengths

# The released code's primes, one per hash function (paper section 3.2.1 leaves the hash's constants open).
HASH_PRIMES = [1000000007, 5915587277, 1500450271, 3267000013, 5754853343, 4093082899,
               9576890767, 3628273133, 2860486313, 5463458053, 3367900313]


def hash_ngram_ids(tokens: torch.Tensor, n: int, buckets: int, hash_function: int = 0) -> torch.Tensor:
    """Row of table E_n for every position: RollPolyHash of the n ids ending there, modulo buckets.

        hash(g) = sum_{m=0}^{n-1} g[m] * prime^m      in int64, overflow wrapping around (as released)

    The window of the first bytes is left-padded with id 0. Example (n = 3, ids [1, 5, 6]): position 0 hashes
    (0, 0, 1) = 1 * prime^2, position 1 hashes (0, 1, 5), position 2 hashes (1, 5, 6).

    tokens: (B, T) int64 ids. Returns (B, T) int64 in [0, buckets).
    """
    # --- solution: lesson 3: RollPolyHash n-gram ids, int64 wrap-around (paper §3.2.1, eqs. 5-6) ---
    B, T = tokens.shape
    prime = HASH_PRIMES[hash_function % len(HASH_PRIMES)]
    padded = torch.cat([tokens.new_zeros(B, n - 1), tokens], dim=1)  # (B, T + n - 1)
    windows = padded.unfold(1, n, 1)  # (B, T, n): windows[:, i] = ids i-n+1 .. i
    powers = torch.tensor(prime, dtype=torch.int64, device=tokens.device) ** torch.arange(n, device=tokens.device)
    return (windows * powers).sum(dim=-1) % buckets  # int64 products and sum wrap around; % is non-negative
    # --- end solution ---


class LocalEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D = cfg.local_dim
        self.k, self.window, self.rope_theta, self.head_dim = cfg.cross_attn_k, cfg.local_window, cfg.rope_theta, D // cfg.local_heads
        self.hash_sizes, self.hash_buckets, self.hash_functions = tuple(cfg.hash_ngram_sizes), cfg.hash_buckets, cfg.hash_functions
        self.tok_embeddings = nn.Embedding(VOCAB_SIZE, D)
        # one table per (hash function, n), in that order
        self.hash_embeddings = nn.ModuleList(
            nn.Embedding(cfg.hash_buckets, D) for _ in range(cfg.hash_functions * len(self.hash_sizes))
        )
        hidden = swiglu_hidden_dim(D, cfg.multiple_of)
        self.layers = nn.ModuleList(TransformerBlock(D, cfg.local_heads, hidden, cfg.norm_eps, cfg.dropout,
                                                     window=cfg.local_window) for _ in range(cfg.encoder_layers))
        self.dropout = nn.Dropout(cfg.dropout)  # on the summed embeddings: the hash tables memorise a small corpus
        self.patch_projection = nn.Linear(D, self.k * D, bias=False)  # pooled patch -> k query vectors
        self.cross_attn = CrossAttention(D, cfg.local_heads, cfg.norm_eps)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, D) byte embeddings plus hash n-gram embeddings (section 3.2.1)."""
        # --- solution: lesson 3: byte embedding plus hash n-gram embeddings (paper §3.2.1, eq. 6) ---
        h = self.tok_embeddings(tokens)
        tables = iter(self.hash_embeddings)
        for f in range(self.hash_functions):
            for n in self.hash_sizes:
                h = h + next(tables)(hash_ngram_ids(tokens, n, self.hash_buckets, f))
        return h  # released code: no division by (number of n + 1), which paper §3.2.1 eq. 6 has
        # --- end solution ---

    def byte_layers(self, h: torch.Tensor, positions: torch.Tensor, caches=None) -> torch.Tensor:
        """Local transformer. h: (B, T, D) at positions (T,) -> (B, T, D). With caches, only the new
        positions are given and each layer's KVCache holds the window before them."""
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta, compute_dtype(h))  # (T, Dh), all layers
        mask = None if caches else causal_mask(positions, positions, self.window)  # (1, 1, T, T)
        for i, layer in enumerate(self.layers):
            h = layer(h, mask, cos, sin, caches[i] if caches else None, positions)
        return h

    def pool(self, h: torch.Tensor, patch_ids: torch.Tensor, n_patches: int) -> torch.Tensor:
        """Patch cross-attention (section 3.2.2). h: (B, T, D) byte states, patch_ids: (B, T) ->
        (B, P, k * D) patch representations. Empty patches (padding) pool to 0 and attend to nothing."""
        # --- solution: lesson 4: pool each patch, cross-attend to its own bytes (paper §3.2.2) ---
        B, T, D = h.shape
        P, k = n_patches, self.k
        # released code pools the last layer's byte states; paper §3.2.2 pools the byte embeddings
        index = patch_ids[..., None].expand(B, T, D)
        pooled = h.new_zeros(B, P, D).scatter_reduce(1, index, h, reduce="amax", include_self=False)  # (B, P, D)
        queries = self.patch_projection(pooled).view(B, P * k, D)  # (B, P*k, D): slot j of patch p at p*k + j
        # The mask (P*k, T) would allow query p*k + j to read byte t only if t is in patch p: each byte is read
        # by the k queries of its own patch, so those are listed instead and only those pairs are scored.
        pairs = patch_slot_pairs(patch_ids, k)  # (B, T, k): the queries that read each byte
        patches = queries + self.cross_attn(queries, h, None, queries_per_key=k, pairs=pairs)  # released: 2q + attn
        return patches.view(B, P, k * D)
        # --- end solution ---

    def forward(self, tokens: torch.Tensor, patch_lengths: torch.Tensor):
        """tokens: (B, T) ids, patch_lengths: (B, P) -> byte states (B, T, D), patches (B, P, k * D)."""
        T = tokens.shape[1]
        h = self.byte_layers(self.dropout(self.embed(tokens)), torch.arange(T, device=tokens.device))
        patch_ids = patch_ids_from_lengths(patch_lengths, T)  # (B, T)
        return h, self.pool(h, patch_ids, patch_lengths.shape[1])

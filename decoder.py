"""The local decoder (paper section 3.3): patch outputs -> next-byte logits.

It starts from the encoder's final byte states (no embedding of its own). Before each of its l_D layers, a
cross-attention lets every byte read global outputs, with bytes as queries and the global outputs,
projected to k vectors of width D_D per patch, as keys/values (paper eq. 10-11, roles of eq. 8 swapped).
Then a transformer layer with the same causal sliding-window mask as the encoder. Final RMSNorm and a linear
head to 260 logits.

The one-patch shift (what keeps BLT causal; see `decoder_patch_ids`): byte i predicts byte i+1, so it may
read only global outputs of patches that are complete at i. The global output o_j has seen all of patch j,
so a byte strictly inside patch j must read o_{j-1}; only the last byte of patch j may read o_j.

Where the released code departs from the paper (kept for the released weights):
  * cross-attention runs before every layer (cross_attn_all_layers_decoder = True) in BLT-1B;
  * the cross-attention block returns queries + attention and the caller adds the queries again;
  * the decoder's width must equal the encoder's (it starts from the encoder's states with no projection).

Shapes: B = batch, T = bytes, P = patches, k = slots per patch, D = D_D (decoder width), V = 260.
"""
import torch
import torch.nn as nn

from layers import (CrossAttention, RMSNorm, TransformerBlock, causal_mask, compute_dtype, patch_slot_pairs,
                    rope_cos_sin, swiglu_hidden_dim)
from patching import VOCAB_SIZE, patch_ids_from_lengths


def decoder_patch_ids(patch_lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Which global output each byte reads: the patch before the one holding the NEXT byte.

        decoder_patch_id[i] = patch_id[i + 1] - 1

    computed, as in the released code, as the patch ids of the lengths with the first (BOS) patch dropped.
    Example: lengths [1, 3, 4, 1] (patches {0} {1,2,3} {4,5,6,7} {8 = next-byte slot}), seq_len 8:
        patch ids          [0, 1, 1, 1, 2, 2, 2, 2]
        decoder patch ids  [0, 0, 0, 1, 1, 1, 1, 2]
    Byte 3 closes patch 1 and reads o_1; bytes 4-6 are inside patch 2 and read o_1; byte 7 closes patch 2
    (byte 8 starts a patch) and reads o_2. o_3 is never read. Without the slot (lengths summing to seq_len,
    the Hugging Face convention) the last byte reads the patch before its own.

    patch_lengths: (B, P). Returns (B, seq_len) in [0, P - 1), or -1 for a byte with no patch to read
    (no slot and no complete patch after BOS).
    """
    # --- solution: lesson 6: the one-patch decoder shift (paper §3.3) ---
    return patch_ids_from_lengths(patch_lengths[:, 1:], seq_len)
    # --- end solution ---


class LocalDecoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D = cfg.local_dim
        self.k, self.window, self.rope_theta, self.head_dim = cfg.cross_attn_k, cfg.local_window, cfg.rope_theta, D // cfg.local_heads
        self.patch_projection = nn.Linear(cfg.global_dim, self.k * D, bias=False)  # o_j -> k key/value vectors
        n_cross = cfg.decoder_layers if cfg.cross_attn_all_layers_decoder else 1
        self.cross_attn = nn.ModuleList(CrossAttention(D, cfg.local_heads, cfg.norm_eps) for _ in range(n_cross))
        hidden = swiglu_hidden_dim(D, cfg.multiple_of)
        self.layers = nn.ModuleList(TransformerBlock(D, cfg.local_heads, hidden, cfg.norm_eps, cfg.dropout,
                                                     window=cfg.local_window) for _ in range(cfg.decoder_layers))
        self.norm = RMSNorm(D, cfg.norm_eps)
        self.output = nn.Linear(D, VOCAB_SIZE, bias=False)

    def forward(self, h: torch.Tensor, global_out: torch.Tensor, dec_patch_ids: torch.Tensor,
                positions: torch.Tensor, caches=None) -> torch.Tensor:
        """h: (B, T, D) encoder byte states, global_out: (B, P, D_G), dec_patch_ids: (B, T) from
        `decoder_patch_ids`, positions: (T,) byte positions -> logits (B, T, V).

        With caches, h holds only new bytes; global_out still holds every patch so far."""
        B, P, _ = global_out.shape
        D, k = h.shape[-1], self.k
        slots = self.patch_projection(global_out).view(B, P * k, D)  # (B, P*k, D): slot j of o_p at p*k + j
        # --- solution: lesson 6: each byte reads the k slots of its decoder patch (paper §3.3) ---
        # The mask (T, P*k) would allow byte t to read slot p*k + j only if p = dec_patch_ids[t]: each byte
        # reads exactly k slots, so those are listed instead and only they are scored (id -1 reads nothing).
        pairs = patch_slot_pairs(dec_patch_ids, k)  # (B, T, k): the slots each byte reads
        # --- end solution ---
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta, compute_dtype(h))  # (T, Dh)
        mask = None if caches else causal_mask(positions, positions, self.window)  # (1, 1, T, T)
        for i, layer in enumerate(self.layers):
            if i < len(self.cross_attn):
                # each byte reads k slots: attention gathers those k instead of scoring all P*k
                h = h + self.cross_attn[i](h, slots, None, keys_per_query=k, pairs=pairs)  # released: 2h + attn (§3.3: h + attn)
            h = layer(h, mask, cos, sin, caches[i] if caches else None, positions)
        return self.output(self.norm(h))  # (B, T, V)

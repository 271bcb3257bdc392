"""The global latent transformer (paper section 3.1): the big model, run once per patch.

    o_j = G(E(p_0), ..., E(p_j))

A Llama-style stack over the sequence of patch representations, causal over patches: patch j sees patches
0..j. It holds most parameters and, at scale, most FLOPs; its cost per byte falls as 1 / average patch size,
which is the whole point of patching (paper section 4.5).

The encoder's patch representation has width k * D_E; a linear projection maps it to D_G when the widths
differ. Released-code detail: no final norm after the last layer (the decoder normalises its cross-attention
inputs anyway). RoPE positions are patch indices; the released models use theta = 500000.

Shapes: B = batch, P = patches, D_G = global width.
"""
import torch
import torch.nn as nn

from layers import Packing, TransformerBlock, causal_mask, compute_dtype, rope_cos_sin, swiglu_hidden_dim


class GlobalTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D_in, D = cfg.cross_attn_k * cfg.local_dim, cfg.global_dim
        self.rope_theta, self.head_dim = cfg.rope_theta, D // cfg.global_heads
        self.input_projection = nn.Linear(D_in, D, bias=False) if D_in != D else None
        hidden = swiglu_hidden_dim(D, cfg.multiple_of)
        self.layers = nn.ModuleList(TransformerBlock(D, cfg.global_heads, hidden, cfg.norm_eps, cfg.dropout)
                                    for _ in range(cfg.global_layers))

    def forward(self, patches: torch.Tensor, caches=None, start: int = 0,
                real: torch.Tensor | None = None) -> torch.Tensor:
        """patches: (B, P, k * D_E) -> global outputs o: (B, P, D_G).

        With caches (one KVCache per layer), patches are the P new patches after `start` cached ones.
        Right-padded (empty) patches come after every real patch, so the causal mask keeps them invisible.
        real: (B, P) bool, the real patches (a prefix of each row), if known: then only they run through the
        layers (layers.Packing) and the padding's outputs are 0. Rows of a batch differ in patch count, and
        padding is FLOPs the account does not count. On the CPU in eager mode only (finding the real patches
        would wait for a GPU, and their count is a data-dependent shape for torch.compile), and not with caches.
        """
        P = patches.shape[1]
        packed = Packing.of(real) if real is not None and caches is None else None
        if packed is not None:
            patches = packed.pack(patches)  # (1, N, k * D_E)
        h = self.input_projection(patches) if self.input_projection is not None else patches
        positions = torch.arange(start, start + P, device=patches.device)  # (P,) patch indices
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta, compute_dtype(h))  # (P, Dh)
        # --- solution: lesson 5: causal mask over patches (paper §3.1) ---
        mask = None if caches else causal_mask(positions, positions)  # (1, 1, P, P) causal over patches
        # --- end solution ---
        for i, layer in enumerate(self.layers):
            h = layer(h, mask, cos, sin, caches[i] if caches else None, positions, packed)
        h = packed.unpack(h) if packed is not None else h  # (B, P, D_G)
        return h  # released code: no final norm after the last layer (paper §3.1 does not specify one)

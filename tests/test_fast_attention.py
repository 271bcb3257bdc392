"""The fast paths of layers.py against their references: no float32 round trips under bf16 autocast, and
the explicit bf16 attention path against float32."""
import torch

import layers
from layers import TransformerBlock, rope_cos_sin


# ---- bf16 ----

def test_no_float32_round_trips_under_bf16_autocast():
    """Under bf16 autocast the RoPE tables, the normed activations and the rotated queries are bf16."""
    block = TransformerBlock(32, 4, 64)
    x = torch.randn(2, 10, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos, sin = rope_cos_sin(torch.arange(10), 8, 10000.0, layers.compute_dtype(x))
        assert cos.dtype == sin.dtype == torch.bfloat16
        normed = block.attention_norm(x)
        assert normed.dtype == torch.bfloat16
        q = block.attention.wq(normed).view(2, 10, 4, 8).transpose(1, 2)
        assert layers.apply_rope(q, cos, sin).dtype == torch.bfloat16
    assert layers.compute_dtype(x) == torch.float32

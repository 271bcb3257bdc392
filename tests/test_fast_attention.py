"""The fast paths of layers.py against their references: no float32 round trips under bf16 autocast, and
the explicit bf16 attention path against float32."""
import torch

import layers
from layers import TransformerBlock, attend, rope_cos_sin


# ---- bf16 ----

def test_bf16_training_attention_matches_float32():
    """In bf16 with gradients on CPU, `attend` runs the explicit matmul-softmax path: close to float32, and
    a query with nothing allowed still gets 0 and finite gradients."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 9, 16), torch.randn(2, 2, 11, 16), torch.randn(2, 2, 11, 16)
    mask = torch.rand(2, 1, 9, 11) > 0.4
    mask[0, 0, 4] = False
    want = attend(q, k, v, mask)
    q16, k16, v16 = (x.bfloat16().requires_grad_() for x in (q, k, v))
    got = attend(q16, k16, v16, mask)
    assert got.dtype == torch.bfloat16 and torch.all(got[0, :, 4] == 0)
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)
    got.float().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q16, k16, v16))


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

"""Shared blocks checked against naive references."""
import math

import pytest
import torch

from layers import CrossAttention, KVCache, TransformerBlock, apply_rope, attend, causal_mask, rope_cos_sin


def naive_attention(q, k, v, mask):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.nan_to_num(scores.softmax(-1)) @ v


def test_attend_matches_naive_masked_softmax():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)
    mask = torch.rand(2, 1, 7, 9) > 0.4
    mask[0, 0, 2] = False  # a query that may attend nothing
    out = attend(q, k, v, mask)
    assert torch.allclose(out, naive_attention(q, k, v, mask), atol=1e-5)
    assert torch.all(out[0, :, 2] == 0)


def test_causal_window_mask():
    pos = torch.arange(6)
    m = causal_mask(pos, pos, window=3)[0, 0].int()
    assert m.tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                          [0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]]


def test_rope_is_relative_and_interleaved():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 1, 16), torch.randn(1, 1, 1, 1, 16)  # (B, T, n, H, Dh)

    def score(i, j):
        ci, si = rope_cos_sin(torch.tensor([i]), 16, 10000.0)
        cj, sj = rope_cos_sin(torch.tensor([j]), 16, 10000.0)
        return (apply_rope(q, ci, si) * apply_rope(k, cj, sj)).sum()

    assert torch.allclose(score(3, 1), score(10, 8), atol=1e-4)  # depends on i - j only
    # pair (x0, x1) rotates by angle = position at frequency 1: (1, 0) at position 1 -> (cos 1, sin 1)
    x = torch.zeros(1, 1, 1, 1, 16)
    x[..., 0] = 1.0
    c, s = rope_cos_sin(torch.tensor([1]), 16, 10000.0)
    y = apply_rope(x, c, s)[0, 0, 0, 0]
    assert torch.allclose(y[:2], torch.tensor([math.cos(1.0), math.sin(1.0)]), atol=1e-6)


def test_rope_complex_product_equals_the_real_rotation():
    """float32 rotates pairs as complex numbers, bf16 with the real formula: the same rotation, per batch row
    too ((B, T, Dh) tables), and gradients flow through both."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 2, 3, 8, dtype=torch.float64, requires_grad=True)  # (B, T, n, H, Dh)
    cos, sin = rope_cos_sin(torch.randint(0, 50, (2, 5)), 8, 10000.0, torch.float64)  # (B, T, Dh)
    pairs = x.unflatten(-1, (-1, 2))
    real = torch.stack([pairs[..., 0] * cos[:, :, None, None, ::2] - pairs[..., 1] * sin[:, :, None, None, ::2],
                        pairs[..., 0] * sin[:, :, None, None, ::2] + pairs[..., 1] * cos[:, :, None, None, ::2]],
                       dim=-1).flatten(-2)
    out = apply_rope(x, cos, sin)
    assert torch.allclose(out, real, atol=1e-12)
    (grad,) = torch.autograd.grad((out * torch.arange(out.numel()).view_as(out)).sum(), x)
    (expected,) = torch.autograd.grad((real * torch.arange(real.numel()).view_as(real)).sum(), x)
    assert torch.allclose(grad, expected, atol=1e-9)
    bf16 = apply_rope(x.detach().bfloat16(), cos.bfloat16(), sin.bfloat16())  # the real path
    assert bf16.dtype == torch.bfloat16 and torch.allclose(bf16.double(), real, atol=0.1)


def test_a_block_with_folded_norm_weights_computes_the_unfolded_block():
    """TransformerBlock folds each RMSNorm's weight into the fused matrix that reads it; the result equals the
    block written out with every module applied on its own: norm, then wq, wk, wv, then w1, w3, w2."""
    torch.manual_seed(0)
    block = TransformerBlock(32, 4, 64).double()
    for norm in (block.attention_norm, block.ffn_norm):
        torch.nn.init.uniform_(norm.weight, 0.5, 1.5)  # not all ones, or folding them would change nothing
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    pos = torch.arange(9)
    cos, sin = rope_cos_sin(pos, 8, 10000.0, torch.float64)
    mask = causal_mask(pos, pos)
    a = block.attention
    h = block.attention_norm(x)
    q, k, v = (w(h).view(2, 9, 1, 4, 8) for w in (a.wq, a.wk, a.wv))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q, k, v = (t[:, :, 0].transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)
    x1 = x + a.wo(naive_attention(q, k, v, mask).transpose(1, 2).reshape(2, 9, 32))
    f = block.feed_forward
    h = block.ffn_norm(x1)
    expected = x1 + f.w2(torch.nn.functional.silu(f.w1(h)) * f.w3(h))
    assert torch.allclose(block(x, mask, cos, sin), expected, atol=1e-10)


def test_cross_attention_with_folded_norm_weights_computes_the_unfolded_one():
    """CrossAttention folds its query and key/value norms' weights into wq and into the stacked wk|wv; the result
    equals norm, then each projection on its own, masked attention, wo, plus the queries (the released quirk)."""
    torch.manual_seed(0)
    cross = CrossAttention(16, 2).double()
    for norm in (cross.query_norm, cross.kv_norm):
        torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    queries, keys_values = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 7, 16, dtype=torch.float64)
    mask = torch.rand(2, 1, 5, 7) > 0.5
    mask[..., 0] = True  # every query reads at least one key
    q = cross.wq(cross.query_norm(queries)).view(2, 5, 2, 8).transpose(1, 2)
    kv = cross.kv_norm(keys_values)
    k, v = (w(kv).view(2, 7, 2, 8).transpose(1, 2) for w in (cross.wk, cross.wv))
    expected = cross.wo(naive_attention(q, k, v, mask).transpose(1, 2).reshape(2, 5, 16)) + queries
    assert torch.allclose(cross(queries, keys_values, mask), expected, atol=1e-10)


def test_kv_cache_with_sliding_window_matches_full_forward():
    torch.manual_seed(0)
    block = TransformerBlock(32, 4, 64)
    x = torch.randn(2, 20, 32)
    pos = torch.arange(20)
    cos, sin = rope_cos_sin(pos, 8, 10000.0)
    full = block(x, causal_mask(pos, pos, 5), cos, sin)
    cache = KVCache(window=5)
    chunks = [block(x[:, :2], None, cos[:2], sin[:2], cache, pos[:2])]  # a chunk shorter than the window
    for t in range(2, 20):
        chunks.append(block(x[:, t:t + 1], None, cos[t:t + 1], sin[t:t + 1], cache, pos[t:t + 1]))
    assert torch.allclose(torch.cat(chunks, 1), full, atol=1e-5)
    assert cache.k.shape[2] <= 5  # only the window is kept


def test_a_missing_mask_is_named():
    """mask=None without a cache (a forgotten mask) is refused with a message about the mask, not an error
    from deep inside the attention."""
    block = TransformerBlock(16, 2, 32)
    cos, sin = rope_cos_sin(torch.arange(5), 8, 10000.0)
    with pytest.raises(ValueError, match="needs a mask"):
        block(torch.randn(1, 5, 16), None, cos, sin)


def test_packed_global_transformer_computes_the_padded_one_on_real_patches():
    """Rows with different patch counts are right-padded; packed (layers.Packing), only the real patches run
    through the layers. Their outputs and every gradient equal the padded run's; the padding's outputs are 0."""
    from blt import cpu_tiny
    from global_transformer import GlobalTransformer
    torch.manual_seed(0)
    model = GlobalTransformer(cpu_tiny(local_dim=16, global_dim=48, global_layers=2, global_heads=2, multiple_of=16))
    patches = torch.randn(3, 7, 32)
    real = torch.arange(7) < torch.tensor([7, 2, 5])[:, None]  # (B, P): 7, 2 and 5 real patches
    padded = model(patches)
    grads = torch.autograd.grad((padded * real[..., None]).square().sum(), list(model.parameters()))
    packed = model(patches, real=real)
    assert torch.allclose(packed[real], padded[real], atol=1e-5)
    assert torch.all(packed[~real] == 0)
    for g_packed, g in zip(torch.autograd.grad(packed.square().sum(), list(model.parameters())), grads):
        assert torch.allclose(g_packed, g, atol=1e-5)
    packing = []
    model.layers[0].attention.register_forward_pre_hook(lambda m, args, kwargs: packing.append(kwargs["packed"]),
                                                        with_kwargs=True)
    model(patches, real=real)
    model(patches, real=torch.ones(3, 7, dtype=torch.bool))
    assert packing[0] is not None and packing[0].rows.numel() == 14 and packing[1] is None  # none to drop: no packing

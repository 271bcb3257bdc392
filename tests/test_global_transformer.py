"""The global latent transformer is causal over patches (paper §3.1): o_j depends on patches 0..j, all of them,
and on nothing later. Every test here grades lesson 5 (exercises.md, `python -m pytest -m lesson5`); the
patch representations are random, so the encoder (lessons 3-4) is not needed."""
import pytest
import torch

from blt import cpu_tiny
from compare import assert_close
from global_transformer import GlobalTransformer
from layers import KVCache

pytestmark = pytest.mark.lesson5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # k * local_dim = 32 differs from global_dim = 48, so the input projection is used too
    cfg = cpu_tiny(local_dim=16, cross_attn_k=2, global_dim=48, global_layers=2, global_heads=2, multiple_of=16)
    return GlobalTransformer(cfg).eval()


@pytest.fixture(scope="module")
def patches():
    return torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_output_of_a_prefix_is_the_prefix_of_the_output(model, patches):
    """o_j = G(p_0, ..., p_j): running the model on the first j+1 patches gives the same o_j."""
    out = model(patches)
    assert out.shape == (2, 10, 48)
    for j in range(10):
        assert_close(model(patches[:, :j + 1]), out[:, :j + 1], what=f"outputs from the first {j + 1} patches")


@torch.no_grad()
def test_later_patches_never_reach_earlier_outputs(model, patches):
    out = model(patches)
    for j in range(10):
        moved = patches.clone()
        moved[:, j] += torch.randn(32)
        diff = (model(moved) - out).abs().amax(-1)  # (B, P)
        if j:
            assert diff[:, :j].max() <= 1e-5, f"patch {j} reached an earlier output"
        assert diff[:, j:].min() > 1e-4  # ... and it reaches its own and every later one


@torch.no_grad()
def test_every_earlier_patch_is_seen(model, patches):
    """Causal, not local: the first patch still matters to the last output (no window, no diagonal mask)."""
    out = model(patches)
    moved = patches.clone()
    moved[:, 0] += torch.randn(32)
    assert (model(moved) - out).abs().amax(-1).min() > 1e-4


@torch.no_grad()
def test_one_patch_at_a_time_with_caches(model, patches):
    """The sampler runs the global model once per completed patch with KV caches: same outputs."""
    out = model(patches)
    caches = [KVCache(None) for _ in model.layers]
    steps = [model(patches[:, j:j + 1], caches, start=j) for j in range(10)]
    assert_close(torch.cat(steps, dim=1), out, what="outputs one patch at a time with caches")

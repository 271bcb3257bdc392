"""Stage 4 (exercises.md): the encoder's pooling and patch cross-attention (paper §3.2.2), against a naive
loop that treats one patch at a time. Graded by `python -m pytest -m stage4`; the byte states are random,
so the encoder's embedding (stage 3) and layers are not needed."""
import pytest
import torch

from blt import cpu_tiny
from encoder import LocalEncoder
from patching import patch_ids_from_lengths

pytestmark = pytest.mark.stage4

D, K = 16, 2


def make_encoder(k: int = K) -> LocalEncoder:
    torch.manual_seed(0)
    return LocalEncoder(cpu_tiny(local_dim=D, local_heads=2, hash_buckets=64, multiple_of=16, cross_attn_k=k)).eval()


def naive_pool(enc: LocalEncoder, h: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """One patch at a time. h: (T, D) byte states of one row; lengths: patch lengths (summing to T+1 with
    the next-byte slot, right-padded with 0). Returns (P, k*D).

    Patch j: query = max over its bytes of h, projected to k vectors; those k queries attend to the bytes of
    patch j and nothing else; output = query + cross_attn(...) (the released doubled residual). A patch with
    no byte (padding, or only the next-byte slot) gives zeros."""
    T, k = h.shape[0], enc.k
    out, pos = [], 0
    for n in lengths:
        own = h[pos:min(pos + n, T)]  # (n', D) the bytes of this patch
        pos += n
        if len(own) == 0:
            out.append(torch.zeros(k * D))
            continue
        queries = enc.patch_projection(own.max(dim=0).values).view(1, k, D)  # (1, k, D)
        everything = torch.ones(1, 1, k, len(own), dtype=torch.bool)  # only its own bytes are given
        out.append((queries + enc.cross_attn(queries, own[None], everything)).reshape(k * D))
    return torch.stack(out)


@torch.no_grad()
@pytest.mark.parametrize("k", [1, 2, 3])
def test_pool_matches_one_patch_at_a_time(k):
    enc = make_encoder(k)
    h = torch.randn(1, 12, D)
    lengths = [1, 4, 5, 3]  # 13 = 12 bytes + the next-byte slot; the last patch holds bytes 10, 11 and the slot
    got = enc.pool(h, patch_ids_from_lengths(torch.tensor([lengths]), 12), len(lengths))
    assert got.shape == (1, 4, k * D)
    assert torch.allclose(got[0], naive_pool(enc, h[0], lengths), atol=1e-5)


@torch.no_grad()
def test_ragged_batch_and_empty_patches():
    enc = make_encoder()
    h = torch.randn(2, 10, D)
    lengths = torch.tensor([[1, 2, 2, 2, 2, 2], [1, 5, 4, 1, 0, 0]])  # row 1: a slot-only patch, 2 padding
    got = enc.pool(h, patch_ids_from_lengths(lengths, 10), 6)
    assert torch.isfinite(got).all()  # a patch with no byte attends to nothing: zeros, not NaN
    for b in range(2):
        assert torch.allclose(got[b], naive_pool(enc, h[b], lengths[b].tolist()), atol=1e-5)
    assert torch.all(got[1, 3:] == 0)


@torch.no_grad()
def test_each_patch_reads_only_its_own_bytes():
    enc = make_encoder()
    h = torch.randn(1, 12, D)
    lengths = torch.tensor([[1, 4, 5, 3]])
    ids = patch_ids_from_lengths(lengths, 12)
    base = enc.pool(h, ids, 4)
    for t in range(12):
        moved_h = h.clone()
        moved_h[0, t] += torch.randn(D)
        changed = (enc.pool(moved_h, ids, 4) - base).abs().amax(-1)[0] > 1e-6  # (P,)
        assert changed.nonzero().flatten().tolist() == [ids[0, t].item()], f"byte {t}"

"""The local encoder: hash n-gram embeddings (paper §3.2.1, eqs. 5-6), against a Python big-integer reference
of the released hash, and the pooling and patch cross-attention (§3.2.2), against a naive loop that treats one
patch at a time. The tests marked lesson3 grade lesson 3 (exercises.md, `python -m pytest -m lesson3`):
the encoder is only built, its layers and cross-attention are not run. Those marked lesson4 grade lesson 4:
the byte states are random, so they need neither the embedding (lesson 3) nor the encoder's layers, except
test_forward_shapes, which runs the whole encoder."""
import pytest
import torch

from blt import cpu_tiny
from compare import assert_close
from encoder import HASH_PRIMES, LocalEncoder, hash_ngram_ids
from patching import patch_ids_from_lengths


# ---- lesson 3: hash n-gram ids and embeddings ----

def reference_hash(window: list[int], prime: int, buckets: int) -> int:
    """sum_m window[m] * prime^m (oldest id times prime^0), wrapped to signed int64, then a non-negative
    remainder, as the released code computes it in int64 tensors."""
    h = sum(g * prime**m for m, g in enumerate(window))
    h = (h + 2**63) % 2**64 - 2**63
    return h % buckets


def reference_ids(row: list[int], n: int, prime: int, buckets: int) -> list[int]:
    padded = [0] * (n - 1) + row  # the first windows are left-padded with id 0
    return [reference_hash(padded[i:i + n], prime, buckets) for i in range(len(row))]


@pytest.mark.lesson3
def test_hand_computed_values():
    # ids [1, 5, 6], n = 3, 1000 buckets, prime P = 1000000007. Windows (0, 0, 1), (0, 1, 5), (1, 5, 6):
    #   1 * P^2              = 1000000014000000049 -> 49
    #   1 * P + 5 * P^2      = 5000000071000000252 -> 252
    #   1 + 5 * P + 6 * P^2  = 6000000089000000330 -> 330
    ids = hash_ngram_ids(torch.tensor([[1, 5, 6]]), n=3, buckets=1000)
    assert ids.dtype == torch.int64 and ids.tolist() == [[49, 252, 330]]


@pytest.mark.lesson3
def test_matches_reference_for_every_size_and_prime():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 260, (2, 30), generator=g)
    for f in (0, 1, 5, 10):
        for n in (1, 2, 3, 5, 8):
            for buckets in (64, 500002):
                got = hash_ngram_ids(tokens, n, buckets, hash_function=f)
                assert got.shape == tokens.shape
                for b in range(2):
                    assert got[b].tolist() == reference_ids(tokens[b].tolist(), n, HASH_PRIMES[f], buckets), (f, n)


@pytest.mark.lesson3
def test_int64_wrap_around():
    # at n = 8 with large ids the exact sum exceeds 2^63: the released hash wraps, and so must ours
    window = [259] * 8
    exact = sum(g * HASH_PRIMES[0]**m for m, g in enumerate(window))
    assert exact >= 2**63 and reference_hash(window, HASH_PRIMES[0], 500002) != exact % 500002
    got = hash_ngram_ids(torch.tensor([window]), 8, 500002)[0, -1].item()
    assert got == reference_hash(window, HASH_PRIMES[0], 500002)
    ids = hash_ngram_ids(torch.randint(200, 260, (3, 50)), 8, 500002)
    assert ((ids >= 0) & (ids < 500002)).all()  # non-negative even when the wrapped sum is negative


@pytest.mark.lesson3
def test_embedding_is_byte_plus_every_table():
    """e_i = x_i + sum over (hash function, n) of E_{f,n}[hash id], one table per (f, n) in that order (f
    outer). Released convention: no division by the number of terms (paper eq. 6 divides)."""
    torch.manual_seed(0)
    cfg = cpu_tiny(local_dim=16, local_heads=2, hash_ngram_sizes=(3, 4, 6), hash_buckets=64, hash_functions=2,
                   multiple_of=16)
    enc = LocalEncoder(cfg)
    for table in enc.hash_embeddings:
        torch.nn.init.normal_(table.weight)  # distinct tables, so the order matters
    tokens = torch.randint(4, 260, (2, 11))
    with torch.no_grad():
        got = enc.embed(tokens)
        assert got.shape == (2, 11, 16)
        for b in range(2):
            row = tokens[b].tolist()
            want = enc.tok_embeddings.weight[tokens[b]].clone()
            t = 0
            for f in range(2):
                for n in (3, 4, 6):
                    ids = reference_ids(row, n, HASH_PRIMES[f], 64)
                    want += enc.hash_embeddings[t].weight[ids]
                    t += 1
            assert_close(got[b], want, atol=1e-5, what=f"embedding of row {b}")


@pytest.mark.lesson3
def test_embedding_without_hashes_is_the_byte_embedding():
    enc = LocalEncoder(cpu_tiny(local_dim=16, local_heads=2, hash_ngram_sizes=(), multiple_of=16))
    tokens = torch.randint(4, 260, (1, 9))
    with torch.no_grad():
        assert torch.equal(enc.embed(tokens), enc.tok_embeddings(tokens))


# ---- lesson 4: pooling and patch cross-attention ----

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


@pytest.mark.lesson4
@torch.no_grad()
@pytest.mark.parametrize("k", [1, 2, 3])
def test_pool_matches_one_patch_at_a_time(k):
    enc = make_encoder(k)
    h = torch.randn(1, 12, D)
    lengths = [1, 4, 5, 3]  # 13 = 12 bytes + the next-byte slot; the last patch holds bytes 10, 11 and the slot
    got = enc.pool(h, patch_ids_from_lengths(torch.tensor([lengths]), 12), len(lengths))
    assert got.shape == (1, 4, k * D)
    assert_close(got[0], naive_pool(enc, h[0], lengths), atol=1e-5, what="pooled patches (patch, k*D)")


@pytest.mark.lesson4
@torch.no_grad()
def test_ragged_batch_and_empty_patches():
    enc = make_encoder()
    h = torch.randn(2, 10, D)
    lengths = torch.tensor([[1, 2, 2, 2, 2, 2], [1, 5, 4, 1, 0, 0]])  # row 1: a slot-only patch, 2 padding
    got = enc.pool(h, patch_ids_from_lengths(lengths, 10), 6)
    assert torch.isfinite(got).all()  # a patch with no byte attends to nothing: zeros, not NaN
    for b in range(2):
        assert_close(got[b], naive_pool(enc, h[b], lengths[b].tolist()), atol=1e-5, what=f"pooled patches of row {b}")
    assert torch.all(got[1, 3:] == 0)


@pytest.mark.lesson4
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


@pytest.mark.lesson4
@torch.no_grad()
def test_forward_shapes():
    """The whole encoder: byte states (B, T, D) and one vector of k slots per patch (B, P, k*D)."""
    enc = make_encoder()
    lengths = torch.tensor([[1, 4, 5, 3]])  # 13 = 12 bytes + the next-byte slot
    h, patches = enc(torch.randint(4, 260, (1, 12)), lengths)
    assert h.shape == (1, 12, D) and patches.shape == (1, 4, K * D)
    assert_close(patches, enc.pool(h, patch_ids_from_lengths(lengths, 12), 4), atol=1e-8, what="forward's patches")

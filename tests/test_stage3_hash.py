"""Stage 3 (exercises.md): hash n-gram ids and embeddings (paper §3.2.1, eqs. 5-6), against a Python
big-integer reference of the released hash. Graded by `python -m pytest -m stage3`; uses nothing from
other stages (the encoder is only built, its layers and cross-attention are not run)."""
import pytest
import torch

from blt import cpu_tiny
from encoder import HASH_PRIMES, LocalEncoder, hash_ngram_ids

pytestmark = pytest.mark.stage3


def reference_hash(window: list[int], prime: int, buckets: int) -> int:
    """sum_m window[m] * prime^m (oldest id times prime^0), wrapped to signed int64, then a non-negative
    remainder, as the released code computes it in int64 tensors."""
    h = sum(g * prime**m for m, g in enumerate(window))
    h = (h + 2**63) % 2**64 - 2**63
    return h % buckets


def reference_ids(row: list[int], n: int, prime: int, buckets: int) -> list[int]:
    padded = [0] * (n - 1) + row  # the first windows are left-padded with id 0
    return [reference_hash(padded[i:i + n], prime, buckets) for i in range(len(row))]


def test_hand_computed_values():
    # ids [1, 5, 6], n = 3, 1000 buckets, prime P = 1000000007. Windows (0, 0, 1), (0, 1, 5), (1, 5, 6):
    #   1 * P^2              = 1000000014000000049 -> 49
    #   1 * P + 5 * P^2      = 5000000071000000252 -> 252
    #   1 + 5 * P + 6 * P^2  = 6000000089000000330 -> 330
    ids = hash_ngram_ids(torch.tensor([[1, 5, 6]]), n=3, buckets=1000)
    assert ids.dtype == torch.int64 and ids.tolist() == [[49, 252, 330]]


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


def test_int64_wrap_around():
    # at n = 8 with large ids the exact sum exceeds 2^63: the released hash wraps, and so must ours
    window = [259] * 8
    exact = sum(g * HASH_PRIMES[0]**m for m, g in enumerate(window))
    assert exact >= 2**63 and reference_hash(window, HASH_PRIMES[0], 500002) != exact % 500002
    got = hash_ngram_ids(torch.tensor([window]), 8, 500002)[0, -1].item()
    assert got == reference_hash(window, HASH_PRIMES[0], 500002)
    ids = hash_ngram_ids(torch.randint(200, 260, (3, 50)), 8, 500002)
    assert ((ids >= 0) & (ids < 500002)).all()  # non-negative even when the wrapped sum is negative


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
            assert torch.allclose(got[b], want, atol=1e-5)


def test_embedding_without_hashes_is_the_byte_embedding():
    enc = LocalEncoder(cpu_tiny(local_dim=16, local_heads=2, hash_ngram_sizes=(), multiple_of=16))
    tokens = torch.randint(4, 260, (1, 9))
    with torch.no_grad():
        assert torch.equal(enc.embed(tokens), enc.tok_embeddings(tokens))

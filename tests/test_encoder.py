"""Hash n-gram embeddings (paper section 3.2.1) and the encoder's patch cross-attention (section 3.2.2)."""
import torch

from blt import cpu_tiny
from encoder import HASH_PRIMES, LocalEncoder, hash_ngram_ids
from patching import patch_ids_from_lengths

P0 = 1000000007  # first released prime


def reference_hash(window: list[int], prime: int, buckets: int) -> int:
    """Python big-int reference of the released hash: wrap to signed int64, then a non-negative modulo."""
    h = sum(g * prime**m for m, g in enumerate(window))
    h = (h + 2**63) % 2**64 - 2**63  # int64 wrap-around
    return h % buckets


def test_hash_known_values_small_input():
    # ids [1, 5, 6], n = 3, 1000 buckets. Windows are left-padded with id 0:
    #   (0, 0, 1): 1 * P0^2                 = 1000000014000000049 -> 49
    #   (0, 1, 5): 1 * P0 + 5 * P0^2        = 5000000071000000252 -> 252
    #   (1, 5, 6): 1 + 5 * P0 + 6 * P0^2    = 6000000089000000330 -> 330
    ids = hash_ngram_ids(torch.tensor([[1, 5, 6]]), n=3, buckets=1000)
    assert ids.tolist() == [[49, 252, 330]]


def test_hash_zero_padding_at_start():
    tokens = torch.tensor([[7, 8, 9, 10]])
    for n in (3, 5, 8):
        ids = hash_ngram_ids(tokens, n, buckets=10**9 + 9)[0].tolist()
        padded = [0] * (n - 1) + tokens[0].tolist()
        assert ids == [reference_hash(padded[i:i + n], P0, 10**9 + 9) for i in range(4)]
        # the first position only sees its own id behind n-1 zeros: id * P0^(n-1)
        assert ids[0] == reference_hash([0] * (n - 1) + [7], P0, 10**9 + 9)


def test_hash_int64_wraparound_and_other_primes():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 260, (2, 40), generator=g)
    for f in (0, 1, 4, 10):
        for n in (3, 6, 8):
            got = hash_ngram_ids(tokens, n, buckets=500002, hash_function=f)
            for b in range(2):
                padded = [0] * (n - 1) + tokens[b].tolist()
                want = [reference_hash(padded[i:i + n], HASH_PRIMES[f], 500002) for i in range(40)]
                assert got[b].tolist() == want
    # at n = 8 the products overflow int64: the unwrapped value would give a different bucket
    window = [259] * 8
    exact = sum(g * P0**m for m, g in enumerate(window))
    assert exact >= 2**63 and reference_hash(window, P0, 500002) != exact % 500002
    assert hash_ngram_ids(torch.tensor([window]), 8, 500002)[0, -1] == reference_hash(window, P0, 500002)


def test_patch_cross_attention_reads_only_own_bytes():
    torch.manual_seed(0)
    enc = LocalEncoder(cpu_tiny(local_dim=32, local_heads=2, hash_buckets=64, multiple_of=16))
    tokens = torch.randint(4, 260, (1, 12))
    lengths = torch.tensor([[1, 4, 5, 3]])  # 13 = 12 bytes + slot
    h, patches = enc(tokens, lengths)
    assert h.shape == (1, 12, 32) and patches.shape == (1, 4, 2 * 32)
    # changing a byte's state in patch 2 (positions 5..9) changes patch 2 only
    ids = patch_ids_from_lengths(lengths, 12)
    h2 = h.clone()
    h2[0, 7] += 1.0
    out1, out2 = enc.pool(h, ids, 4), enc.pool(h2, ids, 4)
    changed = (out1 - out2).abs().amax(-1)[0]
    assert changed[2] > 1e-4
    assert torch.all(changed[[0, 1, 3]] == 0)
    # an empty (padding) patch pools to zeros and attends to nothing: a zero vector, not NaN
    out = enc.pool(h, ids, 5)
    assert torch.all(out[0, 4] == 0) and torch.isfinite(out).all()

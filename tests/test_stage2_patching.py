"""Stage 2 (exercises.md): the patching rules (paper §2): space patching (§2.2), the global and monotonic
entropy rules (§2.3, eq. 4), the maximum patch length, and patch lengths from starts. Hand-computed
examples, a naive per-byte reference, and incrementality (§2.4). Graded by `python -m pytest -m stage2`;
the entropies here are made up, so nothing from stage 1 or later is needed."""
import random

import pytest
import torch

from patching import (entropy_patch_starts, is_space_like, lengths_from_starts, limit_patch_length,
                      space_patch_starts, tokenize)

pytestmark = pytest.mark.stage2


# ---- naive references: one position at a time, plain Python ----

def naive_space_starts(ids: list[int]) -> list[bool]:
    """T ids -> T+1 starts: 0 and 1 always; t >= 2 starts when byte t-1 is space-like and byte t-2 is not."""
    space = [bool(is_space_like(torch.tensor(i))) for i in ids]
    return [True, True] + [space[t - 1] and not space[t - 2] for t in range(2, len(ids) + 1)]


def naive_entropy_starts(H: list[float], theta: float, monotonic: bool) -> list[bool]:
    """The entropy at position j decides whether position j+1 starts a patch."""
    starts = [True, True] + [False] * (len(H) - 1)
    for j in range(len(H)):
        if monotonic:
            if j >= 1 and H[j] - H[j - 1] > theta:
                starts[j + 1] = True
        elif H[j] > theta:
            starts[j + 1] = True
    return starts


def naive_limit(starts: list[bool], max_len: int) -> list[bool]:
    """Chunks of max_len counted from each patch's own start."""
    out, last = [], 0
    for i, s in enumerate(starts):
        if s:
            last = i
        out.append(s or (i > last and (i - last) % max_len == 0))
    return out


def naive_lengths(starts: list[bool]) -> list[int]:
    positions = [i for i, s in enumerate(starts) if s] + [len(starts)]
    return [b - a for a, b in zip(positions, positions[1:])]


def as_lists(t: torch.Tensor) -> list:
    return [[bool(x) for x in row] for row in t]


# ---- hand-computed examples ----

def test_worked_example_global_rule():
    # README "conventions": positions 0, 1 always start; H[3] = 2 > 1 starts position 4; H[7] = 2 > 1 starts
    # position 8, the next-byte slot.
    H = torch.tensor([[3.0, .1, .1, 2.0, .1, .1, .1, 2.0]])
    starts = entropy_patch_starts(H, 1.0)
    assert starts.dtype == torch.bool and starts.shape == (1, 9)
    assert starts.long().tolist() == [[1, 1, 0, 0, 1, 0, 0, 0, 1]]
    assert lengths_from_starts(starts).tolist() == [[1, 3, 4, 1]]


def test_global_and_monotonic_rules_differ():
    H = torch.tensor([[3.0, .1, 2.5, 2.6, .1, .1, .1, 2.0]])
    # global: H[0], H[2], H[3], H[7] > 1 -> positions 1, 3, 4, 8
    assert entropy_patch_starts(H, 1.0).long().tolist() == [[1, 1, 0, 1, 1, 0, 0, 0, 1]]
    # monotonic: H[2] - H[1] = 2.4 and H[7] - H[6] = 1.9 exceed 1; H[3] - H[2] = 0.1 does not -> 3, 8
    assert entropy_patch_starts(H, 1.0, monotonic=True).long().tolist() == [[1, 1, 0, 1, 0, 0, 0, 0, 1]]


def test_space_patching_example():
    #      B  H  i  _  t  h  e  r  e  ,  _  y  o  u  .  slot
    #      0  1  2  3  4  5  6  7  8  9 10 11 12 13 14  15
    # 4: after "i " ; 10: after "e," ; 11: no, "," is space-like too ; 15: after "u."
    tokens = torch.tensor([tokenize(b"Hi there, you.")])
    starts = space_patch_starts(tokens)
    assert starts.shape == (1, 16)
    assert starts.nonzero()[:, 1].tolist() == [0, 1, 4, 10, 15]
    assert lengths_from_starts(starts).tolist() == [[1, 3, 6, 5, 1]]  # [BOS] "Hi " "there," " you." [slot]


def test_space_patching_utf8_and_runs():
    # "é" = c3 a9: the lead byte c3 is space-like, the continuation byte a9 is not
    # B  c  a  f  c3 a9 _  _  o  k  slot
    # 0  1  2  3  4  5  6  7  8  9  10
    # 5: after "f", c3 ; 7: after a9, " " ; 8: no, the second space follows a space-like byte ; 10: no
    tokens = torch.tensor([tokenize("café  ok".encode())])
    assert space_patch_starts(tokens).nonzero()[:, 1].tolist() == [0, 1, 5, 7]


def test_max_patch_length():
    starts = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert lengths_from_starts(limit_patch_length(starts, 3)).tolist() == [[1, 3, 3, 3]]
    # chunks count from each patch's own start: 1, 3 | 5 (a start), 7, 9, 11
    starts = torch.tensor([[1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert lengths_from_starts(limit_patch_length(starts, 2)).tolist() == [[1, 2, 2, 2, 2, 2, 1]]
    assert torch.equal(limit_patch_length(starts, None), starts)
    assert torch.equal(limit_patch_length(starts, 100), starts)


def test_lengths_are_right_padded_per_row():
    starts = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    lengths = lengths_from_starts(starts)
    assert lengths.dtype == torch.long
    assert lengths.tolist() == [[1, 2, 2, 0, 0], [1, 1, 1, 1, 1]]


# ---- against the naive references, and incrementality, on random inputs ----

def random_rows(seed: int, rows: int = 3, T: int = 40):
    rng = random.Random(seed)
    alphabet = list(b"abc xyz,.;!  09") + list("éü東".encode()) + [rng.randrange(256) for _ in range(8)]
    tokens = torch.tensor([tokenize(bytes(rng.choice(alphabet) for _ in range(T - 1))) for _ in range(rows)])
    H = torch.tensor([[rng.choice([0.1, 0.5, 1.0, 1.5, 2.5, 4.0]) * rng.random() * 2 for _ in range(T)]
                      for _ in range(rows)])
    return tokens, H


@pytest.mark.parametrize("seed", range(4))
def test_rules_match_naive_reference(seed):
    tokens, H = random_rows(seed)
    assert as_lists(space_patch_starts(tokens)) == [naive_space_starts(r.tolist()) for r in tokens]
    for monotonic in (False, True):
        for theta in (0.3, 1.0, 2.0):
            got = entropy_patch_starts(H, theta, monotonic)
            assert as_lists(got) == [naive_entropy_starts(r.tolist(), theta, monotonic) for r in H]
            for max_len in (1, 2, 5):
                limited = limit_patch_length(got, max_len)
                want = [naive_limit(r, max_len) for r in as_lists(got)]
                assert as_lists(limited) == want
                lengths = lengths_from_starts(limited)
                assert (lengths.sum(dim=1) == H.shape[1] + 1).all()  # T + 1: the next-byte slot
                for row, w in zip(lengths.tolist(), want):
                    assert row[:len(naive_lengths(w))] == naive_lengths(w)
                    assert all(n == 0 for n in row[len(naive_lengths(w)):])  # right padding


@pytest.mark.parametrize("seed", range(2))
def test_incremental(seed):
    """f(x_<i) = f(x)_<i (paper §2.4): patching a prefix gives the prefix of the patching."""
    tokens, H = random_rows(seed, rows=2, T=30)
    for max_len in (None, 3):
        full = {
            "space": limit_patch_length(space_patch_starts(tokens), max_len),
            "entropy": limit_patch_length(entropy_patch_starts(H, 1.0), max_len),
            "monotonic": limit_patch_length(entropy_patch_starts(H, 0.5, True), max_len),
        }
        for i in range(1, tokens.shape[1]):
            prefix = {
                "space": limit_patch_length(space_patch_starts(tokens[:, :i]), max_len),
                "entropy": limit_patch_length(entropy_patch_starts(H[:, :i], 1.0), max_len),
                "monotonic": limit_patch_length(entropy_patch_starts(H[:, :i], 0.5, True), max_len),
            }
            for scheme, starts in prefix.items():
                assert torch.equal(starts, full[scheme][:, :i + 1]), (scheme, max_len, i)

"""Patching (paper §2): the space rule (§2.2), the global and monotonic entropy rules (§2.3, eq. 4), the
maximum patch length, patch lengths from starts, calibration, and incrementality (§2.4) for every scheme.
Hand-computed examples and a naive per-byte reference. The tests marked lesson2 grade lesson 2
(exercises.md, `python -m pytest -m lesson2`); the entropies here are made up, so nothing from lesson 1 or later
is needed. The unmarked ones check code that the course gives (is_space_like, patch_ids_from_lengths)."""
import random

import pytest
import torch

from patching import (average_patch_size, calibrate_threshold, entropy_patch_starts, is_space_like,
                      lengths_from_starts, limit_patch_length, patch_ids_from_lengths, patch_lengths,
                      space_patch_starts, strided_patch_starts, tokenize)


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


def space_patches(text: str) -> list[bytes]:
    """Patch a string with space patching and return the byte string of each patch (BOS and slot dropped)."""
    data = text.encode()
    tokens = torch.tensor([tokenize(data)])
    lengths = [int(n) for n in patch_lengths(tokens, "space")[0] if n > 0]
    out, pos = [], 0
    stream = b"\x00" + data + b"\x00"  # BOS stand-in, bytes, next-byte slot stand-in
    for n in lengths:
        out.append(stream[pos:pos + n])
        pos += n
    assert out[0] == b"\x00" and lengths[0] == 1  # BOS is a patch of its own
    out = out[1:]
    out[-1] = out[-1][:-1]  # drop the slot
    return [p for p in out if p]


# ---- hand-computed examples ----

@pytest.mark.lesson2
def test_worked_example_global_rule():
    # README "conventions": positions 0, 1 always start; H[3] = 2 > 1 starts position 4; H[7] = 2 > 1 starts
    # position 8, the next-byte slot.
    H = torch.tensor([[3.0, .1, .1, 2.0, .1, .1, .1, 2.0]])
    starts = entropy_patch_starts(H, 1.0)
    assert starts.dtype == torch.bool and starts.shape == (1, 9)
    assert starts.long().tolist() == [[1, 1, 0, 0, 1, 0, 0, 0, 1]]
    assert lengths_from_starts(starts).tolist() == [[1, 3, 4, 1]]


@pytest.mark.lesson2
def test_global_and_monotonic_rules_differ():
    H = torch.tensor([[3.0, .1, 2.5, 2.6, .1, .1, .1, 2.0]])
    # global: H[0], H[2], H[3], H[7] > 1 -> positions 1, 3, 4, 8
    assert entropy_patch_starts(H, 1.0).long().tolist() == [[1, 1, 0, 1, 1, 0, 0, 0, 1]]
    # monotonic: H[2] - H[1] = 2.4 and H[7] - H[6] = 1.9 exceed 1; H[3] - H[2] = 0.1 does not -> 3, 8
    assert entropy_patch_starts(H, 1.0, monotonic=True).long().tolist() == [[1, 1, 0, 1, 0, 0, 0, 0, 1]]


@pytest.mark.lesson2
def test_monotonic_rule():
    # byte j+1 starts a patch when H[j] - H[j-1] > theta
    H = torch.tensor([[5.0, 4.0, 3.0, 3.5, 1.0, 0.5, 2.0, 1.9]])
    starts = entropy_patch_starts(H, 0.2, monotonic=True)
    # diffs H[j]-H[j-1] for j=1..7: -1, -1, .5, -2.5, -.5, 1.5, -.1 -> starts at j+1 = 4 and 7
    assert starts.int().tolist() == [[1, 1, 0, 0, 1, 0, 0, 1, 0]]
    assert lengths_from_starts(starts).tolist() == [[1, 3, 3, 2]]


@pytest.mark.lesson2
def test_an_entropy_equal_to_the_threshold_starts_nothing():
    """Both rules compare strictly (eq. 4: H > θ): an entropy, or a rise, exactly equal to θ starts no patch.
    The values are exact in float32, so equality here is exact."""
    H = torch.tensor([[1.0, .5, 1.0, 1.5, .25, 1.25, 2.25]])
    # global, θ = 1: H[3], H[5], H[6] exceed it; H[0] = H[2] = 1.0 are equal -> positions 4, 6, 7
    assert entropy_patch_starts(H, 1.0).long().tolist() == [[1, 1, 0, 0, 1, 0, 1, 1]], \
        "an entropy equal to the threshold must not start a patch (H > θ, not H >= θ)"
    # monotonic, θ = 1: rises -.5, .5, .5, -1.25, 1.0 (equal), 1.0 (equal): none exceeds θ
    assert entropy_patch_starts(H, 1.0, monotonic=True).long().tolist() == [[1, 1, 0, 0, 0, 0, 0, 0]], \
        "a rise equal to the threshold must not start a patch (H[j] - H[j-1] > θ, not >=)"


@pytest.mark.lesson2
def test_global_rule_forces_bos_and_first_byte():
    H = torch.zeros(1, 6)  # nothing above threshold
    assert lengths_from_starts(entropy_patch_starts(H, 1.0)).tolist() == [[1, 6]]


@pytest.mark.lesson2
def test_space_patching_example():
    #      B  H  i  _  t  h  e  r  e  ,  _  y  o  u  .  slot
    #      0  1  2  3  4  5  6  7  8  9 10 11 12 13 14  15
    # 4: after "i " ; 10: after "e," ; 11: no, "," is space-like too ; 15: after "u."
    tokens = torch.tensor([tokenize(b"Hi there, you.")])
    starts = space_patch_starts(tokens)
    assert starts.shape == (1, 16)
    assert starts.nonzero()[:, 1].tolist() == [0, 1, 4, 10, 15]
    assert lengths_from_starts(starts).tolist() == [[1, 3, 6, 5, 1]]  # [BOS] "Hi " "there," " you." [slot]


@pytest.mark.lesson2
def test_space_patching_utf8():
    # "é" = c3 a9: the lead byte c3 is space-like, the continuation byte a9 is not
    # B  c  a  f  c3 a9 _  _  o  k  slot
    # 0  1  2  3  4  5  6  7  8  9  10
    # 5: after "f", c3 ; 7: after a9, " " ; 8: no, the second space follows a space-like byte ; 10: no
    tokens = torch.tensor([tokenize("café  ok".encode())])
    assert space_patch_starts(tokens).nonzero()[:, 1].tolist() == [0, 1, 5, 7]
    # UTF-8 lead bytes are space-like, continuation bytes are not: "ï" = c3 af, "—" = e2 80 94, "東" = e6 9d b1
    patches = space_patches("naïve café — 東京")
    assert b"".join(patches) == "naïve café — 東京".encode()
    # "京" = e4 ba ac. A space-like byte ends a patch only when it follows a non-space-like byte.
    assert patches == [b"na\xc3", b"\xafve ", b"caf\xc3", b"\xa9 ", b"\xe2\x80\x94 ", b"\xe6\x9d\xb1\xe4", b"\xba\xac"]


@pytest.mark.lesson2
def test_space_patching_runs_of_spaces_punctuation_digits():
    assert space_patches("a   b") == [b"a ", b"  b"]
    assert space_patches("wait...!? ok") == [b"wait.", b"..!? ok"]
    assert space_patches("in 1999, 42 cats") == [b"in ", b"1999,", b" 42 ", b"cats"]
    patches = space_patches("x -- y ;; z 12 !!")
    assert patches == [b"x ", b"-- y ", b";; z ", b"12 ", b"!!"]
    # every patch but a trailing run of punctuation holds at least one letter or digit
    for p in patches[:-1]:
        assert any(chr(c).isalnum() for c in p)


def test_space_like_definition():
    ids = torch.tensor(tokenize(bytes(range(256)), bos=False))
    space = is_space_like(ids).tolist()
    for b in range(256):
        expected = not (chr(b).isascii() and chr(b).isalnum()) and not (0x80 <= b <= 0xBF)
        assert space[b] == expected, b


@pytest.mark.lesson2
def test_max_patch_length():
    starts = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert lengths_from_starts(limit_patch_length(starts, 3)).tolist() == [[1, 3, 3, 3]]
    # chunks count from each patch's own start: 1, 3 | 5 (a start), 7, 9, 11
    starts = torch.tensor([[1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert lengths_from_starts(limit_patch_length(starts, 2)).tolist() == [[1, 2, 2, 2, 2, 2, 1]]
    assert torch.equal(limit_patch_length(starts, None), starts)
    assert torch.equal(limit_patch_length(starts, 100), starts)
    # after the entropy rule: nothing above the threshold, so only the limit cuts
    H = torch.zeros(1, 10)
    starts = limit_patch_length(entropy_patch_starts(H, 1.0), 4)
    assert lengths_from_starts(starts).tolist() == [[1, 4, 4, 2]]
    # applies within patches, counted from each patch start
    H = torch.tensor([[0, 0, 0, 0, 0, 9.0, 0, 0, 0, 0, 0, 0]])
    starts = limit_patch_length(entropy_patch_starts(H, 1.0), 3)
    assert lengths_from_starts(starts).tolist() == [[1, 3, 2, 3, 3, 1]]


@pytest.mark.lesson2
def test_lengths_are_right_padded_per_row():
    starts = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    lengths = lengths_from_starts(starts)
    assert lengths.dtype == torch.long
    assert lengths.tolist() == [[1, 2, 2, 0, 0], [1, 1, 1, 1, 1]]
    tokens = torch.tensor([tokenize(b"ab cd ef"), tokenize(b"abcdefgh")])
    L = patch_lengths(tokens, "space")
    assert L.tolist() == [[1, 3, 3, 3], [1, 9, 0, 0]]  # "ab " "cd " "ef"+slot; the second row is padded


def test_patch_ids_from_lengths():
    L = torch.tensor([[1, 3, 4, 1], [1, 7, 1, 0]])
    assert patch_ids_from_lengths(L, 8).tolist() == [[0, 1, 1, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 1, 1]]


@pytest.mark.lesson2
@pytest.mark.parametrize("target", [2.0, 3.5, 6.0])
@pytest.mark.parametrize("monotonic", [False, True])
def test_calibration_hits_target(target, monotonic):
    g = torch.Generator().manual_seed(0)
    H = torch.rand(8, 512, generator=g) * 4  # (B, T) synthetic entropies
    theta = calibrate_threshold(H, target, monotonic=monotonic)
    size = average_patch_size(lengths_from_starts(entropy_patch_starts(H, theta, monotonic)))
    assert abs(size - target) / target < 0.02, (size, target)


# ---- against the naive references, and incrementality, on random inputs ----

def random_rows(seed: int, rows: int = 3, T: int = 40):
    rng = random.Random(seed)
    alphabet = list(b"abc xyz,.;!  09") + list("éü東".encode()) + [rng.randrange(256) for _ in range(8)]
    tokens = torch.tensor([tokenize(bytes(rng.choice(alphabet) for _ in range(T - 1))) for _ in range(rows)])
    H = torch.tensor([[rng.choice([0.1, 0.5, 1.0, 1.5, 2.5, 4.0]) * rng.random() * 2 for _ in range(T)]
                      for _ in range(rows)])
    return tokens, H


@pytest.mark.lesson2
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


@pytest.mark.lesson2
@pytest.mark.parametrize("seed", range(2))
def test_incremental(seed):
    """f(x_<i) = f(x)_<i (paper §2.4): patching a prefix gives the prefix of the patching."""
    tokens, H = random_rows(seed, rows=2, T=30)
    for max_len in (None, 3):
        full = {
            "strided": limit_patch_length(strided_patch_starts(tokens, 4), max_len),
            "space": limit_patch_length(space_patch_starts(tokens), max_len),
            "entropy": limit_patch_length(entropy_patch_starts(H, 1.0), max_len),
            "monotonic": limit_patch_length(entropy_patch_starts(H, 0.5, True), max_len),
        }
        for i in range(1, tokens.shape[1]):
            prefix = {
                "strided": limit_patch_length(strided_patch_starts(tokens[:, :i], 4), max_len),
                "space": limit_patch_length(space_patch_starts(tokens[:, :i]), max_len),
                "entropy": limit_patch_length(entropy_patch_starts(H[:, :i], 1.0), max_len),
                "monotonic": limit_patch_length(entropy_patch_starts(H[:, :i], 0.5, True), max_len),
            }
            for scheme, starts in prefix.items():
                assert torch.equal(starts, full[scheme][:, :i + 1]), (scheme, max_len, i)

"""Patching rules (paper section 2) on hand-made inputs, and incrementality (section 2.4) for every scheme."""
import random

import pytest
import torch

from patching import (
    calibrate_threshold, entropy_patch_starts, is_space_like, lengths_from_starts, limit_patch_length,
    patch_ids_from_lengths, patch_lengths, space_patch_starts, tokenize, average_patch_size,
)


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


def test_worked_example_from_notes():
    # patching.py's worked example: entropies with theta 1.0 and the next-byte slot -> [1, 3, 4, 1]
    H = torch.tensor([[3.0, .1, .1, 2.0, .1, .1, .1, 2.0]])
    assert lengths_from_starts(entropy_patch_starts(H, 1.0)).tolist() == [[1, 3, 4, 1]]


def test_space_patching_example():
    assert space_patches("Hi there, you.") == [b"Hi ", b"there,", b" you."]


def test_space_patching_utf8():
    # UTF-8 lead bytes are space-like, continuation bytes are not: "ï" = c3 af, "—" = e2 80 94, "東" = e6 9d b1
    patches = space_patches("naïve café — 東京")
    assert b"".join(patches) == "naïve café — 東京".encode()
    # "京" = e4 ba ac. A space-like byte ends a patch only when it follows a non-space-like byte.
    assert patches == [b"na\xc3", b"\xafve ", b"caf\xc3", b"\xa9 ", b"\xe2\x80\x94 ", b"\xe6\x9d\xb1\xe4", b"\xba\xac"]


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


def test_monotonic_rule():
    # byte j+1 starts a patch when H[j] - H[j-1] > theta
    H = torch.tensor([[5.0, 4.0, 3.0, 3.5, 1.0, 0.5, 2.0, 1.9]])
    starts = entropy_patch_starts(H, 0.2, monotonic=True)
    # diffs H[j]-H[j-1] for j=1..7: -1, -1, .5, -2.5, -.5, 1.5, -.1 -> starts at j+1 = 4 and 7
    assert starts.int().tolist() == [[1, 1, 0, 0, 1, 0, 0, 1, 0]]
    assert lengths_from_starts(starts).tolist() == [[1, 3, 3, 2]]


def test_global_rule_forces_bos_and_first_byte():
    H = torch.zeros(1, 6)  # nothing above threshold
    assert lengths_from_starts(entropy_patch_starts(H, 1.0)).tolist() == [[1, 6]]


def test_max_patch_length():
    H = torch.zeros(1, 10)
    starts = limit_patch_length(entropy_patch_starts(H, 1.0), 4)
    assert lengths_from_starts(starts).tolist() == [[1, 4, 4, 2]]
    # applies within patches, counted from each patch start
    H = torch.tensor([[0, 0, 0, 0, 0, 9.0, 0, 0, 0, 0, 0, 0]])
    starts = limit_patch_length(entropy_patch_starts(H, 1.0), 3)
    assert lengths_from_starts(starts).tolist() == [[1, 3, 2, 3, 3, 1]]


def test_patch_ids_from_lengths():
    L = torch.tensor([[1, 3, 4, 1], [1, 7, 1, 0]])
    assert patch_ids_from_lengths(L, 8).tolist() == [[0, 1, 1, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 1, 1]]


def test_batched_rows_are_right_padded():
    tokens = torch.tensor([tokenize(b"ab cd ef"), tokenize(b"abcdefgh")])
    L = patch_lengths(tokens, "space")
    assert L.tolist() == [[1, 3, 3, 3], [1, 9, 0, 0]]  # "ab " "cd " "ef"+slot; the second row is padded


@pytest.mark.parametrize("target", [2.0, 3.5, 6.0])
@pytest.mark.parametrize("monotonic", [False, True])
def test_calibration_hits_target(target, monotonic):
    g = torch.Generator().manual_seed(0)
    H = torch.rand(8, 512, generator=g) * 4  # (B, T) synthetic entropies
    theta = calibrate_threshold(H, target, monotonic=monotonic)
    size = average_patch_size(lengths_from_starts(entropy_patch_starts(H, theta, monotonic)))
    assert abs(size - target) / target < 0.02, (size, target)


def scheme_lengths(tokens, scheme, entropies, max_len=None):
    threshold = 0.0 if scheme == "monotonic" else 2.0
    return patch_lengths(tokens, scheme, patch_size=3, entropies=entropies, threshold=threshold,
                         max_patch_length=max_len)


@pytest.mark.parametrize("scheme", ["strided", "space", "entropy", "monotonic"])
@pytest.mark.parametrize("max_len", [None, 4])
def test_incremental_patching(scheme, max_len):
    """f(x_<i) = f(x)_<i: every patch that ends inside the prefix (boundary decided) is the same."""
    rng = random.Random(0)
    text = "The quick brown fox, naïve café — 東京 1999!  jumps...   over it. " * 2
    tokens = torch.tensor([tokenize(text.encode())])
    T = tokens.shape[1]
    g = torch.Generator().manual_seed(1)
    entropies = torch.rand(1, T, generator=g) * 4  # entropy at j depends only on bytes <= j: use a prefix
    full = scheme_lengths(tokens, scheme, entropies, max_len)[0]
    full_starts = torch.cat([torch.tensor([0]), full.cumsum(0)[:-1]])
    for i in sorted(rng.sample(range(2, T), 25)) + [T - 1]:
        prefix = scheme_lengths(tokens[:, :i], scheme, entropies[:, :i], max_len)[0]
        prefix_starts = torch.cat([torch.tensor([0]), prefix.cumsum(0)[:-1]])
        # starts at positions 0..i (i = the prefix's next-byte slot) must agree
        assert prefix_starts.tolist() == [s for s in full_starts.tolist() if s <= i], (scheme, i)

"""noise.py: deterministic, bytes in / bytes out, the documented rates, non-ASCII bytes untouched."""
import numpy as np
import pytest

from tools.noise import NOISES, RATE, add_noise

TEXT = ("To be, or not to be, that is the Question:\nWhether 'tis Nobler in the mind to suffer\n" * 400).encode()
UTF8 = "caf\u00e9 na\u00efve \u2603 \u00c9t\u00e9 ".encode() * 50


def visible(b: bytes) -> int:
    return sum(32 < c < 127 for c in b)


def letters(b: bytes) -> int:
    return sum(chr(c).isascii() and chr(c).isalpha() for c in b)


@pytest.mark.parametrize("kind", NOISES)
def test_deterministic_bytes_in_bytes_out(kind):
    out = add_noise(TEXT, kind)
    assert isinstance(out, bytes) and out != TEXT
    assert add_noise(TEXT, kind) == out
    assert add_noise(np.frombuffer(TEXT, dtype=np.uint8), kind) == out  # a corpus split works the same
    if kind != "upper":
        assert add_noise(TEXT, kind, seed=1) != out
        assert add_noise(TEXT, kind, rate=0.0) == TEXT
    assert add_noise(b"", kind) == b""


@pytest.mark.parametrize("kind", NOISES)
def test_non_ascii_bytes_pass_through(kind):
    out = add_noise(UTF8, kind, rate=0.3)
    assert [c for c in out if c >= 128] == [c for c in UTF8 if c >= 128]
    out.decode("utf-8")  # still valid UTF-8: multi-byte characters are never cut or reordered
    rng = np.random.default_rng(0)
    random_bytes = rng.integers(0, 256, size=5000, dtype=np.uint8).tobytes()
    assert [c for c in add_noise(random_bytes, kind, 0.3) if c >= 128] == [c for c in random_bytes if c >= 128]


def test_each_kind_does_what_it_says_at_the_documented_rate():
    n_visible, n_letters = visible(TEXT), letters(TEXT)
    tolerance = 4 * np.sqrt(RATE * n_visible)  # 4 standard deviations of a binomial count

    flipped = add_noise(TEXT, "case_flip")
    assert len(flipped) == len(TEXT) and flipped.lower() == TEXT.lower()
    assert abs(sum(a != b for a, b in zip(flipped, TEXT)) - RATE * n_letters) < tolerance

    dropped = add_noise(TEXT, "drop")
    assert abs((len(TEXT) - len(dropped)) - RATE * n_visible) < tolerance
    assert dropped.count(b"\n") == TEXT.count(b"\n") and dropped.count(b" ") == TEXT.count(b" ")  # whitespace kept
    it = iter(TEXT)
    assert all(c in it for c in dropped)  # a subsequence of the original

    repeated = add_noise(TEXT, "repeat")
    assert abs((len(repeated) - len(TEXT)) - RATE * n_visible) < tolerance
    assert repeated.count(b"\n") == TEXT.count(b"\n")

    swapped = add_noise(TEXT, "swap")
    assert len(swapped) == len(TEXT) and sorted(swapped) == sorted(TEXT)
    changed = sum(a != b for a, b in zip(swapped, TEXT))
    assert 0.5 * RATE * n_letters < changed < 2 * RATE * n_letters  # two bytes per swap of unequal letters
    assert all(a == b for a, b in zip(swapped, TEXT) if not chr(b).isalpha())  # only letters move

    assert add_noise(TEXT, "upper") == TEXT.upper()


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown noise"):
        add_noise(TEXT, "shout")
    with pytest.raises(ValueError, match="rate"):
        add_noise(TEXT, "drop", rate=1.5)

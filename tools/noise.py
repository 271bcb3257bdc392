"""Noised copies of text, for robustness evaluation in the spirit of paper section 6 (table 4).

The paper asks how much worse a model gets when its input is perturbed at the character level -- the kind of
change a tokenizer trained on clean text turns into unfamiliar token sequences, while a byte model sees the
same 256 symbols. Each function below maps bytes to bytes, is deterministic for a given seed, and changes
only ASCII bytes, so multi-byte UTF-8 characters pass through whole:

    case_flip   each ASCII letter switches case with probability `rate`
    drop        each visible ASCII character (letter, digit, punctuation; not whitespace) is deleted with
                probability `rate`
    repeat      each visible ASCII character is doubled with probability `rate`
    swap        each pair of neighbouring ASCII letters is swapped with probability `rate`; a pair that
                overlaps an earlier chosen pair is skipped, so the effective rate is a little lower
    upper       ALL CAPS: every ASCII letter upper-cased (no rate, no randomness)

RATE (5%) is the default: enough to move bits per byte clearly, little enough that the text stays readable.
Note that noise adds its own entropy (a 5% random case flip costs about 0.29 bits per letter to any model),
so compare models by how much their bits per byte rise, not by the raw numbers alone.
"""
import numpy as np

NOISES = ("case_flip", "drop", "repeat", "swap", "upper")
RATE = 0.05


def _ascii_classes(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N,) uint8 -> (is ASCII letter, is visible ASCII character), each (N,) bool."""
    letters = ((a >= ord("A")) & (a <= ord("Z"))) | ((a >= ord("a")) & (a <= ord("z")))
    visible = (a > ord(" ")) & (a < 127)
    return letters, visible


def add_noise(data, kind: str, rate: float = RATE, seed: int = 0) -> bytes:
    """bytes (or a uint8 array) -> noised bytes. The same (data, kind, rate, seed) always gives the same
    result; each kind draws from its own stream, so adding a kind never changes the others."""
    if kind not in NOISES:
        raise ValueError(f"unknown noise {kind!r}; choose one of {', '.join(NOISES)}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must be in [0, 1], got {rate}")
    a = np.frombuffer(data.tobytes() if isinstance(data, np.ndarray) else bytes(data), dtype=np.uint8)
    letters, visible = _ascii_classes(a)
    u = np.random.default_rng([seed, NOISES.index(kind)]).random(len(a))  # one uniform draw per byte
    if kind == "case_flip":
        out = a.copy()
        out[letters & (u < rate)] ^= 0x20  # ASCII upper and lower case differ in bit 5
    elif kind == "drop":
        out = a[~(visible & (u < rate))]
    elif kind == "repeat":
        out = np.repeat(a, 1 + (visible & (u < rate)))
    elif kind == "swap":
        pair = letters[:-1] & letters[1:] & (u[:-1] < rate)  # pair i = bytes (i, i + 1)
        pair[1:] &= ~pair[:-1]  # no byte in two pairs (compared with the pairs as first drawn)
        i = np.flatnonzero(pair)
        out = a.copy()
        out[i], out[i + 1] = a[i + 1], a[i]
    else:  # upper
        out = a.copy()
        out[(a >= ord("a")) & (a <= ord("z"))] -= 0x20
    return out.tobytes()

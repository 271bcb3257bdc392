"""Property tests of the patching functions on random byte strings (plain random, fixed seeds).

Inputs include the empty string (BOS only), one byte, all 0xFF, long runs of spaces, random UTF-8 text and
random bytes. Invariants: patch lengths are positive; a row's lengths sum to its input length plus the
next-byte slot; patching is incremental; every position lands in exactly one patch, in order.
"""
import random

import pytest
import torch

from patching import lengths_from_starts, patch_ids_from_lengths, patch_lengths, tokenize

SCHEMES = ["strided", "space", "entropy", "monotonic"]


def random_inputs(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    alphabet = "abc XYZ 019 ,.;!?\n\t" + "éïçà—東京🙂Ωж"
    texts = [b"", b"a", b" ", b"\xff" * 50, b" " * 80, b"\n\n\n  \t  ", bytes(range(256)),
             "".join(rng.choice(alphabet) for _ in range(120)).encode(),
             bytes(rng.randrange(256) for _ in range(100))]
    texts += [bytes(rng.randrange(256) for _ in range(rng.randrange(0, 60))) for _ in range(10)]
    return texts


def lengths_for(data: bytes, scheme: str, max_len, seed: int) -> torch.Tensor:
    tokens = torch.tensor([tokenize(data)])
    g = torch.Generator().manual_seed(seed)
    entropies = torch.rand(1, tokens.shape[1], generator=g) * 3
    threshold = 0.3 if scheme == "monotonic" else 1.5
    return patch_lengths(tokens, scheme, patch_size=3, entropies=entropies, threshold=threshold,
                         max_patch_length=max_len)[0], entropies


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("max_len", [None, 1, 3])
def test_patching_properties(scheme, max_len):
    for seed, data in enumerate(random_inputs(0)):
        lengths, entropies = lengths_for(data, scheme, max_len, seed)
        T = len(data) + 1  # BOS + bytes
        # positive lengths (no padding in a single row), summing to T + 1 (the next-byte slot)
        assert (lengths > 0).all() and int(lengths.sum()) == T + 1
        assert lengths[0] == 1  # BOS alone
        if max_len is not None:
            assert int(lengths.max()) <= max(max_len, 1)
        # every position in exactly one patch, patches in order, none skipped
        ids = patch_ids_from_lengths(lengths[None], T + 1)[0]
        assert ids[0] == 0 and torch.all(ids[1:] - ids[:-1] >= 0) and torch.all(ids[1:] - ids[:-1] <= 1)
        assert torch.bincount(ids, minlength=len(lengths)).tolist() == lengths.tolist()
        # incremental: every prefix patches to the prefix of the patching
        starts = set((lengths.cumsum(0) - lengths).tolist())
        for i in range(1, T):
            tokens = torch.tensor([tokenize(data)])[:, :i]
            prefix = patch_lengths(tokens, scheme, patch_size=3, entropies=entropies[:, :i],
                                   threshold=0.3 if scheme == "monotonic" else 1.5, max_patch_length=max_len)[0]
            prefix_starts = set((prefix.cumsum(0) - prefix).tolist())
            assert prefix_starts == {s for s in starts if s <= i}, (scheme, data, i)


def test_batched_rows_equal_single_rows():
    rng = random.Random(1)
    rows = [bytes(rng.randrange(256) for _ in range(40)) for _ in range(6)]
    tokens = torch.tensor([tokenize(r) for r in rows])
    for scheme in ("strided", "space"):
        batch = patch_lengths(tokens, scheme, patch_size=3)
        for b in range(len(rows)):
            single = patch_lengths(tokens[b:b + 1], scheme, patch_size=3)[0]
            row = batch[b]
            assert row[: len(single)].tolist() == single.tolist() and int(row[len(single):].sum()) == 0


def test_lengths_from_starts_round_trip():
    rng = random.Random(2)
    for _ in range(50):
        n = rng.randrange(2, 40)
        starts = torch.tensor([[True] + [rng.random() < 0.3 for _ in range(n - 1)]])
        lengths = lengths_from_starts(starts)[0]
        rebuilt = torch.zeros(n, dtype=torch.bool)
        rebuilt[(lengths.cumsum(0) - lengths)] = True
        assert torch.equal(rebuilt, starts[0])


def test_data_loader_properties():
    """eval_windows predicts every byte exactly once, in order; get_batch targets are the inputs shifted by one."""
    import numpy as np
    from data import eval_windows, get_batch

    rng = random.Random(3)
    for trial in range(30):
        n = rng.choice([1, 2, 7, 63, 64, 65, 300, 1000])
        data = np.frombuffer(bytes(rng.randrange(256) for _ in range(n)), dtype=np.uint8)
        seq_len, batch = rng.choice([1, 8, 64]), rng.choice([1, 3, 16])
        targets = []
        for x, y in eval_windows(data, seq_len, batch):
            assert x.shape == y.shape and torch.all(x[:, 0] == 1)  # every window starts afresh from BOS
            assert torch.equal(x[:, 1:], y[:, :-1])  # inputs are the targets shifted by one
            targets.append(y.reshape(-1))
        assert bytes((torch.cat(targets) - 4).tolist()) == data.tobytes()  # none lost, none duplicated
        if n >= seq_len:
            x, y = get_batch(data, batch, seq_len, seed=trial, index=0)
            for row_x, row_y in zip(x, y):
                window = bytes((row_y - 4).tolist())
                assert window in data.tobytes() and torch.equal(row_x[1:], row_y[:-1]) and row_x[0] == 1

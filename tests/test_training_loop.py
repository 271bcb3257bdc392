"""Training end to end (paper §4): entropy model -> threshold -> BLT with entropy patching -> held-out bits per
byte, through train.py as a user runs it. A tiny model on a tiny corpus, a few seconds. Graded by
`python -m pytest -m stage7` (exercises.md); it needs stages 1-6."""
import json

import pytest

import train

pytestmark = pytest.mark.stage7


TINY = ["--seq-len", "64", "--batch-size", "8", "--steps", "60", "--entropy-steps", "30", "--lr", "1e-2",
        "--entropy-lr", "1e-2", "--warmup-steps", "10", "--eval-interval", "1000", "--final-eval-bytes", "2048",
        "--log-interval", "1000", "--patch-size", "3", "--calibration-windows", "8",
        "--config", "entropy_dim=16", "--config", "entropy_layers=1", "--config", "entropy_heads=2",
        "--config", "local_dim=32", "--config", "local_heads=2", "--config", "decoder_layers=1",
        "--config", "global_dim=64", "--config", "global_layers=1", "--config", "global_heads=2",
        "--config", "hash_buckets=64", "--config", "multiple_of=16"]


def test_tiny_end_to_end_run_learns(tmp_path):
    """60 steps on a repetitive 19 kB corpus: from 8 bits per byte (a uniform guess) to well under 1."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog, {i * 7 % 13} times.\n"
                              for i in range(300)))
    assert train.main(["--data", str(corpus), "--out", str(tmp_path / "out"), *TINY]) == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "blt_entropy.jsonl").read_text().splitlines()]
    final = [r for r in records if r["type"] == "eval"][-1]
    assert final["val_bytes"] > 1000 and 2.0 < final["patch_size"] < 4.5
    assert final["val_bpb"] < 1.0, final

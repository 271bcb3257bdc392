"""train.py under torchrun (DistributedDataParallel, gloo on CPU): two processes sharing each global batch take
the same steps as one process with the same --batch-size; gradient accumulation keeps that batch fixed; only
rank 0 writes; a run stopped and resumed under torchrun continues where it stopped."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed

import checkpoint
import runtime
import train
from data import get_batch
from test_train import TINY, TINY_TRAINING, corpus_file, records  # noqa: F401  (pytest fixture)

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="this torch build has no gloo backend")

# fp32, so that the only difference between one and two processes is the order of float sums.
COMMON = [*TINY, "--dtype", "fp32", "--steps", "8", "--entropy-steps", "4", "--eval-interval", "4"]


def torchrun(nproc: int, *args, timeout=240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "train.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


def losses(path: Path) -> list[float]:
    rs = records(path, "train")
    assert [r["step"] for r in rs] == list(range(1, len(rs) + 1)), "each step logged once (rank 0 alone writes)"
    return [r["loss"] for r in rs]


def test_gradient_accumulation_keeps_the_global_batch(corpus_file, tmp_path):  # noqa: F811
    """One process: 4 windows at once, or 4 micro-batches of 1 accumulated, give the same training run."""
    args = ["--data", str(corpus_file), *TINY_TRAINING, "--dtype", "fp32", "--steps", "8", "--warmup-steps", "2",
            "--lr", "1e-2", "--model", "byte",
            "--config", "dim=32", "--config", "heads=2", "--config", "layers=1", "--config", "multiple_of=16"]
    assert train.main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert train.main([*args, "--out", str(tmp_path / "micro"), "--micro-batch-size", "1"]) == 0
    a, b = losses(tmp_path / "whole" / "byte.jsonl"), losses(tmp_path / "micro" / "byte.jsonl")
    assert len(a) == 8 and a == pytest.approx(b, rel=1e-4)
    assert a[-1] < a[0] - 0.5, "the model trains"


def test_two_processes_match_one_with_the_same_global_batch(corpus_file, tmp_path):  # noqa: F811
    """Entropy model -> threshold -> BLT, all three stages, with 2 gloo processes (each 2 of the 4 windows of
    a batch, in micro-batches of 1), stopped inside the BLT stage and resumed under torchrun; against one
    process run straight through."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert train.main(["--data", str(corpus_file), *COMMON, "--out", str(one)]) == 0

    first = torchrun(2, "--data", str(corpus_file), *COMMON, "--out", str(two), "--micro-batch-size", "1",
                     "--stop-at", "5")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped by --stop-at 5" in first.stderr
    assert checkpoint.read_checkpoint(two / "blt_entropy.pt")["step"] == 5
    second = torchrun(2, "--data", str(corpus_file), *COMMON, "--out", str(two), "--micro-batch-size", "1", "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "2 processes" in second.stdout
    assert second.stdout.count("blt_entropy: val") == 1, "rank 0 alone reports"

    for name in ("entropy", "blt_entropy"):
        a, b = losses(one / f"{name}.jsonl"), losses(two / f"{name}.jsonl")
        assert len(a) == len(b) and a == pytest.approx(b, rel=1e-4, abs=1e-5), name
        ea, eb = records(one / f"{name}.jsonl", "eval"), records(two / f"{name}.jsonl", "eval")
        assert [r["step"] for r in ea] == [r["step"] for r in eb]
        # the ranks evaluate alternate batches and sum: the same bytes are predicted
        assert [r["val_bytes"] for r in ea] == [r["val_bytes"] for r in eb]
        assert [r["val_bpb"] for r in ea] == pytest.approx([r["val_bpb"] for r in eb], rel=1e-4)
    cal_one = json.loads((one / "calibration.json").read_text())
    cal_two = json.loads((two / "calibration.json").read_text())
    assert cal_two["threshold"] == pytest.approx(cal_one["threshold"], rel=1e-4)
    assert records(two / "blt_entropy.jsonl", "eval")[-1]["patch_size"] == pytest.approx(
        records(one / "blt_entropy.jsonl", "eval")[-1]["patch_size"], rel=1e-3)
    kind, _, _ = checkpoint.load_checkpoint(two / "blt_entropy.pt")
    assert kind == "blt"
    assert not list(two.glob(".*tmp*")), "no temporary files left behind"


def test_batch_that_does_not_split_is_refused(corpus_file, tmp_path):  # noqa: F811
    result = torchrun(2, "--data", str(corpus_file), *COMMON, "--batch-size", "3", "--out", str(tmp_path / "x"))
    assert result.returncode != 0
    assert "--batch-size 3 must split evenly into 2 processes" in result.stderr  # rank 0 or 1 may say it first


def test_each_rank_reads_its_own_share(monkeypatch):
    """The ranks' rows of a global batch are disjoint and together make the whole batch."""
    corpus = bytes(range(256)) * 8
    data = np.frombuffer(corpus, dtype=np.uint8)
    whole, _ = get_batch(data, 8, 16, seed=5, index=3)
    parts = []
    for rank in range(4):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "4")
        parts.append(get_batch(data, 8, 16, seed=5, index=3, rows=runtime.Distributed().rows(8))[0])
    assert [p.shape[0] for p in parts] == [2, 2, 2, 2]
    assert (torch.cat(parts) == whole).all()


def test_sigterm_to_torchrun_saves_and_resume_continues(corpus_file, tmp_path):  # noqa: F811
    """A scheduler's SIGTERM goes to torchrun, which forwards it to every worker: the ranks agree to stop after
    the same step, rank 0 saves, and --resume under torchrun replays the uninterrupted run's losses."""
    args = ["--data", str(corpus_file), *TINY_TRAINING, "--dtype", "fp32", "--steps", "400", "--warmup-steps", "2",
            "--lr", "1e-2", "--eval-interval", "1000", "--model", "byte", "--config", "dim=32", "--config", "heads=2",
            "--config", "layers=1", "--config", "multiple_of=16"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert train.main([*args, "--out", str(one)]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "train.py"), *args, "--out", str(two)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = two / "byte.jsonl", time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # wait until training is under way
        if log.exists() and len(log.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted: make it longer"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "stopped by SIGTERM" in stderr, stderr[-3000:]
    stopped = checkpoint.read_checkpoint(two / "byte.pt")
    assert not stopped["done"] and 5 <= stopped["step"] < 400

    resumed = torchrun(2, *args, "--out", str(two), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = losses(one / "byte.jsonl"), losses(two / "byte.jsonl")
    assert len(a) == len(b) == 400 and a == pytest.approx(b, rel=1e-4, abs=1e-5)

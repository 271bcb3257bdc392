"""Nothing lost (issue: fault and bad-input hardening): a SIGKILL during a checkpoint write, SIGTERM and
resume, a NaN loss, truncated and corrupted checkpoints."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from checkpoint import CheckpointError, atomic_save, read_checkpoint

from test_train import TINY, corpus_file, load_checkpoint_dict, records  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parent.parent

WRITER = """
import sys, torch
sys.path.insert(0, {repo!r})
from pathlib import Path
from checkpoint import atomic_save
path = Path({path!r})
big = torch.randn(6_000_000)  # ~24 MB: each write takes a while
version = 1
while True:
    version += 1
    atomic_save({{"format": 1, "kind": "blt", "version": version, "weights": big}}, path)
    print(version, flush=True)
"""


def test_sigkill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_save({"format": 1, "kind": "blt", "version": 1, "weights": torch.zeros(3)}, path)
    for delay in (0.05, 0.3, 0.7, 1.1):
        proc = subprocess.Popen([sys.executable, "-c", WRITER.format(repo=str(REPO), path=str(path))],
                                stdout=subprocess.PIPE, text=True)
        time.sleep(1.0 + delay)  # import time, then somewhere inside a write
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        ckpt = read_checkpoint(path)  # never half a file: the old one or a complete new one
        assert ckpt["version"] >= 1
        if ckpt["version"] > 1:
            assert ckpt["weights"].shape == (6_000_000,)


def test_truncated_and_corrupted_checkpoints_are_refused(tmp_path):
    path = tmp_path / "good.pt"
    atomic_save({"format": 1, "kind": "blt", "config": {}, "weights": torch.randn(1000)}, path)
    data = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    corrupted = bytearray(data)
    corrupted[:64] = b"\xff" * 64  # the archive's first header
    (tmp_path / "corrupted.pt").write_bytes(bytes(corrupted))
    for name in ("truncated.pt", "corrupted.pt"):
        with pytest.raises(CheckpointError, match="not a readable checkpoint"):
            read_checkpoint(tmp_path / name)
        result = subprocess.run([sys.executable, str(REPO / "sample.py"), "--checkpoint", str(tmp_path / name),
                                 "--prompt", "hi"], capture_output=True, text=True, timeout=60)
        assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1
        assert result.stderr.startswith("error: ") and "not a readable checkpoint" in result.stderr


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(corpus_file, tmp_path, monkeypatch, capsys):
    args = ["--data", str(corpus_file), *TINY, "--patching", "strided", "--steps", "20", "--out", str(tmp_path)]
    real_loss = train.Task.loss
    calls = {"n": 0}

    def loss_that_explodes(self, x, y):
        calls["n"] += 1
        loss = real_loss(self, x, y)
        return loss * float("nan") if calls["n"] >= 8 else loss

    monkeypatch.setattr(train.Task, "loss", loss_that_explodes)
    assert train.main(args) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]  # tqdm aside
    assert len(err) == 1 and "loss became nan at step 8" in err[0] and "last good checkpoint" in err[0]
    ckpt = load_checkpoint_dict(tmp_path / "blt_strided.pt")  # saved at step 6 (--eval-interval 3)
    assert ckpt["step"] == 6 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_sigterm_saves_and_resume_gives_the_same_losses(corpus_file, tmp_path):
    common = ["--data", str(corpus_file), *TINY, "--patching", "strided", "--steps", "40"]
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    assert train.main([*common, "--out", str(whole)]) == 0
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *common, "--out", str(pieces)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = pieces / "blt_strided.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in stderr
    stopped_at = load_checkpoint_dict(pieces / "blt_strided.pt")["step"]
    assert 0 < stopped_at < 40
    assert train.main([*common, "--out", str(pieces), "--resume"]) == 0
    a, b = records(whole / "blt_strided.jsonl", "train"), records(log, "train")
    assert [r["step"] for r in b] == list(range(1, 41))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]

"""train.py: a tiny end-to-end run (entropy model -> threshold -> BLT), exact resume, Ctrl-C, checkpoints, and
bad input (one line on stderr, non-zero exit, nothing written damaged). Everything here runs in seconds."""
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from blt import BLT, BLTConfig
from entropy_model import EntropyModel
from checkpoint import CheckpointError, load_checkpoint
from train import TrainConfig, lr_at

from test_data import closed_port_url, server  # noqa: F401  (pytest fixture)

REPO = Path(__file__).resolve().parent.parent

# Models small enough to train in a second; flags exactly as a user would pass them.
TINY_TRAINING = ["--seq-len", "32", "--batch-size", "4", "--eval-interval", "3", "--eval-bytes", "256",
                 "--final-eval-bytes", "512", "--log-interval", "1"]
TINY = [*TINY_TRAINING, "--patch-size", "3", "--calibration-windows", "8",
        "--config", "entropy_dim=16", "--config", "entropy_layers=1", "--config", "entropy_heads=2",
        "--config", "local_dim=32", "--config", "local_heads=2", "--config", "decoder_layers=1",
        "--config", "global_dim=64", "--config", "global_layers=1", "--config", "global_heads=2",
        "--config", "hash_buckets=64", "--config", "multiple_of=16"]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    lines = [f"Line {i}: the quick brown fox jumps over the lazy dog, {i * 7 % 13} times.\n" for i in range(300)]
    path.write_text("".join(lines))
    return path


def records(path: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["type"] == kind]


def run_cli(*args, env=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, pattern: str):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert pattern in lines[0], lines[0]


def test_lr_schedule_warmup_then_cosine():
    tc = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, tc, 0.0) == pytest.approx(0.1) and lr_at(9, tc, 0.0) == pytest.approx(1.0)
    assert lr_at(50, tc, 0.5) == pytest.approx(0.55) and lr_at(99, tc, 1.0) == pytest.approx(0.1)
    # Under a time budget the warmup also ends when its share of the budget is spent, whichever comes first.
    assert lr_at(0, tc, 0.05, warmup_share=0.1) == pytest.approx(0.5 * lr_at(0, tc, 0.05, warmup_share=1e-9))
    assert lr_at(2, tc, 0.2, warmup_share=0.1) == pytest.approx(lr_at(50, tc, 0.2))  # warm after 3 of 10 steps
    assert lr_at(8, tc, 0.01, warmup_share=0.1) == pytest.approx(0.9 * lr_at(50, tc, 0.01))  # the steps came first


def test_end_to_end_resume_is_exact(corpus_file, tmp_path):
    """Three stages in one command; the same run interrupted twice (once in each trained stage) and resumed
    gives exactly the same losses and validation bits per byte."""
    common = ["--data", str(corpus_file), *TINY, "--steps", "6", "--entropy-steps", "4"]
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    assert train.main([*common, "--out", str(whole)]) == 0
    assert train.main([*common, "--out", str(pieces), "--stop-at", "2"]) == 0  # inside the entropy stage
    assert not (pieces / "blt_entropy.pt").exists()
    assert train.main([*common, "--out", str(pieces), "--resume", "--stop-at", "5"]) == 0  # inside the BLT stage
    assert load_checkpoint_dict(pieces / "blt_entropy.pt")["step"] == 5
    assert train.main([*common, "--out", str(pieces), "--resume"]) == 0
    for name in ("entropy", "blt_entropy"):
        a, b = records(whole / f"{name}.jsonl", "train"), records(pieces / f"{name}.jsonl", "train")
        assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, len(a) + 1))
        assert [r["loss"] for r in a] == [r["loss"] for r in b]
        assert records(whole / f"{name}.jsonl", "eval")[-1]["val_bpb"] == records(pieces / f"{name}.jsonl", "eval")[-1]["val_bpb"]
    final = records(whole / "blt_entropy.jsonl", "eval")[-1]
    assert final["val_bytes"] == 512 and 2.0 < final["patch_size"] < 4.5  # --final-eval-bytes 512
    assert final["train_flops_per_byte"] > 0 and (whole / "blt_entropy.png").exists() and (whole / "curves.png").exists()
    assert json.loads((whole / "calibration.json").read_text())["threshold"] == load_checkpoint(whole / "blt_entropy.pt")[1].entropy_threshold

    # The BLT checkpoint alone rebuilds the model: config with patching mode and threshold, entropy model inside.
    kind, cfg, model = load_checkpoint(whole / "blt_entropy.pt")
    assert kind == "blt" and isinstance(cfg, BLTConfig) and isinstance(model, BLT)
    assert cfg.patching == "entropy" and cfg.entropy_threshold is not None and not model.training
    entropy_kind, _, entropy_model = load_checkpoint(whole / "entropy.pt")
    assert entropy_kind == "entropy" and isinstance(entropy_model, EntropyModel)
    for key, value in entropy_model.state_dict().items():
        assert torch.equal(model.entropy_model.state_dict()[key], value)  # the frozen entropy model, unchanged
    # finished stages are skipped on --resume
    assert train.main([*common, "--out", str(whole), "--resume"]) == 0


def load_checkpoint_dict(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_byte_baseline_and_space_patching(corpus_file, tmp_path):
    common = ["--data", str(corpus_file), "--steps", "2", "--out", str(tmp_path)]
    assert train.main([*common, *TINY_TRAINING, "--model", "byte", "--config", "dim=32", "--config", "heads=2"]) == 0
    assert train.main([*common, *TINY, "--patching", "space"]) == 0
    byte_eval = records(tmp_path / "byte.jsonl", "eval")[-1]
    space_eval = records(tmp_path / "blt_space.jsonl", "eval")[-1]
    assert byte_eval["val_bytes"] == space_eval["val_bytes"]  # the same predicted bytes for every model
    assert load_checkpoint(tmp_path / "byte.pt")[0] == "byte" and load_checkpoint(tmp_path / "blt_space.pt")[1].patching == "space"


def test_sigint_saves_a_resumable_checkpoint(corpus_file, tmp_path):
    args = ["--data", str(corpus_file), *TINY, "--patching", "strided", "--steps", "100000", "--out", str(tmp_path)]
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = tmp_path / "blt_strided.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 2):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "stopped by SIGINT" in stderr
    step = load_checkpoint_dict(tmp_path / "blt_strided.pt")["step"]
    assert step >= 2 and records(log, "train")[-1]["step"] >= step
    assert train.main([*args, "--resume", "--stop-at", str(step + 1)]) == 0
    assert [r["step"] for r in records(log, "train")] == list(range(1, step + 2))  # nothing lost or repeated


def test_checkpoint_loading_refuses_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "garbage.pt")
    with open(tmp_path / "payload.pt", "wb") as f:  # an arbitrary pickle payload is never executed
        pickle.dump({"format": 1, "kind": "blt", "model": Path("/")}, f, protocol=2)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "payload.pt")
    torch.save({"format": 1, "kind": "blt", "config": {"local_dim": 32}}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "partial.pt")


# ---- bad input: one line on stderr, non-zero exit, nothing damaged (real subprocesses) ----

def test_bad_data_arguments(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "short.txt").write_bytes(b"to be or not to be\n")
    assert_one_line_error(run_cli("--data", str(tmp_path / "missing.txt")), "no such file or directory")
    assert_one_line_error(run_cli("--data", str(tmp_path / "empty.txt")), "is empty")
    assert_one_line_error(run_cli("--data", str(tmp_path / "short.txt")), "too short")
    assert_one_line_error(run_cli("--data", "shakespear"), "unknown corpus 'shakespear'")


def test_download_failures(server, tmp_path):  # noqa: F811
    root, url = server
    (root / "input.txt").write_bytes(b"not the real tiny shakespeare\n" * 40)
    env = {"BLT_DATA_DIR": str(tmp_path / "cache"), "BLT_DATA_MIRROR": url}
    assert_one_line_error(run_cli("--data", "tinyshakespeare", env=env), "checksum mismatch")
    assert_one_line_error(run_cli("--data", "tinyshakespeare", env={**env, "BLT_DATA_MIRROR": closed_port_url()}),
                          "cannot download")
    assert not (tmp_path / "cache" / "tinyshakespeare").exists()
    assert list((tmp_path / "cache" / "downloads").iterdir()) == []


def test_checkpoint_conflicts_leave_files_intact(corpus_file, tmp_path):
    args = ["--data", str(corpus_file), *TINY, "--patching", "strided", "--steps", "2", "--out", str(tmp_path)]
    assert train.main(args) == 0
    ckpt = tmp_path / "blt_strided.pt"
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert_one_line_error(run_cli(*args), "already exists")  # no silent overwrite
    assert_one_line_error(run_cli(*args, "--resume", "--config", "global_dim=96"),
                          "another config (global_dim: 64 in the checkpoint, 96 now)")
    assert_one_line_error(run_cli(*args, "--resume", "--lr", "0.1"), "another config (lr:")
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # truncated, as by a crash outside our atomic writes
    assert_one_line_error(run_cli(*args, "--resume"), "not a readable checkpoint")


# ---- the default preset: small for BLT under a time budget on a small corpus ----

BEST_300S = ["--patching", "space", "--config", "hash_ngram_sizes=[3,4,5]", "--seq-len", "128", "--batch-size", "16",
             "--warmup-steps", "30", "--lr", "3e-3", "--weight-decay", "0.5"]


def resolved(argv: list[str], preset: str) -> tuple:
    _, blt_cfg, _, tc, entropy_tc, opts, stages = train.settings(train.parse_args(argv, train.PRESETS), preset,
                                                                  torch.device("cpu"))
    return blt_cfg, tc, entropy_tc, {k: v for k, v in vars(opts).items() if k != "steps"}, stages


def test_small_preset_is_the_default_for_a_time_budget_on_a_small_corpus():
    small = train.SMALL_CORPUS_BYTES - 1
    chosen = lambda *flags, size=small, preset="cpu": train.small_by_default(  # noqa: E731
        train.parse_args(["--data", "tinyshakespeare", *flags], train.PRESETS), preset, size)
    assert chosen("--time-budget", "300")
    assert chosen("--time-budget", "300", "--lr", "1e-3", "--patching", "entropy")  # flags change values, not the preset
    assert not chosen()  # a step count: the cpu preset
    assert not chosen("--time-budget", "300", size=train.SMALL_CORPUS_BYTES)  # a large corpus
    assert not chosen("--time-budget", "300", "--preset", "cpu")
    assert chosen("--time-budget", "300", "--model", "byte") and chosen("--time-budget", "300", "--model", "bpe")
    assert not chosen("--time-budget", "300", preset="gpu")  # CUDA


def test_small_preset_holds_the_best_300s_command_and_flags_override():
    budget = ["--data", "tinyshakespeare", "--time-budget", "300"]
    assert resolved(budget, "small") == resolved([*budget, *BEST_300S], "cpu")  # the preset is that command
    blt_cfg, tc, _, opts, stages = resolved([*budget, "--lr", "1e-3", "--patching", "entropy", "--eval-interval", "50"],
                                            "small")
    assert (tc.lr, tc.seq_len, tc.weight_decay, blt_cfg.patching, blt_cfg.hash_ngram_sizes) == (1e-3, 128, 0.5, "entropy", (3, 4, 5))
    assert opts["eval_interval"] == 50 and stages == ["entropy", "calibrate", "blt"]


def test_time_budget_on_a_small_corpus_says_it_uses_the_small_preset(corpus_file, tmp_path, capsys):
    assert train.main(["--data", str(corpus_file), "--time-budget", "600", "--stop-at", "1", "--out", str(tmp_path)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "preset small (the default under --time-budget" in first and "--preset cpu" in first
    saved = load_checkpoint_dict(tmp_path / "blt_space.pt")
    assert saved["step"] == 1 and saved["train"]["seq_len"] == 128 and tuple(saved["config"]["hash_ngram_sizes"]) == (3, 4, 5)

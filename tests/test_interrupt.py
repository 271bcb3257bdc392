"""An interrupt never loses work (issue: bad input and interrupts). train.py gets SIGINT or SIGTERM at many moments
of a three-stage run (training, a periodic evaluation, a checkpoint write, the final evaluation, calibration,
figure drawing, a second Ctrl-C), then `--resume` must reach the same end as an uninterrupted run: the same
losses, the same validation bits per byte, finished checkpoints and every figure.

The signal is sent by the child to itself at the start of the n-th call of a function (tests/clirunner.py), so
each moment is exact. With these flags the calls come in this order:
    data.get_batch         entropy steps 1-4 = calls 1-4, calibration = 5, BLT steps 1-6 = calls 6-11
    evaluation.evaluate    entropy at step 3, entropy final, BLT at step 3, BLT final
    torch.save             entropy step 3, entropy before its final evaluation, entropy finished,
                           BLT step 3, BLT before its final evaluation, BLT finished
    plots.save             entropy figure, BLT figure, curves.png
"""
import json
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import clirunner

INT, TERM = signal.SIGINT, signal.SIGTERM
MOMENTS = {  # name: (signals, exit code)
    "entropy training step 2": ([("data:get_batch", 2, INT)], 130),
    "entropy periodic evaluation": ([("evaluation:evaluate", 1, INT)], 130),
    "entropy final evaluation": ([("evaluation:evaluate", 2, INT)], 130),
    "entropy finished-checkpoint write": ([("torch:save", 3, INT)], 130),
    "calibration": ([("patching:calibrate_threshold", 1, INT)], 130),
    "BLT training step 5 (SIGTERM)": ([("data:get_batch", 10, TERM)], 143),
    "BLT checkpoint write at step 3": ([("torch:save", 4, INT)], 130),
    "BLT checkpoint write before the final evaluation": ([("torch:save", 5, INT)], 130),
    "BLT final evaluation (SIGTERM)": ([("evaluation:evaluate", 4, TERM)], 143),
    "BLT figure": ([("plots:save", 2, INT)], 130),
    "curves.png at the end": ([("plots:save", 3, INT)], 130),
    "second Ctrl-C during the checkpoint write the first asked for": (
        [("data:get_batch", 7, INT), ("torch:save", 4, INT)], 130),
}


@pytest.fixture(scope="module")
def flags(tmp_path_factory) -> list:
    corpus = tmp_path_factory.mktemp("corpus") / "text.txt"
    corpus.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog, {i * 7 % 13} times.\n"
                              for i in range(300)))
    return ["--data", corpus, "--preset", "smoke", "--threads", "1", "--steps", "6", "--entropy-steps", "4",
            "--eval-interval", "3", "--eval-bytes", "256", "--final-eval-bytes", "512", "--calibration-windows", "8",
            "--log-interval", "1"]


def records(path: Path) -> dict:
    rs = [json.loads(line) for line in path.read_text().splitlines()]
    return {"train": [(r["step"], r["loss"]) for r in rs if r["type"] == "train"],
            "eval": [(r["step"], r["val_bpb"]) for r in rs if r["type"] == "eval"]}


def end_state(out: Path) -> dict:
    """What a finished run leaves, minus wall-clock times."""
    state = {name: records(out / f"{name}.jsonl") for name in ("entropy", "blt_entropy")}
    for name in ("entropy", "blt_entropy"):
        ckpt = torch.load(out / f"{name}.pt", weights_only=True)
        state[f"{name}.pt"] = (ckpt["done"], ckpt["step"], ckpt["metrics"]["val_bpb"])
    state["threshold"] = json.loads((out / "calibration.json").read_text())["threshold"]
    state["figures"] = sorted(p.name for p in out.glob("*.png"))
    return state


def interrupted_then_resumed(flags: list, out: Path, signals, code: int) -> dict:
    r = clirunner.run("train.py", *flags, "--out", out, signals=signals)
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr and f"stopped by {signal.Signals(code - 128).name}" in r.stderr, r.stderr
    r = clirunner.run("train.py", *flags, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr
    return end_state(out)


def test_smoke_preset_runs_every_stage_and_resume_after_any_interrupt_reaches_the_same_end(flags, tmp_path):
    with ThreadPoolExecutor(max_workers=3) as pool:
        whole = pool.submit(clirunner.run, "train.py", *flags, "--out", tmp_path / "whole")
        runs = {name: pool.submit(interrupted_then_resumed, flags, tmp_path / f"run{i}", signals, code)
                for i, (name, (signals, code)) in enumerate(MOMENTS.items())}
        assert whole.result().returncode == 0, whole.result().stderr
        expected = end_state(tmp_path / "whole")
        assert expected["entropy.pt"][:2] == (True, 4) and expected["blt_entropy.pt"][:2] == (True, 6)
        assert expected["figures"] == ["blt_entropy.png", "curves.png", "entropy.png"]
        for name, run in runs.items():
            assert run.result() == expected, name


def test_no_checkpoint_is_lost_when_the_second_ctrl_c_comes_during_a_save(flags, tmp_path):
    """The first Ctrl-C asks for a checkpoint at the end of BLT's step 2; the second lands inside that write
    and stops at once: the entropy model's finished checkpoint is intact and BLT has none yet."""
    signals = MOMENTS["second Ctrl-C during the checkpoint write the first asked for"][0]
    r = clirunner.run("train.py", *flags, "--out", tmp_path, signals=signals)
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr
    assert torch.load(tmp_path / "entropy.pt", weights_only=True)["done"]
    assert not (tmp_path / "blt_entropy.pt").exists() and not list(tmp_path.glob(".*tmp*"))

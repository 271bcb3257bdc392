"""One output folder, one run (runtime.FolderLock); a checkpoint knows its corpus, and --resume on another one is
refused unless --new-corpus says so; --device under torchrun. Smoke-sized byte models: seconds each."""
import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import clirunner
from checkpoint import read_checkpoint
from options import pick_device
from runtime import UsageError

# A byte model of the smoke preset, one log record per step.
BYTE = ["--preset", "smoke", "--model", "byte", "--log-interval", "1", "--final-eval-bytes", "1024"]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("corpora")
    a, b = folder / "a.txt", folder / "b.txt"
    a.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog, {i * 7 % 13} times.\n"
                         for i in range(200)))
    b.write_text("".join(f"Verse {i}: shall I compare thee to a summer's day? {i * 5 % 11} more.\n" for i in range(200)))
    return a, b


def records(path: Path, kind: str | None = None) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if kind is None or r["type"] == kind]


def one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def start_in_background(*args) -> tuple[threading.Thread, dict]:
    """train.py args in a thread (a forked child of clirunner); returns the thread and where its Result lands."""
    done = {}
    thread = threading.Thread(target=lambda: done.setdefault("result", clirunner.run("train.py", *args, timeout=300)))
    thread.start()
    return thread, done


def wait_for(condition, what: str, timeout: float = 120):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"gave up waiting for {what}"
        time.sleep(0.1)


def holder_pid(out: Path) -> int:
    """The pid the running train.py wrote into its lock file ("pid command"), once it has."""
    lock = out / ".lock"
    wait_for(lambda: lock.exists() and lock.read_text().split(" ")[0].isdigit(), "the lock")
    return int(lock.read_text().split(" ")[0])


def stop(pid: int, thread: threading.Thread):
    """After a failed assertion, the background run must not train on for minutes."""
    if thread.is_alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        thread.join(60)


def test_a_second_run_into_a_held_folder_is_refused_and_the_first_keeps_its_files(corpora, tmp_path):
    out = tmp_path / "out"
    first = [*BYTE, "--data", corpora[0], "--out", out, "--steps", "100000", "--eval-interval", "100000"]
    thread, done = start_in_background(*first)
    pid = holder_pid(out)
    try:
        wait_for(lambda: (out / "byte.jsonl").exists() and len(records(out / "byte.jsonl")) >= 3, "training")
        # the second run, with --overwrite, other flags and another corpus, is refused before it touches anything
        second = clirunner.run("train.py", *BYTE, "--data", corpora[1], "--out", out, "--overwrite", "--steps", "7")
        line = one_line_error(second)
        assert str(out) in line and f"process {pid} (train.py " in line, line
        assert not (out / "byte.pt").exists()  # the second wrote no checkpoint
        n = len(records(out / "byte.jsonl"))
        wait_for(lambda: len(records(out / "byte.jsonl")) > n, "the first run to go on")
        os.kill(pid, signal.SIGINT)  # it saves a checkpoint and stops
        thread.join(120)
    finally:
        stop(pid, thread)
    assert done["result"].returncode == 128 + signal.SIGINT, done["result"].stderr
    ckpt = read_checkpoint(out / "byte.pt")
    steps = [r["step"] for r in records(out / "byte.jsonl", "train")]
    assert steps == list(range(1, ckpt["step"] + 1)) and ckpt["step"] >= 3  # one run's log, whole
    assert ckpt["steps"] == 100000 and ckpt["corpus"]["name"] == str(corpora[0])  # the first's flags and corpus
    # the folder is free again: the first run continues
    again = clirunner.run("train.py", *first, "--resume", "--stop-at", str(ckpt["step"] + 2))
    assert again.returncode == 0, again.stderr
    assert [r["step"] for r in records(out / "byte.jsonl", "train")] == list(range(1, ckpt["step"] + 3))


def test_a_killed_runs_lock_does_not_block_the_next_run(corpora, tmp_path):
    out = tmp_path / "out"
    thread, done = start_in_background(*BYTE, "--data", corpora[0], "--out", out, "--steps", "100000",
                                       "--eval-interval", "100000")
    pid = holder_pid(out)
    try:
        os.kill(pid, signal.SIGKILL)  # no handler runs: the lock dies with the process
        thread.join(120)
    finally:
        stop(pid, thread)
    assert done["result"].returncode == -signal.SIGKILL, done["result"]
    assert (out / ".lock").exists()  # the file stays; its lock does not
    result = clirunner.run("train.py", *BYTE, "--data", corpora[0], "--out", out, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert read_checkpoint(out / "byte.pt")["done"]


def test_resume_on_another_corpus_is_refused_unless_new_corpus(corpora, tmp_path):
    a, b = corpora
    out = tmp_path / "out"
    common = [*BYTE, "--out", out]
    assert clirunner.run("train.py", *common, "--data", a, "--stop-at", "5").returncode == 0
    saved = read_checkpoint(out / "byte.pt")["corpus"]
    assert saved["name"] == str(a) and saved["train_bytes"] + saved["val_bytes"] == a.stat().st_size
    before = (out / "byte.pt").read_bytes()

    line = one_line_error(clirunner.run("train.py", *common, "--data", b, "--resume"))
    assert str(a) in line and str(b) in line and "--new-corpus" in line, line
    assert (out / "byte.pt").read_bytes() == before  # refused before anything was written
    line = one_line_error(clirunner.run("train.py", *common, "--data", b, "--new-corpus"))
    assert "--new-corpus" in line and "--resume" in line, line

    # the same bytes under another name are the same corpus
    moved = tmp_path / "moved.txt"
    moved.write_bytes(a.read_bytes())
    assert clirunner.run("train.py", *common, "--data", moved, "--resume", "--stop-at", "6").returncode == 0

    result = clirunner.run("train.py", *common, "--data", b, "--resume", "--new-corpus", "--stop-at", "8")
    assert result.returncode == 0, result.stderr
    assert "continuing at step 6" in result.stdout and str(b) in result.stdout
    log = records(out / "byte.jsonl")
    marks = [r for r in log if r["type"] == "corpus"]
    assert len(marks) == 1 and marks[0]["step"] == 6 and marks[0]["from"]["name"] == str(moved)
    assert marks[0]["to"]["name"] == str(b)
    assert [r["step"] for r in log if r["type"] == "train"] == list(range(1, 9))
    assert read_checkpoint(out / "byte.pt")["corpus"]["name"] == str(b)  # from here on, b is its corpus
    assert one_line_error(clirunner.run("train.py", *common, "--data", a, "--resume"))  # and a is another one


def test_a_checkpoint_from_before_the_corpus_record_still_resumes(corpora, tmp_path):
    out = tmp_path / "out"
    common = [*BYTE, "--out", out]
    assert clirunner.run("train.py", *common, "--data", corpora[0], "--stop-at", "5").returncode == 0
    ckpt = torch.load(out / "byte.pt", weights_only=True)
    del ckpt["corpus"]
    torch.save(ckpt, out / "byte.pt")
    result = clirunner.run("train.py", *common, "--data", corpora[1], "--resume")  # nothing to compare with
    assert result.returncode == 0, result.stderr
    assert read_checkpoint(out / "byte.pt")["corpus"]["name"] == str(corpora[1])


def test_device_under_torchrun_cpu_only():
    torchrun = SimpleNamespace(enabled=True, local_rank=1)
    for name in ("cuda", "cuda:0", "mps"):  # refused on any machine, GPU or not
        with pytest.raises(UsageError, match="LOCAL_RANK"):
            pick_device(name, torchrun)
    assert pick_device("cpu", torchrun) == torch.device("cpu")

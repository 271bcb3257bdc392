"""DistributedDataParallel with --compile, as on several GPUs, on the CPU: 2 gloo processes under torchrun train
BLT compiled and take the steps of one uncompiled process, and the number of compiled graphs stays flat while
the patch count changes from batch to batch.

DDP splits a compiled model's graph at its gradient buckets (dynamo's DDPOptimizer), before any backend runs;
the test compiles with aot_eager, which traces forward and backward as inductor does without generating code
(tests/test_inductor.py holds inductor itself to eager), so that both processes compile in seconds.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed

import train
from data import get_batch, load_corpus
from patching import patch_lengths
from test_train import TINY, records

REPO = Path(__file__).resolve().parent.parent
ENTRY = """import sys
sys.path.insert(0, {repo!r})
import train
prepare = train.Task.prepare
train.Task.prepare = lambda self, backend="inductor": prepare(self, "aot_eager")
sys.exit(train.main())
"""

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="this torch build has no gloo backend")


def mixed_corpus(path: Path) -> Path:
    """Blocks of one-letter words (a patch every 2 bytes) and longer blocks of long words (a patch every 27):
    windows of 64 bytes hold from 3 to 33 space patches, so the padded patch count takes several values."""
    short, long_ = b"a b c d e f g h i j k l m n o p q r s t u v w x y z " * 20, b"abcdefghijklmnopqrstuvwxyz " * 100
    path.write_bytes((short + long_) * 20)
    return path


def test_ddp_with_compile_matches_one_uncompiled_process_and_compiles_once(tmp_path):
    corpus = mixed_corpus(tmp_path / "mixed.txt")
    steps = 6
    common = ["--data", str(corpus), *TINY, "--patching", "space", "--seq-len", "64", "--dtype", "fp32",
              "--steps", str(steps), "--eval-interval", "100", "--final-eval-bytes", "512", "--warmup-steps", "2"]
    assert train.main([*common, "--out", str(tmp_path / "one"), "--no-compile"]) == 0
    entry = tmp_path / "entry.py"
    entry.write_text(ENTRY.format(repo=str(REPO)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(entry),
           *common, "--out", str(tmp_path / "two"), "--compile"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes" in r.stdout and "compiling took" in r.stdout

    a = [x["loss"] for x in records(tmp_path / "one" / "blt_space.jsonl", "train")]
    logged = records(tmp_path / "two" / "blt_space.jsonl", "train")
    b = [x["loss"] for x in logged]
    assert len(a) == len(b) == steps and a == pytest.approx(b, rel=1e-4, abs=1e-5)
    graphs = [x["graphs"] for x in logged]  # rank 0's compiled graphs after each step
    assert graphs[0] >= 1 and graphs[-1] == graphs[0], graphs

    # the patch count did change: rank 0's rows (the first half of each batch), padded as train.Task.patch does
    data = load_corpus(str(corpus)).train
    padded = set()
    for step in range(steps):
        x, _ = get_batch(data, 4, 64, 0, step, slice(0, 2))
        P = patch_lengths(x, "space").shape[1]
        padded.add(P + -P % 16)
    assert len(padded) >= 2, padded

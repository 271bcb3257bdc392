"""tools/gpu_check.py on a CPU: its one line without CUDA, its flags, and its dry run (the same training and
sampler measurements on the smoke preset), so the script works the day a GPU is lent."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")
def test_without_cuda_one_line_and_exit_1(capsys):
    assert gpu_check.main([]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and err.startswith("gpu_check: no CUDA device here")


def test_flags_are_checked():
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--preset", "tpu"])
    args = gpu_check.parse_args(["--device", "cpu", "--preset", "smoke", "--steps", "3"])
    assert (args.device, args.preset, args.steps, args.backend) == ("cpu", "smoke", 3, "inductor")


def test_dry_run_on_cpu_prints_the_table(capsys):
    # the eager backend: dynamo captures (and counts) graphs without compiling them, to keep this short
    assert gpu_check.main(["--device", "cpu", "--preset", "smoke", "--backend", "eager", "--steps", "2",
                           "--sample-bytes", "8"]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0] == "| check | result |" and len(table) == 8, out
    assert "skipped (--device cpu)" in out and "bytes/s; " in out and "bytes/s on cpu" in out
    assert ": 0 recompiles" in out and "TFLOP/s" in out

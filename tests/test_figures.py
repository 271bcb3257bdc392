"""tools/figures.py: the patching pictures from an entropy BLT, with a learned-boundary model's chunks and its
training curves beside them, and one-line errors for the wrong checkpoints."""
import sys
from pathlib import Path

import pytest
import torch

import train

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import figures  # noqa: E402

TINY = ["--preset", "smoke", "--seq-len", "32", "--batch-size", "4", "--steps", "3", "--entropy-steps", "3",
        "--calibration-windows", "4", "--eval-interval", "2", "--eval-bytes", "256", "--final-eval-bytes", "256",
        "--log-interval", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("figures")
    corpus = tmp / "text.txt"
    corpus.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300)))
    out = tmp / "run"
    for patching in ("entropy", "learned"):
        assert train.main(["--data", str(corpus), "--out", str(out), "--patching", patching, *TINY]) == 0
    return corpus, out


def test_figures_with_learned_boundaries(runs, tmp_path, capsys):
    corpus, out = runs
    figures.main(["--checkpoint", str(out / "blt_entropy.pt"), "--learned-checkpoint", str(out / "blt_learned.pt"),
                  "--data", str(corpus), "--val-bytes", "2048", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert torch.is_grad_enabled()  # no global switch left behind for the tests that follow
    for name in ("patching_schemes.png", "entropy.png", "patch_sizes.png", "learned_training.png"):
        assert (tmp_path / name).stat().st_size > 5_000, name
        assert name in printed


def test_figures_refuse_the_wrong_checkpoints(runs, tmp_path):
    _, out = runs
    with pytest.raises(SystemExit) as e:  # an entropy BLT given as the learned one
        figures.main(["--checkpoint", str(out / "blt_entropy.pt"), "--learned-checkpoint",
                      str(out / "blt_entropy.pt"), "--out", str(tmp_path)])
    assert "needs train.py --patching learned" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:  # a learned model has no entropy model to draw entropies with
        figures.main(["--checkpoint", str(out / "blt_learned.pt"), "--out", str(tmp_path)])
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value)

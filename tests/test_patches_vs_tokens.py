"""The patches-versus-tokens study (tools/patches_vs_tokens.py) end to end in its smoke preset, and its design:
every model is matched to the BPE model's inference FLOPs per byte."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import patches_vs_tokens as study  # noqa: E402


def published_files() -> dict:
    """The modification times of the files the studies publish: README.md, docs/ and figures/."""
    paths = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "figures").glob("*")]
    return {p: p.stat().st_mtime_ns for p in paths}


@pytest.mark.parametrize("flags,published", [([], True), (["--preset", "smoke"], False), (["--data", "enwik8"], False),
                                             (["--patch-size", "6"], False), (["--preset", "smoke", "--publish"], True),
                                             (["--no-publish"], False)])
def test_experiments_publish_only_the_published_run(flags, published, tmp_path, monkeypatch):
    """tools/experiments.py rewrites README.md's table and figures/ only for the run whose numbers they hold (the
    cpu preset, the default corpus and patch size), or when asked with --publish."""
    import experiments
    seen = {}
    monkeypatch.setattr(experiments, "run_all", lambda args, s, out, readme: seen.update(args=args, readme=readme))
    experiments.main([*flags, "--out", str(tmp_path / "out")])
    assert seen["readme"] == published
    assert Path(seen["args"].figures) == (REPO / "figures" if published else tmp_path / "out" / "figures")


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog, {i * 7 % 13} times. And so to "
                            f"bed!\n" for i in range(600)))
    return path


def test_closest_shape_prefers_the_reference_aspect_within_tolerance():
    flops = lambda d, l: 12 * d * d * l  # noqa: E731  (a transformer's FLOPs per position, roughly)
    dim, layers = study.closest_shape(flops, 12 * 256 * 256 * 4, head_dim=32, aspect=64)
    assert (dim, layers) == (256, 4)
    dim, layers = study.closest_shape(flops, 12 * 256 * 256 * 4 * 2, head_dim=32, aspect=64)  # twice the compute
    assert abs(flops(dim, layers) / (12 * 256 * 256 * 8) - 1) <= study.MATCH_TOLERANCE and dim % 32 == 0


def test_smoke_study_end_to_end(small_corpus, tmp_path):
    out, figures = tmp_path / "study", tmp_path / "figures"
    env = {**os.environ, "BLT_DATA_DIR": str(tmp_path / "cache")}  # the tokenizer cache stays out of data/
    cmd = [sys.executable, str(REPO / "tools" / "experiments.py"), "--study", "tokens", "--preset", "smoke",
           "--data", str(small_corpus), "--out", str(out), "--docs", str(tmp_path / "doc.md"), "--readme", str(tmp_path / "readme.md")]
    for page in ("doc.md", "readme.md"):
        (tmp_path / page).write_text(f"# title\n\nprose\n\n{study.DOC_START}\nold\n{study.DOC_END}\n\nmore prose\n")
    published = published_files()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    # a smoke run leaves the repository's published results alone, and says where it wrote
    assert published_files() == published
    figures = out / "figures"
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith(f"wrote {out / 'results.md'}, ") and str(figures / "patches_vs_tokens.png") in last
    assert str(tmp_path / "doc.md") in last and last.endswith("README.md, docs/ and figures/ left as they are "
                                                              "(--publish rewrites them)"), last

    numbers = json.loads((out / "results.json").read_text())
    budgets, models = numbers["budgets"], numbers["design"]["models"]
    assert list(models) == ["bpe", "byte", "space", "entropy-ps4", "entropy-ps6", "entropy-ps8"]
    target = numbers["design"]["target_flops_per_byte"]
    for name, m in models.items():  # matched inference (hence training) FLOPs per byte, by design
        assert abs(m["flops"] / target - 1) <= study.MATCH_TOLERANCE, name
    widths = [models[f"entropy-ps{p}"]["config"]["global_dim"] * models[f"entropy-ps{p}"]["config"]["global_layers"]
              for p in (4, 8)]
    assert widths[1] > widths[0]  # a larger patch leaves more FLOPs for the global model
    # every model at the largest budget, two seeds, on the same validation bytes
    final = {name: m for name, m in numbers["metrics"].items() if name.endswith(f"-{budgets[-1]}steps-seed0")}
    assert len(final) == 6 and len({m["val_bytes"] for m in final.values()}) == 1
    assert len(numbers["metrics"]) == 4 * len(budgets) + 2 + 6  # 4 lines x budgets, byte and space, seed 1 of all
    assert all(len(v["bpb"]) == 2 for v in numbers["matched"].values())
    # the figure's lines: one per model, one point per budget, training FLOPs increasing
    for line in numbers["fixed_inference"].values():
        assert len(line["flops"]) == len(budgets) and line["flops"] == sorted(line["flops"])
    # robustness: every model, every noise, the clean tokenizer; ALL CAPS shortens BPE tokens
    assert set(numbers["noise"]) == set(final)
    bpe_noise = numbers["noise"][f"bpe-{budgets[-1]}steps-seed0"]
    assert set(bpe_noise) == {"case_flip", "drop", "repeat", "swap", "upper"}
    assert bpe_noise["upper"]["bytes_per_token"] < final[f"bpe-{budgets[-1]}steps-seed0"]["bytes_per_token"]

    text = (out / "results.md").read_text()
    for heading in ("**Matched training compute**", "**Fixed inference compute**", "**Robustness**", "**Reading**"):
        assert heading in text
    assert (figures / "patches_vs_tokens.png").stat().st_size > 10_000
    doc = (tmp_path / "doc.md").read_text()  # only the part between the markers is rewritten
    assert doc.startswith("# title\n\nprose\n\n") and doc.endswith("\n\nmore prose\n") and "old" not in doc
    assert "**Matched training compute**" in doc and "](../figures/patches_vs_tokens.png)" in doc
    readme = (tmp_path / "readme.md").read_text()  # the short version: matched compute, noise, the figure
    assert readme.startswith("# title\n\nprose\n\n") and readme.endswith("\n\nmore prose\n") and "old" not in readme
    assert "| BPE transformer |" in readme and "**Robustness**" in readme and "**Fixed inference" not in readme
    assert "](figures/patches_vs_tokens.png)" in readme

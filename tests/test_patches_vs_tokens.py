"""The patches-versus-tokens study (tools/patches_vs_tokens.py) end to end in its smoke preset, and its design:
every model is matched to the BPE model's inference FLOPs per byte."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

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


@pytest.mark.parametrize("flags,published", [([], True), (["--quick"], False), (["--preset", "smoke"], False),
                                             (["--extra-seeds"], False), (["--quick", "--publish"], True)])
def test_study_publishes_only_the_published_run(flags, published, tmp_path, monkeypatch):
    """The cpu preset with the default flags rewrites README.md, docs/patches_vs_tokens.md and figures/; --quick
    (and any other change) writes under --out only, unless given --publish."""
    seen = {}
    monkeypatch.setattr(study, "study", lambda args: seen.update(args=args))
    study.main([*flags, "--out", str(tmp_path / "out")])
    args = seen["args"]
    assert (args.readme == str(REPO / "README.md")) == published
    assert (args.docs == str(REPO / "docs" / "patches_vs_tokens.md")) == published
    assert Path(args.figures) == (REPO / "figures" if published else tmp_path / "out" / "figures")
    assert args.preset == ("quick" if "--quick" in flags else "smoke" if "smoke" in flags else "cpu")


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


def crossing_at_equal_steps(xs, a, b):
    """The study's first crossing rule, kept here to show it wrong: the lines compared budget by budget (at the
    same STEP), placed at line a's FLOPs."""
    d = [y - x for x, y in zip(a, b)]
    for i in range(len(d) - 1):
        if d[i] * d[i + 1] < 0:
            t = d[i] / (d[i] - d[i + 1])
            return math.exp(math.log(xs[i]) + t * (math.log(xs[i + 1]) - math.log(xs[i])))
    return None


def test_crossing_is_at_equal_training_flops():
    """Two lines straight in log FLOPs: a = 3.0 - 0.2 L and b = 3.3 - 0.35 L (L = ln(FLOPs / 1e12)) cross at
    L = 2, i.e. 1e12 * e^2 FLOPs. b's runs use 80% of a's FLOPs at the same step, as a BLT below the BPE model's
    FLOPs would. Interpolating at equal FLOPs finds the crossing; comparing at equal steps misses it by ~70%."""
    steps = np.array([1, 2, 4, 8, 16])
    xa, xb = 1e12 * steps, 0.8e12 * steps
    a, b = 3.0 - 0.2 * np.log(xa / 1e12), 3.3 - 0.35 * np.log(xb / 1e12)
    truth = 1e12 * math.exp(2.0)
    assert study.crossing(list(xa), list(a), list(xb), list(b)) == pytest.approx(truth, rel=1e-9)
    assert study.crossing(list(xb), list(b), list(xa), list(a)) == pytest.approx(truth, rel=1e-9)  # either way round
    wrong = crossing_at_equal_steps(list(xa), list(a), list(b))
    assert abs(wrong / truth - 1) > 0.5  # the step-based rule: 1.24e13 instead of 7.39e12
    assert study.crossing(list(xa), list(a), list(xb), list(a + 1)) is None  # parallel lines never cross
    assert study.at_flops(list(xa), list(a), truth) == pytest.approx(3.0 - 0.2 * 2.0)


def test_an_edge_best_learning_rate_gets_one_more_beyond_it():
    sweep = {("inside", 1e-3): 3.0, ("inside", 2e-3): 2.0, ("inside", 4e-3): 2.5,
             ("top", 1e-3): 3.0, ("top", 2e-3): 2.0, ("bottom", 1e-3): 1.0, ("bottom", 2e-3): 2.0}
    assert study.edge_learning_rates(sweep) == [("top", 4e-3), ("bottom", 5e-4)]
    assert study.edge_learning_rates({k: v for k, v in sweep.items() if k[0] == "inside"}) == []
    # run folders name the rate exactly: 1.6e-2 is not 2e-2
    assert [study.lr_name(x) for x in (2e-3, 8e-3, 1.6e-2, 1.5e-3)] == ["2e-3", "8e-3", "1.6e-2", "1.5e-3"]


def test_validation_pieces_cover_the_split():
    for n, count, size in [(457_248, 32, 4096), (10_000, 7, 100), (1000, 3, 400), (1000, 5, 300)]:
        chunks = study.val_chunks(n, count, size)
        assert chunks[0][0] == 0 and chunks[-1][1] == n  # from the first byte to the last
        assert all(b0 <= a1 for (_, b0), (a1, _) in zip(chunks, chunks[1:]))  # in order, disjoint
        if count * size < n:
            assert len(chunks) == count and all(b - a == size for a, b in chunks)
            gaps = [a1 - b0 for (_, b0), (a1, _) in zip(chunks, chunks[1:])]
            assert max(gaps) - min(gaps) <= 1  # spread evenly
        else:  # the whole split, every byte once
            assert sum(b - a for a, b in chunks) == n


def test_pieces_score_as_the_whole_split():
    """Pieces that tile the split on window boundaries give exactly train.py's whole-split bits per byte."""
    from entropy_model import ByteLMConfig
    from evaluation import evaluate
    torch.manual_seed(0)
    cfg = ByteLMConfig(dim=32, layers=1, heads=2, multiple_of=16)
    model = cfg.build().eval()
    val = np.frombuffer(bytes(range(256)) * 3, dtype=np.uint8)[:700]
    whole = evaluate(model, "byte", cfg, val, 50, 4, "fp32", torch.device("cpu"))
    pieces = study.score(model, "byte", cfg, None, val, study.val_chunks(len(val), 100, 200), 50, 4, "fp32",
                         torch.device("cpu"))
    assert pieces["val_bytes"] == whole["val_bytes"] == 700
    assert pieces["val_bpb"] == pytest.approx(whole["val_bpb"], rel=1e-6)


class Favourite(torch.nn.Module):
    """A model that ignores its input: every position puts logit 8 on one id, 0 elsewhere."""

    def __init__(self, favourite: int, vocab: int = 260):
        super().__init__()
        self.favourite, self.vocab = favourite, vocab

    def forward(self, x):
        logits = torch.zeros(*x.shape, self.vocab)
        logits[..., self.favourite] = 8.0
        return logits


def test_noised_context_scores_only_the_clean_continuation():
    """Contexts of bytes the model finds costly, continuations of its favourite byte: the score is exactly the
    favourite's cost, so no context byte was scored; and a BPE model's scored tokens spell the continuation."""
    from patching import OFFSET
    cost = lambda logits, i: -torch.log_softmax(logits, -1)[i].item() / math.log(2)  # noqa: E731
    pairs = [(b"QQQQ!!zz" * k, b"x" * (3 + k)) for k in range(1, 6)]
    model = Favourite(ord("x") + OFFSET)
    out = study.score_continuations(model, "byte", None, pairs, "fp32", torch.device("cpu"), batch_size=2)
    expected = cost(torch.eye(260)[ord("x") + OFFSET] * 8.0, ord("x") + OFFSET)
    assert out["val_bytes"] == sum(len(c) for _, c in pairs)
    assert out["val_bpb"] == pytest.approx(expected, rel=1e-6)
    from tokens import ByteBPE, train_bpe
    tok = train_bpe(b"the cat sat on the mat. " * 50, 300)
    setup = type("Setup", (), {"tokenizer": tok})()
    pairs = [(b"tHe cAt SAT", b" on the mat."), (b"the mat", b" sat on the cat.")]
    uniform = study.score_continuations(Favourite(0, tok.vocab_size), "bpe", setup, pairs, "fp32", torch.device("cpu"))
    n_tokens = sum(len(tok.encode(c)) for _, c in pairs)
    per_token = cost(torch.eye(tok.vocab_size)[0] * 8.0, 1)  # every scored token is a non-favourite id
    assert uniform["val_bpb"] == pytest.approx(n_tokens * per_token / sum(len(c) for _, c in pairs), rel=1e-6)
    assert isinstance(tok, ByteBPE)


def test_smoke_study_end_to_end(small_corpus, tmp_path):
    out, figures = tmp_path / "study", tmp_path / "figures"
    env = {**os.environ, "BLT_DATA_DIR": str(tmp_path / "cache")}  # the tokenizer cache stays out of data/
    cmd = [sys.executable, str(REPO / "tools" / "experiments.py"), "--study", "tokens", "--preset", "smoke",
           "--data", str(small_corpus), "--out", str(out), "--docs", str(tmp_path / "doc.md"), "--readme",
           str(tmp_path / "readme.md"), "--seeds", "0", "--extra-seeds", "1"]
    for page in ("doc.md", "readme.md"):
        (tmp_path / page).write_text(f"# title\n\nprose\n\n{study.DOC_START}\nstale table\n{study.DOC_END}\n\nmore prose\n")
    published = published_files()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
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
    assert list(models) == ["bpe", "byte", "byte-hash", "space", "entropy-ps4", "entropy-ps6", "entropy-ps8", "nohash-ps4",
                            "learned-ps4"]
    target = numbers["design"]["target_flops_per_byte"]
    for name, m in models.items():  # matched inference FLOPs per byte (BLT's entropy model included), by design
        assert abs(m["flops"] / target - 1) <= study.MATCH_TOLERANCE, name
    assert models["nohash-ps4"]["config"]["hash_ngram_sizes"] == [] and models["entropy-ps4"]["config"]["hash_ngram_sizes"]
    assert models["byte-hash"]["config"]["hash_ngram_sizes"] == models["entropy-ps4"]["config"]["hash_ngram_sizes"]
    widths = [models[f"entropy-ps{p}"]["config"]["global_dim"] * models[f"entropy-ps{p}"]["config"]["global_layers"]
              for p in (4, 8)]
    assert widths[1] > widths[0]  # a larger patch leaves more FLOPs for the global model
    # the learning-rate sweep: every model at each rate, one more beyond an edge best (up to lr_extend); the
    # best one is used everywhere
    factors, extend = study.PRESETS["smoke"]["lr_factors"], study.PRESETS["smoke"]["lr_extend"]
    for name in models:
        tried = {float(k.split(" lr ")[1]): v for k, v in numbers["sweep"].items() if k.split(" lr ")[0] == name}
        assert len(factors) <= len(tried) <= len(factors) + extend, name
        best = numbers["best_lr"][name]
        assert tried[best] == min(tried.values()), name
        assert min(tried) < best < max(tried) or len(tried) == len(factors) + extend, name
    # every model at the largest budget with both seeds, on the same validation bytes
    assert all(len(v["bpb"]) == 2 for v in numbers["matched"].values())
    assert len({v["val_bytes"] for v in numbers["scores"].values()}) == 1
    # the figure's lines: one per model, one point per budget (mean and spread), training FLOPs increasing,
    # BLT's with its entropy model above those without
    for name, line in numbers["fixed_inference"].items():
        assert len(line["flops"]) == len(line["err"]) == len(budgets) and line["flops"] == sorted(line["flops"])
        assert all(w > wo for w, wo in zip(line["flops"], line["flops_without"])) == name.startswith("entropy")
    assert set(numbers["crossings"]) == {"entropy-ps4", "entropy-ps6", "entropy-ps8"}
    # noise: damage to context (clean and every noise), the whole text noised; ALL CAPS shortens BPE tokens
    assert all(set(v) == {"clean", "case_flip", "drop", "repeat", "swap", "upper"} for v in numbers["context_noise"].values())
    bpe_noise = numbers["whole_noise"]["bpe"]
    assert bpe_noise["upper"]["unit"] < numbers["matched"]["bpe"]["unit"]

    text = (out / "results.md").read_text()
    for heading in ("**Design**", "**Learning rates**", "**Fixed inference compute**", "**Matched compute**",
                    "**Noise as damage to context**", "**Noise on the whole text**", "**Reading**"):
        assert heading in text
    assert (figures / "patches_vs_tokens.png").stat().st_size > 10_000
    doc = (tmp_path / "doc.md").read_text()  # only the part between the markers is rewritten
    assert doc.startswith("# title\n\nprose\n\n") and doc.endswith("\n\nmore prose\n") and "stale table" not in doc
    assert "**Matched compute**" in doc and "](../figures/patches_vs_tokens.png)" in doc
    readme = (tmp_path / "readme.md").read_text()  # the short version: matched compute, noise, the reading, figure
    assert readme.startswith("# title\n\nprose\n\n") and readme.endswith("\n\nmore prose\n") and "stale table" not in readme
    assert "| BPE transformer |" in readme and "**Noise as damage to context**" in readme
    # learned boundaries: a row at matched compute, its realised bytes per chunk, and a clause of the reading
    assert models["learned-ps4"]["config"]["patching"] == "learned" and "learned-ps4" in numbers["matched"]
    assert 1 < numbers["matched"]["learned-ps4"]["unit"] < 48
    assert "| BLT learned boundaries (H-Net), target 4 |" in readme and "Learned boundaries (H-Net's" in readme
    assert "**Fixed inference" not in readme and "1. *Matched compute (paper section 5).*" in readme
    assert "](figures/patches_vs_tokens.png)" in readme

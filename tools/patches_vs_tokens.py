"""Patches versus tokens: the paper's title experiment (figure 1, sections 5-6) at small scale, from one command.

    python tools/experiments.py --study tokens                 # CPU preset (about 75 minutes on 2 idle cores)
    python tools/experiments.py --study tokens --preset gpu    # one GPU: larger models, enwik8
    python tools/experiments.py --study tokens --plan          # print the models and their FLOPs; train nothing
    python tools/patches_vs_tokens.py ...                      # the same, without the dispatcher

Every model is trained by train.py (the same recipe, batches of the same bytes, the same learning rate and
schedule) and scored on the same validation bytes in bits per byte. Compute is counted per byte with the
paper's accounting (section 4.5; blt.flops_per_byte, tokens.token_flops_per_byte). Three parts:

1. Matched training compute. A BPE-token transformer (tokens.py, vocabulary --vocab-size, trained on the
   training split), a plain byte transformer, BLT with space patching and BLT with entropy patching, all at
   the same training FLOPs per byte and the same bytes seen. The BPE model is the reference: every other
   model's width (and depth) is chosen so that its inference FLOPs per byte match the BPE model's; training
   FLOPs are 3x inference for every model, so they match too. Two seeds each.
2. Fixed inference compute (paper figure 1 in miniature). BLT with entropy patching at average patch sizes
   4, 6 and 8 (thresholds calibrated to each); a larger patch leaves more FLOPs per patch, which go to a wider
   (and deeper) global model. Each model, and the BPE model, is trained at three budgets of bytes seen; the
   figure plots val bits per byte against training FLOPs (log x), one line per model.
3. Robustness to noise (paper section 6). Every model of part 1 at the largest budget is evaluated on noised
   copies of the same validation bytes (tools/noise.py: case flips, drops, repeats, neighbour swaps, ALL CAPS; fixed
   seed, --noise-rate). The tokenizer stays the one trained on clean text.

Outputs: OUT/results.md and OUT/results.json (tables, design, every number) and the figure. The repository
publishes one run's numbers, the cpu preset with the default flags: that run (or any run given --publish)
also writes the tables between the markers of docs/patches_vs_tokens.md (all of them) and of README.md
(matched compute and noise), and figures/patches_vs_tokens.png; any other run draws OUT/figures/ and leaves
those files alone (--docs, --readme and --figures name other places to write). It says which files it
rewrote. Finished runs are reused, so an interrupted study continues where it stopped (train.py --resume).
Runs go through train.main in this process (a fresh Python per run would cost seconds each); each run's
output goes to OUT/experiments.log. One study per OUT at a time (runtime.FolderLock).
"""
import argparse
import contextlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere: the paper modules live at the top of the repository

import numpy as np  # noqa: E402
import torch  # noqa: E402

import runtime  # noqa: E402
import train  # noqa: E402
from blt import BLT, BLTConfig, byte_transformer_flops_per_byte, count_parameters, flops_per_byte  # noqa: E402
from checkpoint import load_checkpoint, read_checkpoint  # noqa: E402
from data import DataError, get_batch, load_corpus  # noqa: E402
from entropy_model import ByteLMConfig  # noqa: E402
from evaluation import evaluate  # noqa: E402
from tools.experiments import published_run, tell_written  # noqa: E402
from tools.noise import NOISES, RATE, add_noise  # noqa: E402
from patching import average_patch_size, patch_lengths  # noqa: E402
from plots import plot_patches_vs_tokens  # noqa: E402
from tokens import TokenLMConfig, prepare_tokens, token_flops_per_byte  # noqa: E402

DOC_START, DOC_END = "<!-- patches-vs-tokens:start -->", "<!-- patches-vs-tokens:end -->"

# budgets: training steps of batch_size x seq_len bytes; the last one is the matched-compute budget (part 1).
# bpe: the reference model; blt: BLTConfig fields on top of train.py's preset (`base`); head_dim: the width
# step of the shapes designed here (heads = width / head_dim).
PRESETS = {
    "cpu": dict(base="cpu", data="shakespeare", seq_len=256, batch_size=32, lr=2e-3, budgets=(75, 150, 300),
                entropy_steps=300, eval_bytes=1 << 15, final_eval_bytes=1 << 17, head_dim=32,
                bpe=dict(dim=256, layers=4, heads=4, multiple_of=32), blt={}, byte_multiple_of=32),
    "gpu": dict(base="gpu", data="enwik8", seq_len=1024, batch_size=64, lr=4e-4, budgets=(1000, 2000, 4000),
                entropy_steps=3000, eval_bytes=1 << 18, final_eval_bytes=1 << 21, head_dim=64,
                bpe=dict(dim=768, layers=12, heads=12, multiple_of=256), byte_multiple_of=256,
                blt=dict(local_dim=384, local_heads=6, decoder_layers=2)),  # lighter locals: FLOPs go global
    "smoke": dict(base="cpu", data="shakespeare", seq_len=48, batch_size=4, lr=2e-3, budgets=(2, 3, 4),
                  entropy_steps=3, eval_bytes=512, final_eval_bytes=1024, head_dim=8, vocab_size=320,
                  bpe=dict(dim=64, layers=2, heads=2, multiple_of=16), byte_multiple_of=16,
                  blt=dict(entropy_dim=16, entropy_layers=1, entropy_heads=1, entropy_window=16, local_dim=16,
                           local_heads=1, decoder_layers=1, local_window=48, hash_buckets=64, multiple_of=16)),
}
MATCH_TOLERANCE = 0.05  # a shape whose FLOPs per byte are within 5% of the target counts as matched


# ---- design: shapes with the BPE model's inference FLOPs per byte ----

def closest_shape(flops, target: float, head_dim: int, aspect: float) -> tuple[int, int]:
    """(dim, layers) whose flops(dim, layers) is closest to target: among shapes within MATCH_TOLERANCE, the one
    whose dim / layers is closest to `aspect` (the reference model's), else the closest overall. dim is a
    multiple of head_dim (heads = dim / head_dim)."""
    candidates = []
    for layers in range(1, 49):
        dim = min(range(head_dim, 64 * head_dim + 1, head_dim), key=lambda d: abs(math.log(flops(d, layers) / target)))
        error = abs(math.log(flops(dim, layers) / target))
        candidates.append((error > MATCH_TOLERANCE, abs(math.log(dim / layers / aspect)) if error <= MATCH_TOLERANCE
                           else error, dim, layers))
    _, _, dim, layers = min(candidates)
    return dim, layers


def design(s: dict, corpus, vocab_size: int, patch_sizes: list[float]) -> dict:
    """The models of the study: the BPE reference, then a byte transformer and BLTs with the same inference
    FLOPs per byte. Patch sizes are the targets (entropy) or measured on training windows (space)."""
    tokens = prepare_tokens(corpus.train, vocab_size, s["seq_len"])
    bpe = TokenLMConfig(vocab_size=tokens.tokenizer.vocab_size, **s["bpe"])
    target = token_flops_per_byte(bpe, tokens.train_bytes_per_token, tokens.seq_len)["forward_total"]
    aspect = bpe.dim / bpe.layers
    models = {"bpe": dict(kind="bpe", config=asdict(bpe), unit=tokens.train_bytes_per_token, flops=target,
                          flags=["--model", "bpe", "--vocab-size", str(vocab_size)]
                          + [f for k, v in s["bpe"].items() for f in ("--config", f"{k}={v}")])}
    hd, mo = s["head_dim"], s["byte_multiple_of"]
    dim, layers = closest_shape(lambda d, l: byte_transformer_flops_per_byte(d, l, s["seq_len"], mo)["forward_total"],
                                target, hd, aspect)
    byte = dict(dim=dim, layers=layers, heads=dim // hd, multiple_of=mo)
    models["byte"] = dict(kind="byte", config=asdict(ByteLMConfig(**byte)), unit=1.0, flags=["--model", "byte"]
                          + [f for k, v in byte.items() for f in ("--config", f"{k}={v}")],
                          flops=byte_transformer_flops_per_byte(dim, layers, s["seq_len"], mo)["forward_total"])
    base = BLTConfig.from_dict({**train.PRESETS[s["base"]]["blt"].to_dict(), **s["blt"]})
    x, _ = get_batch(corpus.train, 256, s["seq_len"], 1_000_003, 0)  # training windows, as calibration uses
    space_size = average_patch_size(patch_lengths(x, "space"))
    for name, scheme, size in [("space", "space", space_size)] + [(f"entropy-ps{p:g}", "entropy", p) for p in patch_sizes]:
        def blt_flops(d, l, scheme=scheme, size=size):
            cfg = BLTConfig.from_dict({**base.to_dict(), "patching": scheme, "global_dim": d, "global_layers": l,
                                       "global_heads": d // hd})
            return flops_per_byte(cfg, size, s["seq_len"])["forward_total"]
        local = blt_flops(hd, 1)
        if local >= target:
            raise SystemExit(f"error: BLT's local models alone cost {local / 1e6:.2f} MFLOP/byte, more than the BPE "
                             f"model's {target / 1e6:.2f}: use a larger BPE model or lighter local models")
        dim, layers = closest_shape(blt_flops, target, hd, base.global_dim / base.global_layers)
        glob = dict(global_dim=dim, global_layers=layers, global_heads=dim // hd)
        cfg = {**base.to_dict(), **glob, "patching": scheme, "patch_size": size}
        models[name] = dict(kind="blt", config=cfg, unit=size, flops=blt_flops(dim, layers),
                            flags=["--stage", "blt", "--patching", scheme]
                            + (["--patch-size", f"{size:g}"] if scheme == "entropy" else [])
                            + [f for k, v in {**s["blt"], **glob}.items() for f in ("--config", f"{k}={v}")])
    return {"target_flops_per_byte": target, "bytes_per_token_train": tokens.train_bytes_per_token,
            "token_seq_len": tokens.seq_len, "models": models}


def parameters(kind: str, config: dict) -> dict:
    """Parameter counts: the model without hash tables or entropy model, and those two apart."""
    with torch.device("meta"):
        if kind == "blt":
            c = count_parameters(BLT(BLTConfig.from_dict(config)))
            return {"model": c["encoder"] + c["global_transformer"] + c["decoder"], "hash": c["hash_embeddings"],
                    "entropy": c["entropy_model"]}
        model = TokenLMConfig(**config).build() if kind == "bpe" else ByteLMConfig(**config).build()
    return {"model": sum(p.numel() for p in model.parameters()), "hash": 0, "entropy": 0}


# ---- running ----

class Runner:
    """train.py runs in this process, each into its own folder, output appended to OUT/experiments.log."""

    def __init__(self, out: Path, s: dict, data: str, preset: str):
        self.out, self.s, self.data, self.preset = out, s, data, preset
        self.log = open(out / "experiments.log", "a")
        if preset == "smoke":  # each run's curve pictures would take longer than the run itself
            runtime.plot_curves = train.plot_curves = lambda *args, **kwargs: None

    def train(self, folder: Path, *flags: str, steps: int | None = None):
        s = self.s
        argv = ["--preset", s["base"], "--data", self.data, "--out", str(folder), "--resume",
                "--seq-len", str(s["seq_len"]), "--batch-size", str(s["batch_size"]), "--lr", str(s["lr"]),
                "--entropy-steps", str(s["entropy_steps"]), "--final-eval-bytes", str(s["final_eval_bytes"]),
                "--eval-bytes", str(s["eval_bytes"]), "--log-interval", "10", *flags]
        if steps is not None:  # warmup: the first fifth of every budget; one evaluation and checkpoint half-way
            argv += ["--steps", str(steps), "--warmup-steps", str(max(1, steps // 5)),
                     "--eval-interval", str(max(1, steps // 2))]
        if self.preset == "smoke":  # fp32 and one thread: tiny matmuls in bf16 pay a kernel set-up per shape
            argv += ["--entropy-seq-len", str(s["seq_len"]), "--calibration-windows", "8", "--dtype", "fp32",
                     "--threads", "1"]
        print("$ python train.py", " ".join(argv), flush=True)
        self.log.write("$ python train.py " + " ".join(argv) + "\n")
        self.log.flush()
        with contextlib.redirect_stdout(self.log), contextlib.redirect_stderr(self.log):
            code = train.main(argv)
        self.log.flush()
        if code != 0:
            last = Path(self.log.name).read_text().strip().splitlines()[-1]
            raise SystemExit(f"train.py failed (exit {code}): {last}\n(the whole output: {self.log.name})")


def run_name(model: str, steps: int, seed: int) -> str:
    return f"{model}-{steps}steps-seed{seed}"


CHECKPOINT = {"bpe": "bpe.pt", "byte": "byte.pt", "space": "blt_space.pt"}  # entropy-ps*: blt_entropy.pt


def train_everything(runner: Runner, plan: dict, s: dict, patch_sizes: list[float], seeds: list[int]) -> dict:
    """Entropy model -> thresholds -> every run. Returns {run name: checkpoint path}."""
    out, models = runner.out, plan["models"]
    entropy_flags = [f for k, v in s["blt"].items() for f in ("--config", f"{k}={v}")]  # entropy_*, multiple_of
    runner.train(out / "entropy", "--stage", "entropy", "--patching", "entropy", *entropy_flags)
    for p in patch_sizes:  # one threshold per target patch size, shared by every run with that size
        folder = out / f"calibration-ps{p:g}"
        if not (folder / "calibration.json").exists():
            folder.mkdir(exist_ok=True)
            shutil.copy(out / "entropy" / "entropy.pt", folder / "entropy.pt")
            runner.train(folder, "--stage", "calibrate", "--patching", "entropy", "--patch-size", f"{p:g}", *entropy_flags)
    budgets, runs = s["budgets"], {}
    jobs = [(m, b, seeds[0]) for m in ["bpe"] + [f"entropy-ps{p:g}" for p in patch_sizes] for b in budgets]
    jobs += [(m, budgets[-1], seeds[0]) for m in ("byte", "space")]
    jobs += [(m, budgets[-1], seed) for seed in seeds[1:] for m in models]
    for model, steps, seed in jobs:
        folder = out / "runs" / run_name(model, steps, seed)
        folder.mkdir(parents=True, exist_ok=True)
        if model.startswith("entropy"):
            calibration = out / f"calibration-ps{model.removeprefix('entropy-ps')}"
            for f in ("entropy.pt", "calibration.json"):
                if not (folder / f).exists():
                    shutil.copy(calibration / f, folder / f)
        runner.train(folder, *models[model]["flags"], "--seed", str(seed), steps=steps)
        runs[run_name(model, steps, seed)] = folder / CHECKPOINT.get(model, "blt_entropy.pt")
    return runs


def noise_results(runs: dict, names: list[str], corpus, s: dict, rate: float, cache: Path) -> dict:
    """{run: {noise: metrics}} on noised copies of the first final_eval_bytes validation bytes (cached)."""
    results = json.loads(cache.read_text()) if cache.exists() else {}
    clean = corpus.val[: s["final_eval_bytes"]]
    noised = {kind: np.frombuffer(add_noise(clean, kind, rate), dtype=np.uint8) for kind in NOISES}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    keys = {name: f"{name} rate {rate} bytes {len(clean)} mtime {runs[name].stat().st_mtime_ns}" for name in names}
    for name, key in keys.items():  # a retrained checkpoint has another mtime, hence another key
        if key in results:
            continue
        kind, cfg, model = load_checkpoint(runs[name])
        tc = read_checkpoint(runs[name])["train"]
        model.to(device)
        results[key] = {}
        for noise, data in noised.items():
            print(f"noise: {name} on {noise} ({len(data):,} bytes)", flush=True)
            results[key][noise] = evaluate(model, kind, cfg, data, tc["seq_len"], tc["batch_size"], tc["dtype"],
                                           device, None, tokens=getattr(model, "tokens", None))
        cache.write_text(json.dumps(results, indent=1))
    return {name: results[key] for name, key in keys.items()}


# ---- tables and the reading ----

LABELS = {"bpe": "BPE transformer", "byte": "byte transformer", "space": "BLT space"}


def label(model: str) -> str:
    return LABELS.get(model) or f"BLT entropy, patch {model.removeprefix('entropy-ps')}"


def fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n:,.0f} bytes"


def fmt_seeds(values: list[float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values) + (f" (mean {np.mean(values):.3f})" if len(values) > 1 else "")


def crossing(xs: list[float], a: list[float], b: list[float]) -> str | None:
    """Where line b crosses line a (both BPB at the same training FLOPs xs), by log-linear interpolation."""
    d = [y - x for x, y in zip(a, b)]
    for i in range(len(d) - 1):
        if d[i] * d[i + 1] < 0:
            t = d[i] / (d[i] - d[i + 1])
            return f"{math.exp(math.log(xs[i]) + t * (math.log(xs[i + 1]) - math.log(xs[i]))):.2e}"
    return None


def report(plan: dict, runs: dict, noise: dict, s: dict, seeds: list[int], patch_sizes: list[float], args,
           minutes: float) -> tuple[str, dict]:
    metrics = {name: read_checkpoint(path)["metrics"] for name, path in runs.items()}
    models, budgets, last = plan["models"], s["budgets"], s["budgets"][-1]
    m0 = metrics[run_name("byte", last, seeds[0])]
    run_minutes = sum(m["stage_seconds"] for m in metrics.values()) / 60  # every run, however many invocations
    lines = [f"Regenerate with `python tools/experiments.py --study tokens --preset {args.preset}` "
             f"({run_minutes:.0f} minutes of training runs here; corpus {args.data or s['data']}; BPE vocabulary {args.vocab_size}; "
             f"windows of {s['seq_len']} bytes = {plan['token_seq_len']} tokens; batch {s['batch_size']}; "
             f"lr {s['lr']}; validation on the first {m0['val_bytes']:,} held-out bytes).", ""]

    # part 1: matched training compute
    lines += [f"**Matched training compute**: {last} steps = {fmt_bytes(m0['bytes'])} seen by every model (the BPE "
              f"model's windows of {plan['token_seq_len']} tokens span {plan['token_seq_len'] * plan['bytes_per_token_train']:.1f} "
              f"bytes on average); seeds {', '.join(map(str, seeds))}.", "",
              "| model | val BPB | bytes per token or patch | train MFLOP/byte | inference MFLOP/byte | parameters "
              "| hash-table parameters | entropy-model parameters |", "|---|---|---|---|---|---|---|---|"]
    table1 = {}
    for model in models:
        ms = [metrics[run_name(model, last, seed)] for seed in seeds]
        bpb = [m["val_bpb"] for m in ms]
        unit = ms[0].get("bytes_per_token", ms[0].get("patch_size", 1.0))
        p = parameters(models[model]["kind"], read_checkpoint(runs[run_name(model, last, seeds[0])])["config"])
        table1[model] = {"bpb": bpb, "unit": unit, "params": p}
        lines.append(f"| {label(model)} | {fmt_seeds(bpb)} | {unit:.2f} | {ms[0]['train_flops_per_byte'] / 1e6:.2f} | "
                     f"{ms[0]['forward_flops_per_byte'] / 1e6:.2f} | {p['model'] / 1e6:.2f}M | {p['hash'] / 1e6:.2f}M | "
                     f"{p['entropy'] / 1e6:.3f}M |")

    part1 = list(lines)

    # part 2: fixed inference compute, several budgets
    lines += ["", f"**Fixed inference compute** ({plan['target_flops_per_byte'] / 1e6:.2f} MFLOP/byte, the BPE "
              f"model's): val BPB at each training budget (seed {seeds[0]}).", "",
              "| model | global model (width x layers) | " + " | ".join(
                  f"{b} steps, {fmt_bytes(b * s['batch_size'] * s['seq_len'])}" for b in budgets) + " |",
              "|---|---|" + "---|" * len(budgets)]
    lines_fig = {}
    for model in ["bpe"] + [f"entropy-ps{p:g}" for p in patch_sizes]:
        ms = [metrics[run_name(model, b, seeds[0])] for b in budgets]
        c = models[model]["config"]
        shape = (f"{c['dim']} x {c['layers']} (tokens)" if model == "bpe"
                 else f"{c['global_dim']} x {c['global_layers']}")
        lines_fig[model] = {"flops": [m["bytes"] * m["train_flops_per_byte"] for m in ms],
                            "bpb": [m["val_bpb"] for m in ms], "label": label(model),
                            "seeds": [metrics[run_name(model, last, seed)]["val_bpb"] for seed in seeds]}
        lines.append(f"| {label(model)} | {shape} | " + " | ".join(
            f"{m['val_bpb']:.3f} ({m['bytes'] * m['train_flops_per_byte']:.2e} FLOPs)" for m in ms) + " |")

    # part 3: noise
    noise_names = list(NOISES)
    lines += ["", f"**Robustness**: val BPB on noised copies of the same validation bytes (tools/noise.py, rate "
              f"{args.noise_rate:g}, seed 0; {last} steps, seed {seeds[0]}); in brackets the increase over clean.", "",
              "| model | clean | " + " | ".join(noise_names) + " |", "|---|---|" + "---|" * len(noise_names)]
    units = ["", "Bytes per token or patch under noise (inference FLOPs per byte scale with their inverse for "
             "the BPE model and BLT's global model):", "", "| model | clean | " + " | ".join(noise_names) + " |",
             "|---|---|" + "---|" * len(noise_names)]
    table3 = {}
    for model in models:
        name = run_name(model, last, seeds[0])
        clean, unit = metrics[name]["val_bpb"], table1[model]["unit"]
        table3[model] = {k: v["val_bpb"] - clean for k, v in noise[name].items()}
        lines.append(f"| {label(model)} | {clean:.3f} | " + " | ".join(
            f"{noise[name][k]['val_bpb']:.3f} (+{noise[name][k]['val_bpb'] - clean:.3f})" for k in noise_names) + " |")
        units.append(f"| {label(model)} | {unit:.2f} | " + " | ".join(
            f"{noise[name][k].get('bytes_per_token', noise[name][k].get('patch_size', 1.0)):.2f}" for k in noise_names) + " |")
    lines += units
    # the README's short version: part 1, the noise increases and the figure
    short = part1[2:] + ["", f"**Robustness**: increase in val BPB on noised copies of the validation bytes (rate "
                         f"{args.noise_rate:g}; clean in the first column).", "",
                         "| model | clean | " + " | ".join(noise_names) + " |", "|---|---|" + "---|" * len(noise_names)]
    short += [f"| {label(m)} | {metrics[run_name(m, last, seeds[0])]['val_bpb']:.3f} | "
              + " | ".join(f"+{table3[m][k]:.3f}" for k in noise_names) + " |" for m in models]

    # the reading, computed from the numbers
    lines += ["", "**Reading** (generated from the numbers above):", ""]
    spread = {m: max(v["bpb"]) - min(v["bpb"]) for m, v in table1.items()} if len(seeds) > 1 else {}
    ranked = sorted(table1, key=lambda m: np.mean(table1[m]["bpb"]))
    lines.append("- Matched compute, best to worst (mean over seeds): " + ", ".join(
        f"{label(m)} {np.mean(table1[m]['bpb']):.3f}" for m in ranked) + ".")
    ref = np.mean(table1["bpe"]["bpb"])
    for m in ranked:
        if m == "bpe":
            continue
        gap, noise_level = np.mean(table1[m]["bpb"]) - ref, max(spread.get(m, 0), spread.get("bpe", 0))
        verdict = ("within the seed-to-seed spread" if abs(gap) <= noise_level else
                   "better than BPE" if gap < 0 else "worse than BPE")
        lines.append(f"- {label(m)} vs BPE: {gap:+.3f} bpb ({verdict}; largest seed spread of the two "
                     f"{noise_level:.3f}).")
    bpe_line = lines_fig["bpe"]
    for model in [f"entropy-ps{p:g}" for p in patch_sizes]:
        line = lines_fig[model]
        where = crossing(bpe_line["flops"], bpe_line["bpb"], line["bpb"])
        diffs = ", ".join(f"{b - a:+.3f}" for a, b in zip(bpe_line["bpb"], line["bpb"]))
        lines.append(f"- Fixed inference compute, {label(model)} minus BPE at the {len(budgets)} budgets: {diffs}; "
                     + (f"the lines cross near {where} training FLOPs." if where else "the lines do not cross here."))
    for noise_kind in noise_names:
        best = min(table3, key=lambda m: table3[m][noise_kind])
        lines.append(f"- {noise_kind}: smallest increase {label(best)} (+{table3[best][noise_kind]:.3f}); "
                     f"BPE +{table3['bpe'][noise_kind]:.3f}.")
    data = {"design": plan, "metrics": metrics, "noise": noise, "matched": table1, "fixed_inference": lines_fig,
            "noise_increase": table3, "seeds": seeds, "budgets": budgets, "minutes": minutes,
            "run_minutes": run_minutes}
    return "\n".join(lines), "\n".join(short), data


def fill_markers(doc: Path, text: str) -> bool:
    """Rewrite the part of `doc` between DOC_START and DOC_END with `text` (a new page if doc is missing).
    Returns whether it did."""
    try:
        body = doc.read_text() if doc.exists() else f"# Patches versus tokens\n\n{DOC_START}\n{DOC_END}\n"
        if DOC_START not in body or DOC_END not in body:
            print(f"warning: {doc} has no {DOC_START} ... {DOC_END} markers; left as it is", file=sys.stderr)
            return False
        before, rest = body.split(DOC_START, 1)
        doc.write_text(before + DOC_START + "\n" + text + "\n" + DOC_END + rest.split(DOC_END, 1)[1])
        return True
    except (OSError, UnicodeDecodeError) as e:  # the tables are in OUT/results.md already
        sys.exit(f"error: cannot rewrite {doc}: {getattr(e, 'strerror', None) or e}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=PRESETS, default="cpu")
    p.add_argument("--data", default=None, help="corpus (train.py --data; default: the preset's)")
    p.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary (default 4096)")
    p.add_argument("--patch-sizes", type=float, nargs="+", default=[4, 6, 8], help="entropy BLT patch sizes")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the largest budget's runs")
    p.add_argument("--noise-rate", type=float, default=RATE, help="tools/noise.py rate")
    p.add_argument("--out", default="out/patches_vs_tokens", help="folder for the runs and tables")
    p.add_argument("--figures", default=None,
                   help="folder for patches_vs_tokens.png (default: figures/ when publishing, else OUT/figures)")
    p.add_argument("--docs", default=None, help="markdown file whose results section is rewritten (default: "
                   "docs/patches_vs_tokens.md when publishing, else none; '' for none)")
    p.add_argument("--readme", default=None, help="markdown file whose short results (matched compute, noise, "
                   "figure) are rewritten (default: README.md when publishing, else none; '' for none)")
    p.add_argument("--publish", action=argparse.BooleanOptionalAction, default=None,
                   help="rewrite README.md, docs/patches_vs_tokens.md and figures/ (default: only for the published "
                        "run, the cpu preset with the default --data, --vocab-size, --patch-sizes, --seeds and --noise-rate)")
    p.add_argument("--plan", action="store_true", help="print the models and their FLOPs per byte, train nothing")
    args = p.parse_args(argv)
    out = Path(args.out)
    publish = args.publish if args.publish is not None else published_run(
        p, args, ("preset", "data", "vocab_size", "patch_sizes", "seeds", "noise_rate"))
    args.figures = args.figures or str(ROOT / "figures" if publish else out / "figures")
    args.docs = str(ROOT / "docs" / "patches_vs_tokens.md") if args.docs is None and publish else args.docs
    args.readme = str(ROOT / "README.md") if args.readme is None and publish else args.readme
    out.mkdir(parents=True, exist_ok=True)
    try:
        with runtime.FolderLock(out):  # one study per folder: two would train into the same runs
            return study(args)
    except runtime.UsageError as e:
        sys.exit(f"error: {e}")


def study(args):
    s = PRESETS[args.preset]
    args.vocab_size = args.vocab_size or s.get("vocab_size", 4096)
    data = args.data or s["data"]
    t0 = time.time()
    try:
        corpus = load_corpus(data)
    except DataError as e:
        sys.exit(f"error: {e}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = design(s, corpus, args.vocab_size, args.patch_sizes)
    print(f"target: {plan['target_flops_per_byte'] / 1e6:.3f} MFLOP/byte inference (the BPE model's, "
          f"{plan['bytes_per_token_train']:.2f} bytes per token, windows of {plan['token_seq_len']} tokens)")
    for name, m in plan["models"].items():
        params = parameters(m["kind"], m["config"])
        print(f"  {label(name):28s} {m['flops'] / 1e6:7.3f} MFLOP/byte at {m['unit']:.2f} bytes per step "
              f"| parameters {params['model'] / 1e6:.2f}M (+ hash {params['hash'] / 1e6:.2f}M) | "
              + " ".join(m["flags"]))
    if args.plan:
        return
    runner = Runner(out, s, data, args.preset)
    runs = train_everything(runner, plan, s, args.patch_sizes, args.seeds)
    names = [run_name(m, s["budgets"][-1], args.seeds[0]) for m in plan["models"]]
    noise = noise_results(runs, names, corpus, s, args.noise_rate, out / "noise.json")
    minutes = (time.time() - t0) / 60
    text, short, numbers = report(plan, runs, noise, s, args.seeds, args.patch_sizes, args, minutes)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(numbers, indent=1) + "\n")
    Path(args.figures).mkdir(parents=True, exist_ok=True)
    plot_patches_vs_tokens(numbers["fixed_inference"], {label(m): v for m, v in numbers["noise_increase"].items()},
                           Path(args.figures) / "patches_vs_tokens.png")
    figure = f"![patches versus tokens]({{}}{Path(args.figures).name}/patches_vs_tokens.png)"
    written = [Path(args.figures) / "patches_vs_tokens.png"]
    if args.docs and fill_markers(Path(args.docs), text + "\n\n" + figure.format("../")):
        written.append(Path(args.docs))
    if args.readme and fill_markers(Path(args.readme), short + "\n\n" + figure.format("")):
        written.append(Path(args.readme))
    print(text)
    print(f"done in {minutes:.0f} minutes; tables in {out / 'results.md'}, figure in {args.figures}/patches_vs_tokens.png")
    tell_written([out / "results.md", out / "results.json", *written])


if __name__ == "__main__":
    main()

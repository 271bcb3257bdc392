"""Patches versus tokens: the paper's title experiment (figure 1, sections 5-6) at small scale, with the
controls that say where BLT's advantage comes from, from one command.

    python tools/experiments.py --study tokens                 # CPU preset (about 2.5 hours on 2 cores)
    python tools/experiments.py --study tokens --quick         # the same study, smaller (about 15 minutes)
    python tools/experiments.py --study tokens --plan          # the models, FLOPs, runs and time; train nothing
    python tools/experiments.py --study tokens --preset gpu    # one GPU: larger models, enwik8
    python tools/patches_vs_tokens.py ...                      # the same, without the dispatcher

Every model is trained by train.py (the same recipe, batches of the same bytes, the same schedule) and scored
on the same validation bytes in bits per byte. Compute is counted per byte with the paper's accounting
(section 4.5; blt.flops_per_byte, tokens.token_flops_per_byte; blt.py states the attention convention, the
full window per query, for every model).

The models. The BPE-token transformer (tokens.py, vocabulary --vocab-size, trained on the training split) is
the reference; every other model's shape (the global model's, for BLT) is chosen so that its inference FLOPs
per byte, BLT's entropy model included, are within 5% of the BPE model's:
  bpe            the BPE transformer
  byte           a plain byte transformer
  byte-hash      the byte transformer with BLT's hash n-gram embeddings (the same sizes, tables and hash
                 function, on its byte embeddings; zero FLOPs): a control
  space          BLT, space patching
  entropy-psN    BLT, entropy patching at average patch size N (a threshold calibrated to each)
  nohash-psN     BLT entropy-psN without hash n-gram embeddings: a control
  learned-psN    BLT with learned boundaries (H-Net's dynamic chunking, learned.py), N target bytes per chunk:
                 the fifth way to cut bytes, its FLOPs matched at the target (the realised size is reported)
The controls separate the two things BLT adds to a byte transformer: patches (with a global model over
them) and free n-gram memory. byte -> byte-hash is the n-grams alone; nohash -> entropy is the n-grams within
BLT; byte -> nohash is patching alone.

The study, in the order it runs:
1. Learning rates: every model at the middle budget with 3 peak learning rates (the preset's lr times
   lr_factors), seed 0, and one more beyond an edge best (up to lr_extend times: edge_learning_rates); each
   model then trains at its best one everywhere.
2. Fixed inference compute (paper figure 1): BPE and BLT entropy at each patch size, at 5 training budgets
   spanning 16x, 2 seeds at each (3 at the largest); val BPB against training FLOPs, the mean and its seed
   spread, and where the lines cross at equal training FLOPs (interpolated in log FLOPs: crossing()).
3. Matched compute: every model at the largest budget, 3 seeds (the curve's runs are reused).
4. Noise (paper section 6), on the seed-0 runs of part 3: (a) damage to context: the first half of each
   window noised, only its clean second half scored, against the same windows clean; (b) the whole text
   noised (tools/noise.py: case flips, drops, repeats, neighbour swaps, ALL CAPS; fixed seed, --noise-rate),
   with each model's bytes per token or patch on the noised text (it sets inference FLOPs).

Validation: windows sampled evenly across the whole validation split (val_chunks: eval_chunks pieces of
eval_chunk_bytes, from its first byte to its last), the same bytes for every model; each piece is scored as
train.py scores a split (every byte predicted once).

Outputs: OUT/results.md and OUT/results.json (tables, design, every number) and the figure. The repository
publishes one run's numbers, the cpu preset with the default flags: that run (or any run given --publish)
also writes the tables between the markers of docs/patches_vs_tokens.md (all of them) and of README.md
(matched compute, noise, the figure and the three sentences of the reading), and figures/patches_vs_tokens.png;
any other run draws OUT/figures/ and leaves those files alone (--docs, --readme and --figures name other
places to write). It says which files it rewrote. Finished runs and scores are reused, so an interrupted
study continues where it stopped (train.py --resume). Runs go through train.main in this process; each run's
output goes to OUT/experiments.log. One study per OUT at a time (runtime.FolderLock).
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see train.py (run alone, not via experiments.py)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere: the paper modules live at the top of the repository

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import runtime  # noqa: E402
import train  # noqa: E402
from blt import (LEARNED, BLTConfig, blt_training_flops, build_model, byte_transformer_flops_per_byte, count_parameters,  # noqa: E402
                 entropy_training_flops, flops_per_byte)
from checkpoint import load_checkpoint, read_checkpoint  # noqa: E402
from data import DataError, get_batch, ids_from_bytes, load_corpus  # noqa: E402
from entropy_model import ByteLMConfig  # noqa: E402
from evaluation import evaluate  # noqa: E402
from tools.experiments import published_run, tell_written  # noqa: E402
from tools.noise import NOISES, RATE, add_noise  # noqa: E402
from patching import BOS_ID, OFFSET, VOCAB_SIZE, average_patch_size, patch_lengths  # noqa: E402
from plots import plot_patches_vs_tokens  # noqa: E402
from runtime import autocast  # noqa: E402
from tokens import TokenLMConfig, prepare_tokens, token_flops_per_byte  # noqa: E402

DOC_START, DOC_END = "<!-- patches-vs-tokens:start -->", "<!-- patches-vs-tokens:end -->"

# budgets: training steps of batch_size x seq_len bytes, 5 of them doubling (16x); the middle one is the
# learning-rate sweep's, the last one the matched-compute budget. bpe: the reference model; blt: BLTConfig
# fields on top of train.py's preset (`base`): light local models (one encoder and one decoder layer, narrow)
# so that the global model takes most of BLT's FLOPs, as at the paper's scale. head_dim: the width step of
# the shapes designed here. sec_per_step: seconds per training step on 2 idle cores (measured, see --plan).
PRESETS = {
    # cpu: lr_factors at (0.5, 1, 2) made every model's best the largest, 4e-3
    "cpu": dict(base="cpu", data="shakespeare", seq_len=256, batch_size=16, lr=2e-3, budgets=(8, 16, 32, 64, 128),
                lr_factors=(1, 2, 4), lr_extend=2, entropy_steps=300, eval_chunks=32, eval_chunk_bytes=4096,
                noise_windows=256, head_dim=32, vocab_size=4096, bpe=dict(dim=256, layers=4, heads=4, multiple_of=32),
                blt=dict(local_dim=64, local_heads=2, encoder_layers=1, decoder_layers=1, local_window=128),
                byte_multiple_of=32, nohash_patch=4, learned_patch=4),
    "quick": dict(base="cpu", data="shakespeare", seq_len=128, batch_size=16, lr=3e-3, budgets=(4, 8, 16, 32, 64),
                  lr_factors=(0.5, 1, 2), lr_extend=1, entropy_steps=150, eval_chunks=16, eval_chunk_bytes=2048,
                  noise_windows=64, head_dim=16, vocab_size=1024, bpe=dict(dim=128, layers=3, heads=4, multiple_of=32),
                  blt=dict(entropy_dim=32, entropy_layers=1, entropy_heads=2, entropy_window=32, local_dim=32,
                           local_heads=2, encoder_layers=1, decoder_layers=1, local_window=64, hash_buckets=2048),
                  byte_multiple_of=16, nohash_patch=4, learned_patch=4),
    "gpu": dict(base="gpu", data="enwik8", seq_len=1024, batch_size=64, lr=4e-4, budgets=(500, 1000, 2000, 4000, 8000),
                lr_factors=(0.5, 1, 2), lr_extend=1, entropy_steps=3000, eval_chunks=64, eval_chunk_bytes=1 << 15,
                noise_windows=1024, head_dim=64, vocab_size=4096,
                bpe=dict(dim=768, layers=12, heads=12, multiple_of=256), byte_multiple_of=256,
                blt=dict(local_dim=256, local_heads=4, decoder_layers=1), nohash_patch=4, learned_patch=4),
    "smoke": dict(base="cpu", data="shakespeare", seq_len=48, batch_size=4, lr=2e-3, budgets=(2, 4),  # tests only
                  lr_factors=(1, 2), lr_extend=1, entropy_steps=3, eval_chunks=3, eval_chunk_bytes=256, noise_windows=4,
                  head_dim=8, vocab_size=320, bpe=dict(dim=64, layers=2, heads=2, multiple_of=16), byte_multiple_of=16,
                  blt=dict(entropy_dim=16, entropy_layers=1, entropy_heads=1, entropy_window=16, local_dim=16,
                           local_heads=1, decoder_layers=1, local_window=48, hash_buckets=64, multiple_of=16),
                  nohash_patch=4, learned_patch=4),
}
MATCH_TOLERANCE = 0.05  # a shape whose FLOPs per byte are within 5% of the target counts as matched
CURVE = "bpe"  # with the entropy-psN models: the lines of the figure


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


def curve_models(patch_sizes: list[float]) -> list[str]:
    return [CURVE] + [f"entropy-ps{p:g}" for p in patch_sizes]


def design(s: dict, corpus, vocab_size: int, patch_sizes: list[float]) -> dict:
    """The models of the study: the BPE reference, then byte transformers and BLTs with the same inference FLOPs
    per byte (BLT's entropy model included). Units (bytes per token, per patch) are the TRAINING split's, the
    one figure used for every FLOP count: the design must not read the validation bytes, and a model's FLOPs
    per byte are a property of the model and its training text, not of the text it happens to be scored on
    (the validation split's bytes per token and patch sizes are reported beside them)."""
    tokens = prepare_tokens(corpus.train, vocab_size, s["seq_len"])
    bpe = TokenLMConfig(vocab_size=tokens.tokenizer.vocab_size, **s["bpe"])
    target = token_flops_per_byte(bpe, tokens.train_bytes_per_token, tokens.seq_len)["forward_total"]
    aspect = bpe.dim / bpe.layers
    models = {"bpe": dict(kind="bpe", config=bpe.to_dict(), unit=tokens.train_bytes_per_token, flops=target,
                          flops_without_entropy=target, global_share=None,
                          flags=["--model", "bpe", "--vocab-size", str(vocab_size)]
                          + [f for k, v in s["bpe"].items() for f in ("--config", f"{k}={v}")])}
    hd, mo = s["head_dim"], s["byte_multiple_of"]
    dim, layers = closest_shape(lambda d, l: byte_transformer_flops_per_byte(d, l, s["seq_len"], mo)["forward_total"],
                                target, hd, aspect)
    byte = dict(dim=dim, layers=layers, heads=dim // hd, multiple_of=mo)
    base = BLTConfig.from_dict({**train.PRESETS[s["base"]]["blt"].to_dict(), **s["blt"]})
    byte_flops = byte_transformer_flops_per_byte(dim, layers, s["seq_len"], mo)["forward_total"]
    for name, extra in (("byte", []), ("byte-hash", ["--hash-ngrams"])):
        hashes = dict(hash_ngram_sizes=base.hash_ngram_sizes, hash_buckets=base.hash_buckets,
                      hash_functions=base.hash_functions) if extra else {}
        models[name] = dict(kind="byte", config=ByteLMConfig(**byte, **hashes).to_dict(), unit=1.0, flops=byte_flops,
                            flops_without_entropy=byte_flops, global_share=None,
                            flags=["--model", "byte", *extra] + [f for k, v in byte.items() for f in ("--config", f"{k}={v}")]
                            + [f for k, v in s["blt"].items() if k.startswith("hash_") for f in ("--config", f"{k}={v}")])
    x, _ = get_batch(corpus.train, 256, s["seq_len"], 1_000_003, 0)  # training windows, as calibration uses
    space_size = average_patch_size(patch_lengths(x, "space"))
    blts = [("space", "space", space_size, True)] + [(f"entropy-ps{p:g}", "entropy", p, True) for p in patch_sizes]
    blts += [(f"nohash-ps{s['nohash_patch']:g}", "entropy", s["nohash_patch"], False)]
    blts += [(f"learned-ps{s['learned_patch']:g}", LEARNED, s["learned_patch"], True)]
    for name, scheme, size, hashes in blts:
        def blt_cfg(d, l, scheme=scheme, size=size, hashes=hashes):
            return BLTConfig.from_dict({**base.to_dict(), "patching": scheme, "global_dim": d, "global_layers": l,
                                        "global_heads": d // hd, "patch_size": size,
                                        **({} if hashes else {"hash_ngram_sizes": ()})})

        def blt_flops(d, l, cfg=blt_cfg, size=size):
            return flops_per_byte(cfg(d, l), size, s["seq_len"])["forward_total_with_entropy"]
        local = blt_flops(hd, 1)
        if local >= target:
            raise SystemExit(f"error: BLT's local models alone cost {local / 1e6:.2f} MFLOP/byte, more than the BPE "
                             f"model's {target / 1e6:.2f}: use a larger BPE model or lighter local models")
        dim, layers = closest_shape(blt_flops, target, hd, base.global_dim / base.global_layers)
        f = flops_per_byte(blt_cfg(dim, layers), size, s["seq_len"])
        glob = dict(global_dim=dim, global_layers=layers, global_heads=dim // hd)
        models[name] = dict(kind="blt", config=blt_cfg(dim, layers).to_dict(), unit=size,
                            flops=f["forward_total_with_entropy"], flops_without_entropy=f["forward_total"],
                            global_share=f["forward"]["global"] / f["forward_total_with_entropy"],
                            flags=["--stage", "blt", "--patching", scheme]
                            + (["--patch-size", f"{size:g}"] if scheme in ("entropy", LEARNED) else [])
                            + ([] if hashes else ["--no-hash"])
                            + [f for k, v in {**s["blt"], **glob}.items() for f in ("--config", f"{k}={v}")])
    entropy_cfg = BLTConfig.from_dict({**base.to_dict(), "patching": "entropy"})
    entropy_batch = train.PRESETS[s["base"]]["entropy_train"]["batch_size"]  # its windows: seq_len (Runner.train)
    return {"target_flops_per_byte": target, "bytes_per_token_train": tokens.train_bytes_per_token,
            "token_seq_len": tokens.seq_len, "models": models,
            "entropy_training_flops": entropy_training_flops(entropy_cfg, s["entropy_steps"] * entropy_batch
                                                             * s["seq_len"], s["seq_len"])}


def parameters(kind: str, config: dict) -> dict:
    """Parameter counts: the model without hash tables or entropy model, and those two apart."""
    with torch.device("meta"):
        if kind == "blt":
            c = count_parameters(build_model(BLTConfig.from_dict(config)))  # BLT, or LearnedBLT
            return {"model": c["encoder"] + c["global_transformer"] + c["decoder"], "hash": c["hash_embeddings"],
                    "entropy": c.get("entropy_model", 0)}
        model = TokenLMConfig(**config).build() if kind == "bpe" else ByteLMConfig(**config).build()
    hashes = sum(p.numel() for p in getattr(model, "hash_embeddings", torch.nn.ModuleList()).parameters())
    return {"model": sum(p.numel() for p in model.parameters()) - hashes, "hash": hashes, "entropy": 0}


# ---- the runs ----

def lr_name(lr: float) -> str:
    short = f"{lr:.0e}"  # 2e-03 -> 2e-3; one more digit where it would round (1.6e-2, not 2e-2)
    return (short if float(short) == lr else f"{lr:.1e}").replace("e-0", "e-")


def run_name(model: str, steps: int, seed: int, lr: float) -> str:
    return f"{model}-{steps}steps-seed{seed}-lr{lr_name(lr)}"


def sweep_jobs(models: list[str], s: dict, seed: int) -> list[tuple]:
    """Part 1: (model, steps, seed, lr) of the learning-rate sweep, at the middle budget."""
    middle = s["budgets"][len(s["budgets"]) // 2]
    return [(m, middle, seed, s["lr"] * f) for m in models for f in s["lr_factors"]]


def edge_learning_rates(sweep: dict) -> list[tuple[str, float]]:
    """The next learning rate to try for every model whose best in sweep {(model, lr): val BPB} lies at an edge
    of what it tried: double the largest, or half the smallest; [] when every best is inside its range."""
    more = []
    for m in dict.fromkeys(model for model, _ in sweep):
        tried = sorted(lr for model, lr in sweep if model == m)
        best = min(tried, key=lambda lr: sweep[(m, lr)])
        if best == tried[-1]:
            more.append((m, best * 2))
        elif best == tried[0]:
            more.append((m, best / 2))
    return more


def main_jobs(models: list[str], s: dict, seeds: list[int], extra_seeds: list[int], patch_sizes: list[float],
              best_lr: dict) -> list[tuple]:
    """Parts 2 and 3: the curve's models at every budget and seed (plus extra_seeds at the largest), the others
    at the largest budget with every seed."""
    jobs, last = [], s["budgets"][-1]
    for m in models:
        budgets = s["budgets"] if m in curve_models(patch_sizes) else (last,)
        jobs += [(m, b, seed, best_lr[m]) for b in budgets for seed in seeds + (extra_seeds if b == last else [])]
    return jobs


def plan_time(plan: dict, s: dict, seeds: list[int], extra: list[int], patch_sizes: list[float]) -> dict:
    """Training steps and estimated seconds of every part (sec_per_step: the preset's measured step times)."""
    models = list(plan["models"])
    sweep = sweep_jobs(models, s, seeds[0])
    main = main_jobs(models, s, seeds, extra, patch_sizes, {m: s["lr"] for m in models})
    fresh = [j for j in main if j not in sweep]  # the sweep's runs at the preset's lr are reused when it wins
    per = lambda jobs: sum(steps * plan["models"][m]["sec_per_step"] for m, steps, _, _ in jobs)  # noqa: E731
    return {"runs": len(sweep) + len(fresh), "steps": sum(j[1] for j in sweep + fresh),
            "sweep_s": per(sweep), "main_s": per(fresh)}


class Runner:
    """train.py runs in this process, each into its own folder, output appended to OUT/experiments.log."""

    def __init__(self, out: Path, s: dict, data: str, preset: str):
        self.out, self.s, self.data, self.preset = out, s, data, preset
        self.log = open(out / "experiments.log", "a")
        if preset in ("smoke", "quick"):  # each run's curve pictures would take a good share of the run itself
            runtime.plot_curves = train.plot_curves = lambda *args, **kwargs: None
            runtime.draw_curves = train.draw_curves = lambda *args, **kwargs: None

    def train(self, folder: Path, *flags: str, steps: int | None = None, lr: float | None = None):
        s = self.s
        argv = ["--preset", s["base"], "--data", self.data, "--out", str(folder), "--resume",
                "--seq-len", str(s["seq_len"]), "--batch-size", str(s["batch_size"]), "--lr", str(lr or s["lr"]),
                "--entropy-steps", str(s["entropy_steps"]), "--log-interval", "10",
                # the study scores every run itself (score()); train.py's own evaluations are kept small
                "--final-eval-bytes", str(4 * s["seq_len"]), "--eval-bytes", str(4 * s["seq_len"]), *flags]
        if steps is not None:  # warmup: the first fifth of every budget; one checkpoint half-way
            argv += ["--steps", str(steps), "--warmup-steps", str(max(1, steps // 5)),
                     "--eval-interval", str(max(1, steps // 2))]
        argv += ["--entropy-seq-len", str(s["seq_len"])]  # the entropy model trains on BLT's windows
        if self.preset == "smoke":  # fp32 and one thread: tiny matmuls in bf16 pay a kernel set-up per shape
            argv += ["--calibration-windows", "8", "--dtype", "fp32", "--threads", "1"]
        print("$ python train.py", " ".join(argv), flush=True)
        self.log.write("$ python train.py " + " ".join(argv) + "\n")
        self.log.flush()
        with contextlib.redirect_stdout(self.log), contextlib.redirect_stderr(self.log):
            code = train.main(argv)
        self.log.flush()
        if code != 0:
            last = Path(self.log.name).read_text().strip().splitlines()[-1]
            raise SystemExit(f"train.py failed (exit {code}): {last}\n(the whole output: {self.log.name})")


CHECKPOINT = {"bpe": "bpe.pt", "byte": "byte.pt", "byte-hash": "byte.pt", "space": "blt_space.pt"}  # else blt_entropy.pt


def checkpoint_name(model: str) -> str:
    return "blt_learned.pt" if model.startswith("learned") else CHECKPOINT.get(model, "blt_entropy.pt")


def prepare_entropy(runner: Runner, s: dict, patch_sizes: list[float], nohash_patch: float):
    """The entropy model (trained once), then one threshold per patch size, shared by every run with it."""
    out = runner.out
    entropy_flags = [f for k, v in s["blt"].items() for f in ("--config", f"{k}={v}")]  # entropy_*, multiple_of
    runner.train(out / "entropy", "--stage", "entropy", "--patching", "entropy", *entropy_flags)
    for p in sorted(set(patch_sizes) | {nohash_patch}):
        folder = out / f"calibration-ps{p:g}"
        if not (folder / "calibration.json").exists():
            folder.mkdir(exist_ok=True)
            shutil.copy(out / "entropy" / "entropy.pt", folder / "entropy.pt")
            runner.train(folder, "--stage", "calibrate", "--patching", "entropy", "--patch-size", f"{p:g}", *entropy_flags)


def train_job(runner: Runner, plan: dict, job: tuple) -> Path:
    model, steps, seed, lr = job
    folder = runner.out / "runs" / run_name(*job)
    folder.mkdir(parents=True, exist_ok=True)
    if model.startswith(("entropy", "nohash")):
        calibration = runner.out / f"calibration-ps{model.split('-ps')[1]}"
        for f in ("entropy.pt", "calibration.json"):
            if not (folder / f).exists():
                shutil.copy(calibration / f, folder / f)
    runner.train(folder, *plan["models"][model]["flags"], "--seed", str(seed), steps=steps, lr=lr)
    return folder / checkpoint_name(model)


# ---- scoring: windows across the whole validation split ----

def val_chunks(n_bytes: int, count: int, size: int) -> list[tuple[int, int]]:
    """count pieces of size bytes spread evenly over a split of n_bytes, from its first byte to its last:
    (start, end) pairs in order, disjoint. If they cannot all fit apart, the whole split in pieces of size."""
    if count * size >= n_bytes:
        return [(a, min(n_bytes, a + size)) for a in range(0, n_bytes, size)]
    if count == 1:
        return [(0, size)]
    return [(a, a + size) for a in (round(i * (n_bytes - size) / (count - 1)) for i in range(count))]


def score(model, kind: str, cfg, tokens, val, chunks: list[tuple[int, int]], seq_len: int, batch_size: int,
          dtype: str, device) -> dict:
    """Bits per byte over the pieces of val, each scored as train.py scores a split (evaluation.evaluate:
    every byte once, windows of seq_len bytes, or the BPE model's token windows over the piece), summed.
    Also the bytes per token or patch on those bytes."""
    nats, n_bytes, units = 0.0, 0, 0.0
    for a, b in chunks:
        m = evaluate(model, kind, cfg, val[a:b], seq_len, batch_size, dtype, device, None, tokens)
        nats += m["val_bpb"] * math.log(2) * m["val_bytes"]
        n_bytes += m["val_bytes"]
        units += m["val_bytes"] / m.get("bytes_per_token", m.get("patch_size", 1.0))
    return {"val_bpb": nats / (math.log(2) * n_bytes), "val_bytes": n_bytes, "unit": n_bytes / units}


def context_windows(val, count: int, half: int) -> list[tuple[int, int]]:
    """count windows of 2 * half bytes spread evenly over val: (start, end)."""
    return val_chunks(len(val), count, 2 * half)


@torch.no_grad()
def score_continuations(model, kind: str, tokens, pairs: list[tuple[bytes, bytes]], dtype: str, device,
                        batch_size: int = 16) -> dict:
    """Bits per byte of the continuations only: each pair (context, continuation) is one sequence, BOS +
    context + continuation, and only the continuation's bytes (or the tokens that spell them) are scored.
    The BPE model encodes context and continuation apart, so no token straddles the two and the scored
    tokens spell exactly the continuation. Rows are right-padded: causal models never read later positions."""
    model.eval()
    nats, n_bytes, context_bytes, context_units = 0.0, 0, 0, 0
    for first in range(0, len(pairs), batch_size):
        rows, starts = [], []
        for context, continuation in pairs[first:first + batch_size]:
            if kind == "bpe":
                c = tokens.tokenizer.encode(context).tolist()
                ids = [tokens.tokenizer.bos_id] + c + tokens.tokenizer.encode(continuation).tolist()
                context_units += len(c)
            else:
                c = list(context)
                ids = [BOS_ID] + [b + OFFSET for b in c] + [b + OFFSET for b in continuation]
            rows.append(ids)
            starts.append(len(c))  # targets from index len(c) on are the continuation's
            n_bytes += len(continuation)
            context_bytes += len(context)
        T = max(len(r) for r in rows) - 1
        x = torch.zeros(len(rows), T, dtype=torch.long)
        y = torch.full((len(rows), T), -1, dtype=torch.long)
        for i, (r, start) in enumerate(zip(rows, starts)):
            r = torch.tensor(r)
            x[i, :len(r) - 1] = r[:-1]
            y[i, start:len(r) - 1] = r[start + 1:]
        x, y = x.to(device), y.to(device)
        learned = kind == "blt" and model.cfg.patching == LEARNED
        lengths = model.patch(x) if kind == "blt" and not learned else None
        if learned:  # chunks that start inside each row's context (BOS included, as for patches)
            b = model.boundaries(x)  # (B, T)
            context_units += sum(int(b[i, :start + 1].sum()) for i, start in enumerate(starts))
        if lengths is not None:  # patches that start inside each row's context: the context's patch count
            starts_t = torch.tensor(starts, device=device)[:, None]
            begins = lengths.cumsum(1) - lengths  # (B, P) first position of each patch
            context_units += int(((begins <= starts_t) & (lengths > 0)).sum())
        with autocast(device, dtype):
            logits = model(x, patch_lengths=lengths) if kind == "blt" else model(x)  # (B, T, V)
        nats += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum").item()
    unit = context_bytes / context_units if context_units else 1.0
    return {"val_bpb": nats / (math.log(2) * n_bytes), "val_bytes": n_bytes, "context_unit": unit}


class Scores:
    """Every score the study computes, cached in OUT/scores.json under the run's name and checkpoint mtime (a
    retrained checkpoint gets scored again), so that an interrupted study does not score twice."""

    def __init__(self, path: Path, corpus, s: dict, rate: float):
        self.path, self.corpus, self.s, self.rate = path, corpus, s, rate
        self.cache = json.loads(path.read_text()) if path.exists() else {}
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.chunks = val_chunks(len(corpus.val), s["eval_chunks"], s["eval_chunk_bytes"])

    def _load(self, ckpt: Path):
        kind, cfg, model = load_checkpoint(ckpt)
        return kind, cfg, model.to(self.device), read_checkpoint(ckpt)["train"]

    def get(self, what: str, ckpt: Path, compute) -> dict:
        key = f"{ckpt.parent.name} {what} mtime {ckpt.stat().st_mtime_ns}"
        if key not in self.cache:
            print(f"score: {ckpt.parent.name}: {what}", flush=True)
            self.cache[key] = compute(*self._load(ckpt))
            self.path.write_text(json.dumps(self.cache, indent=1))
        return self.cache[key]

    def clean(self, ckpt: Path) -> dict:
        val, bs = self.corpus.val, self.s["batch_size"]
        return self.get("clean", ckpt, lambda kind, cfg, model, tc: score(
            model, kind, cfg, getattr(model, "tokens", None), val, self.chunks, tc["seq_len"], bs, tc["dtype"], self.device))

    def noised(self, ckpt: Path) -> dict:
        """{noise: score} on the same pieces, each noised whole (today's table)."""
        def compute(kind, cfg, model, tc):
            out = {}
            for noise in NOISES:
                pieces = [np.frombuffer(add_noise(self.corpus.val[a:b], noise, self.rate, seed=i), dtype=np.uint8)
                          for i, (a, b) in enumerate(self.chunks)]
                joined = np.concatenate(pieces)
                bounds = np.cumsum([0] + [len(p) for p in pieces])
                out[noise] = score(model, kind, cfg, getattr(model, "tokens", None), joined,
                                   list(zip(bounds[:-1], bounds[1:])), tc["seq_len"], self.s["batch_size"],
                                   tc["dtype"], self.device)
            return out
        return self.get(f"noise rate {self.rate}", ckpt, compute)

    def context(self, ckpt: Path) -> dict:
        """{"clean" or noise: continuation score}: windows of seq_len bytes across the split, the first half
        noised (or not), the clean second half scored."""
        half = self.s["seq_len"] // 2
        windows = context_windows(self.corpus.val, self.s["noise_windows"], half)

        def compute(kind, cfg, model, tc):
            out = {}
            for noise in ("clean",) + NOISES:
                pairs = []
                for i, (a, b) in enumerate(windows):
                    first, second = self.corpus.val[a:a + half].tobytes(), self.corpus.val[a + half:b].tobytes()
                    pairs.append((first if noise == "clean" else add_noise(first, noise, self.rate, seed=i), second))
                out[noise] = score_continuations(model, kind, getattr(model, "tokens", None), pairs, tc["dtype"],
                                                 self.device)
            return out
        return self.get(f"context noise rate {self.rate}", ckpt, compute)


# ---- crossings at equal training FLOPs ----

def crossing(flops_a: list[float], bpb_a: list[float], flops_b: list[float], bpb_b: list[float]) -> float | None:
    """The training FLOPs at which line b first crosses line a, each line given at its own FLOPs (BPB against
    training FLOPs, piecewise linear in log FLOPs), compared at EQUAL training FLOPs over the range both
    cover. None if they do not cross there. Exact for piecewise-linear lines: between consecutive breakpoints
    of either line the difference b - a is linear in log FLOPs."""
    la, lb = np.log(flops_a), np.log(flops_b)
    lo, hi = max(la.min(), lb.min()), min(la.max(), lb.max())
    if lo >= hi:
        return None
    grid = np.unique(np.concatenate([[lo, hi], la[(la > lo) & (la < hi)], lb[(lb > lo) & (lb < hi)]]))
    d = np.interp(grid, lb, bpb_b) - np.interp(grid, la, bpb_a)
    for i in range(len(grid) - 1):
        if d[i] == 0:
            return float(math.exp(grid[i]))
        if d[i] * d[i + 1] < 0:
            t = d[i] / (d[i] - d[i + 1])
            return float(math.exp(grid[i] + t * (grid[i + 1] - grid[i])))
    return float(math.exp(grid[-1])) if d[-1] == 0 else None


def at_flops(flops: list[float], bpb: list[float], x: float) -> float | None:
    """A line's BPB at training FLOPs x (interpolated in log FLOPs), None outside it."""
    if not min(flops) <= x <= max(flops):
        return None
    return float(np.interp(math.log(x), np.log(flops), bpb))


# ---- tables and the reading ----

LABELS = {"bpe": "BPE transformer", "byte": "byte transformer", "byte-hash": "byte transformer + hash n-grams",
          "space": "BLT space"}


def label(model: str) -> str:
    if model.startswith("nohash"):
        return f"BLT entropy, patch {model.removeprefix('nohash-ps')}, no hash n-grams"
    if model.startswith("learned"):
        return f"BLT learned boundaries (H-Net), target {model.removeprefix('learned-ps')}"
    return LABELS.get(model) or f"BLT entropy, patch {model.removeprefix('entropy-ps')}"


def fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n:,.0f} bytes"


def fmt_mean(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def spread(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def run_flops(plan: dict, s: dict, model: str, steps: int) -> dict:
    """A run's training FLOPs with and without the entropy model (its forward over every training byte and its
    training), with the design's units (the training split's bytes per token and patch sizes)."""
    m, seen = plan["models"][model], steps * s["batch_size"] * s["seq_len"]
    if m["kind"] == "bpe":  # its windows of token_seq_len tokens span this many bytes at the same bytes per token
        seen = steps * s["batch_size"] * plan["token_seq_len"] * plan["bytes_per_token_train"]
    if m["kind"] == "blt":
        f = blt_training_flops(BLTConfig.from_dict(m["config"]), m["unit"], s["seq_len"], seen)
        entropy = plan["entropy_training_flops"] if f["entropy"] else 0.0
        return {"with": f["with_entropy"] + entropy, "without": f["without_entropy"], "bytes": seen}
    return {"with": 3 * m["flops"] * seen, "without": 3 * m["flops"] * seen, "bytes": seen}


def report(plan, s, args, seeds, extra, patch_sizes, sweep, best_lr, runs, scores, minutes):
    """results.md (every table and the reading), the README's short version, and results.json's numbers."""
    models, budgets, last = plan["models"], s["budgets"], s["budgets"][-1]
    all_seeds = seeds + extra
    clean = {job: scores.clean(path) for job, path in runs.items()}
    bpb = lambda m, b, seeds_: [clean[(m, b, sd, best_lr[m])]["val_bpb"] for sd in seeds_]  # noqa: E731
    val_bytes = next(iter(clean.values()))["val_bytes"]
    trained = sum(read_checkpoint(p)["metrics"]["stage_seconds"] for p in set(runs.values())) / 60
    lines = [f"Regenerate with `python tools/experiments.py --study tokens{' --quick' if args.preset == 'quick' else ''}"
             f"{'' if args.preset in ('cpu', 'quick') else ' --preset ' + args.preset}` ({trained:.0f} minutes of "
             f"training runs here, besides the sweep's and the scoring, "
             f"{args.cores_note}; corpus {args.data or s['data']}; BPE vocabulary {args.vocab_size}, "
             f"{plan['bytes_per_token_train']:.2f} bytes per token on the training split; windows of {s['seq_len']} "
             f"bytes = {plan['token_seq_len']} tokens; batch {s['batch_size']}; validation: {len(scores.chunks)} pieces "
             f"of {s['eval_chunk_bytes']:,} bytes spread evenly over the whole {len(scores.corpus.val):,}-byte "
             f"validation split, {val_bytes:,} bytes, the same for every model).", ""]

    # design
    lines += [f"**Design**: every model at the BPE model's inference FLOPs per byte, {plan['target_flops_per_byte'] / 1e6:.2f} "
              f"MFLOP/byte, BLT's entropy model included; FLOPs per byte use the training split's bytes per token "
              f"and patch sizes, the one figure used throughout.", "",
              "| model | shape (global model for BLT) | bytes per token or patch (train) | inference MFLOP/byte "
              "(without entropy model) | global model's share | parameters | hash-table parameters | entropy-model parameters |",
              "|---|---|---|---|---|---|---|---|"]
    params = {}
    for name, m in models.items():
        c, p = m["config"], parameters(m["kind"], m["config"])
        params[name] = p
        shape = (f"{c['global_dim']} x {c['global_layers']}" if m["kind"] == "blt" else f"{c['dim']} x {c['layers']}")
        lines.append(f"| {label(name)} | {shape} | {m['unit']:.2f} | {m['flops'] / 1e6:.2f} "
                     f"({m['flops_without_entropy'] / 1e6:.2f}) | "
                     f"{'' if m['global_share'] is None else format(100 * m['global_share'], '.0f') + '%'} | "
                     f"{p['model'] / 1e6:.2f}M | {p['hash'] / 1e6:.2f}M | {p['entropy'] / 1e6:.3f}M |")
    design_table = lines[-len(models) - 2:]

    # learning rates
    lrs = sorted({lr for _, lr in sweep})
    middle = budgets[len(budgets) // 2]
    edge = [label(m) for m, _ in edge_learning_rates(sweep)]  # bests the extension could not bracket
    lines += ["", f"**Learning rates**: val BPB of every model at the middle budget ({middle} steps, seed {seeds[0]}) "
              f"with three peak learning rates, and where a model's best was at an edge of what it had tried, one "
              f"more beyond it (up to {s['lr_extend']}); each model trains at its best one (bold) everywhere."
              + (f" Still at an edge: {', '.join(edge)}." if edge else ""), "",
              "| model | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for name in models:
        cells = [f"{sweep[(name, lr)]:.3f}" if (name, lr) in sweep else "" for lr in lrs]
        cells = [f"**{c}**" if lr == best_lr[name] else c for c, lr in zip(cells, lrs)]
        lines.append(f"| {label(name)} | " + " | ".join(cells) + " |")

    # the curve
    curve, crossings = {}, {}
    for name in curve_models(patch_sizes):
        pts = {b: bpb(name, b, all_seeds if b == last else seeds) for b in budgets}
        fl = [run_flops(plan, s, name, b) for b in budgets]
        curve[name] = {"label": label(name), "flops": [f["with"] for f in fl], "flops_without": [f["without"] for f in fl],
                       "bpb": [float(np.mean(pts[b])) for b in budgets], "err": [spread(pts[b]) for b in budgets],
                       "seeds": [pts[b] for b in budgets]}
    lines += ["", f"**Fixed inference compute** (paper figure 1; {plan['target_flops_per_byte'] / 1e6:.2f} MFLOP/byte, "
              f"the BPE model's): val BPB, mean ± standard deviation over seeds ({len(seeds)} per budget, "
              f"{len(all_seeds)} at the largest), at each training budget; training FLOPs include BLT's entropy "
              f"model (its training and its forward pass over every training byte).", "",
              "| model | " + " | ".join(f"{b} steps, {fmt_bytes(b * s['batch_size'] * s['seq_len'])}" for b in budgets) + " |",
              "|---|" + "---|" * len(budgets)]
    for name, c in curve.items():
        lines.append(f"| {c['label']} | " + " | ".join(f"{fmt_mean(v)} ({f:.2e} FLOPs)"
                                                      for v, f in zip(c["seeds"], c["flops"])) + " |")
    lines += ["", "Where each BLT line crosses the BPE line, at equal training FLOPs (interpolated in log FLOPs "
              "between budgets), with and without the entropy model's FLOPs:", "",
              "| model | crossing (with entropy model) | crossing (without) | BLT minus BPE at the BPE model's largest budget |",
              "|---|---|---|---|"]
    ref = curve["bpe"]
    for name in curve_models(patch_sizes)[1:]:
        c = curve[name]
        w = crossing(ref["flops"], ref["bpb"], c["flops"], c["bpb"])
        wo = crossing(ref["flops_without"], ref["bpb"], c["flops_without"], c["bpb"])
        at = at_flops(c["flops"], c["bpb"], ref["flops"][-1])
        crossings[name] = {"with": w, "without": wo, "gap_at_bpe_largest": None if at is None else at - ref["bpb"][-1]}
        lines.append(f"| {c['label']} | {'none in range' if w is None else f'{w:.2e}'} | "
                     f"{'none in range' if wo is None else f'{wo:.2e}'} | "
                     f"{'outside its range' if at is None else format(at - ref['bpb'][-1], '+.3f')} |")

    # matched compute, with the controls
    matched = {name: {"bpb": bpb(name, last, all_seeds)} for name in models}
    first = [f"**Matched compute**: {last} steps = {fmt_bytes(last * s['batch_size'] * s['seq_len'])} seen by every "
             f"model, every model at the same inference FLOPs per byte; seeds {', '.join(map(str, all_seeds))} "
             f"(mean ± standard deviation); bytes per token or patch on the validation pieces; training FLOPs of the "
             f"whole run with and without BLT's entropy model.", "",
             "| model | val BPB | lr | bytes per token or patch (val) | train FLOPs (without entropy model) | "
             "parameters | hash-table parameters |", "|---|---|---|---|---|---|---|"]
    for name in models:
        f = run_flops(plan, s, name, last)
        unit = clean[(name, last, seeds[0], best_lr[name])]["unit"]
        matched[name].update(unit=unit, flops=f, lr=best_lr[name], params=params[name])
        first.append(f"| {label(name)} | {fmt_mean(matched[name]['bpb'])} | {best_lr[name]:g} | {unit:.2f} | "
                     f"{f['with']:.2e} ({f['without']:.2e}) | {params[name]['model'] / 1e6:.2f}M | "
                     f"{params[name]['hash'] / 1e6:.2f}M |")
    lines += [""] + first

    # noise
    names = list(models)
    context = {n: scores.context(runs[(n, last, seeds[0], best_lr[n])]) for n in names}
    noised = {n: scores.noised(runs[(n, last, seeds[0], best_lr[n])]) for n in names}
    ctx_inc = {n: {k: context[n][k]["val_bpb"] - context[n]["clean"]["val_bpb"] for k in NOISES} for n in names}
    whole_inc = {n: {k: noised[n][k]["val_bpb"] - clean[(n, last, seeds[0], best_lr[n])]["val_bpb"] for k in NOISES}
                 for n in names}
    header = "| model | clean | " + " | ".join(NOISES) + " |"
    rule = "|---|---|" + "---|" * len(NOISES)
    noise_context = ["", f"**Noise as damage to context** (paper section 6): {s['noise_windows']} windows "
                     f"of {s['seq_len']} bytes spread over the validation split; the first half noised (tools/noise.py, "
                     f"rate {args.noise_rate:g}), only the clean second half scored, so the cost of predicting the "
                     f"noise itself is left out; val BPB of the clean halves and, in brackets, the increase over "
                     f"clean context ({last} steps, seed {seeds[0]}).", "", header, rule]
    for n in names:
        noise_context.append(f"| {label(n)} | {context[n]['clean']['val_bpb']:.3f} | " + " | ".join(
            f"{context[n][k]['val_bpb']:.3f} ({ctx_inc[n][k]:+.3f})" for k in NOISES) + " |")
    lines += noise_context
    lines += ["", f"**Noise on the whole text**: val BPB on noised copies of the validation pieces (rate "
              f"{args.noise_rate:g}; the noise's own entropy is scored too); in brackets the increase over clean.", "",
              header, rule]
    for n in names:
        base = clean[(n, last, seeds[0], best_lr[n])]["val_bpb"]
        lines.append(f"| {label(n)} | {base:.3f} | " + " | ".join(
            f"{noised[n][k]['val_bpb']:.3f} ({whole_inc[n][k]:+.3f})" for k in NOISES) + " |")
    lines += ["", "Bytes per token or patch on the noised text (inference FLOPs per byte of the BPE model and of "
              "BLT's global model scale with their inverse):", "", header, rule]
    for n in names:
        lines.append(f"| {label(n)} | {clean[(n, last, seeds[0], best_lr[n])]['unit']:.2f} | "
                     + " | ".join(f"{noised[n][k]['unit']:.2f}" for k in NOISES) + " |")

    # the reading
    reading = reading_sentences(plan, patch_sizes, matched, curve, crossings, ctx_inc, s)
    lines += ["", "**Reading** (generated from the numbers above):", ""] + [f"{i + 1}. {r}" for i, r in enumerate(reading)]
    short = first + noise_context + ["", "What these numbers say against the paper (generated from them):", ""] \
        + [f"{i + 1}. {r}" for i, r in enumerate(reading)]
    data = {"design": plan, "sweep": {f"{m} lr {lr:g}": v for (m, lr), v in sweep.items()}, "best_lr": best_lr,
            "scores": {run_name(*job): clean[job] for job in runs}, "matched": matched, "fixed_inference": curve,
            "crossings": crossings, "context_noise": context, "whole_noise": noised,
            "context_noise_increase": ctx_inc, "noise_increase": whole_inc, "seeds": all_seeds, "budgets": list(budgets),
            "minutes": minutes, "reading": reading, "design_table": design_table}
    return "\n".join(lines), "\n".join(short), data


def reading_sentences(plan, patch_sizes, matched, curve, crossings, ctx_inc, s) -> list[str]:
    """The three sentences: matched compute and the controls, the curve, noise; each says what the paper
    claims and whether this run reproduces it."""
    mean = {n: float(np.mean(v["bpb"])) for n, v in matched.items()}
    err = {n: spread(v["bpb"]) for n, v in matched.items()}
    blts = [f"entropy-ps{p:g}" for p in patch_sizes]
    best = min(blts, key=mean.get)
    nohash = next(n for n in matched if n.startswith("nohash"))
    twin = f"entropy-ps{nohash.removeprefix('nohash-ps')}"

    def gap(a, b):  # a - b, and whether it exceeds twice the larger seed spread
        d = mean[a] - mean[b]
        return d, abs(d) > 2 * max(err[a], err[b])

    def say(d, sure):  # d: bits per byte saved (positive = the addition helps)
        return f"{d:+.3f}" + ("" if sure else " (within seed noise)")

    def versus(d, sure):  # d: a model's BPB minus another's
        return f"{abs(d):.3f} bits per byte {'below' if d < 0 else 'above'}" + ("" if sure else " (within seed noise)")
    d_bpe, s_bpe = gap(best, "bpe")
    d_hash, s_hash = gap(twin, nohash)  # what the tables add to BLT
    d_bh, s_bh = gap("byte-hash", "byte")  # what they add to the byte transformer
    d_nb, s_nb = gap(nohash, "bpe")
    d_patch, s_patch = gap(nohash, "byte")  # patching without tables
    d_patch_h, s_patch_h = gap(twin, "byte-hash")  # patching with the tables on both sides
    matches = d_bpe <= 0 or not s_bpe  # the paper: BLT matches (or beats) BPE at equal compute
    survives = d_nb <= 0 or not s_nb
    one = (f"*Matched compute (paper section 5).* The best BLT ({label(best)}) ends {versus(d_bpe, s_bpe)} the "
           f"BPE transformer at equal inference FLOPs per byte and bytes seen, so the paper's claim "
           f"that BLT matches BPE at equal compute is {'reproduced' if matches else 'not reproduced'} at this scale "
           f"({matched['bpe']['flops']['bytes'] / 1e6:.1f} MB seen, models of a few million parameters). The controls "
           f"take BLT apart: the hash n-gram tables are worth {say(-d_hash, s_hash)} bits per byte to BLT "
           f"(patch {twin.removeprefix('entropy-ps')}) and {say(-d_bh, s_bh)} to a byte transformer; patching itself is "
           f"worth {say(-d_patch, s_patch)} without the tables (BLT without them against the byte transformer) and "
           f"{say(-d_patch_h, s_patch_h)} with them on both sides (bits per byte saved); BLT without tables ends "
           f"{versus(d_nb, s_nb)} BPE" + ("." if not matches else ", so BLT's standing against BPE holds without the "
           "free n-gram memory: patching carries it." if survives else ", so at this scale BLT's standing against "
           "BPE rests on the free n-gram memory, not on patching alone.")
           + " (Within seed noise: under twice the larger standard deviation over seeds.)")
    learned = next((n for n in matched if n.startswith("learned")), None)
    if learned:  # the fifth way to cut bytes, against entropy patching at the same target size
        twin_l = f"entropy-ps{learned.removeprefix('learned-ps')}"
        d_l, s_l = gap(learned, twin_l) if twin_l in matched else gap(learned, best)
        one += (f" Learned boundaries (H-Net's dynamic chunking, target {learned.removeprefix('learned-ps')} bytes per "
                f"chunk) end {versus(d_l, s_l)} {label(twin_l if twin_l in matched else best)}.")
    ref = curve["bpe"]
    parts, crossed = [], False
    for n in blts:
        x, c = crossings[n]["with"], curve[n]
        end_below, start_below = c["bpb"][-1] < ref["bpb"][-1], c["bpb"][0] < ref["bpb"][0]
        name = label(n).removeprefix("BLT entropy, ")
        if x and end_below:
            parts.append(f"{name} crosses below BPE at {x:.1e} training FLOPs")
            crossed = crossed or not start_below
        elif x:
            parts.append(f"{name} crosses BPE at {x:.1e} and ends above it")
        else:
            parts.append(f"{name} stays {'below' if start_below else 'above'} BPE throughout")
    ends = {n: curve[n]["bpb"][-1] for n in blts}
    order = sorted(blts, key=ends.get)
    larger_better = order == sorted(blts, key=lambda n: -float(n.removeprefix("entropy-ps")))
    two = (f"*Fixed inference compute (paper figure 1).* Over {len(ref['flops'])} budgets spanning "
           f"{ref['flops'][-1] / ref['flops'][0]:.0f}x in training FLOPs (entropy model included): " + "; ".join(parts)
           + (" - the paper's picture, BPE ahead on small budgets and BLT below it as training grows" if crossed
              else " - not the paper's picture of BPE ahead on small budgets and BLT crossing below it later")
           + f". At the largest budget the patch sizes end " + ", ".join(f"{label(n).removeprefix('BLT entropy, ')} "
           f"{ends[n]:.3f}" for n in order) + (" - larger patches ahead, as the paper finds at scale" if larger_better
           else " - not the paper's order (larger patches ahead), which it sees with billion-parameter global models, "
           "where the global model dominates FLOPs far more than the "
           + f"{100 * min(plan['models'][n]['global_share'] for n in blts):.0f}-"
           f"{100 * max(plan['models'][n]['global_share'] for n in blts):.0f}% it takes here") + ".")
    mean_inc = {n: float(np.mean(list(v.values()))) for n, v in ctx_inc.items()}
    blt_inc = float(np.mean([mean_inc[n] for n in blts]))
    robust = blt_inc < mean_inc["bpe"]
    three = (f"*Noise (paper section 6).* With noise confined to the context and only clean bytes scored (seed-0 "
             f"runs), the average increase over the five noises is {blt_inc:+.3f} bits per byte for the entropy BLTs, "
             f"{mean_inc['bpe']:+.3f} for BPE, {mean_inc['byte']:+.3f} for the byte transformer and "
             f"{mean_inc['byte-hash']:+.3f} with hash n-grams; the paper's robustness claim (measured on task "
             f"accuracy at 8B parameters) is " + ("reproduced in direction: BLT's context is damaged less than "
             "the token model's" if robust else "not reproduced here: BLT's context is damaged as much as the "
             "token model's or more") + ".")
    return [one, two, three]


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
    p.add_argument("--quick", action="store_true", help="the quick preset: the whole study, smaller, in under 20 "
                   "minutes on 2 cores (its numbers are for trying the study, not for reading)")
    p.add_argument("--data", default=None, help="corpus (train.py --data; default: the preset's)")
    p.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary (default: the preset's)")
    p.add_argument("--patch-sizes", type=float, nargs="+", default=[4, 6, 8], help="entropy BLT patch sizes")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds at every budget")
    p.add_argument("--extra-seeds", type=int, nargs="*", default=[2], help="more seeds at the largest budget")
    p.add_argument("--noise-rate", type=float, default=RATE, help="tools/noise.py rate")
    p.add_argument("--out", default=None, help="folder for the runs and tables (default out/patches_vs_tokens, "
                   "out/patches_vs_tokens_quick with --quick)")
    p.add_argument("--figures", default=None,
                   help="folder for patches_vs_tokens.png (default: figures/ when publishing, else OUT/figures)")
    p.add_argument("--docs", default=None, help="markdown file whose results section is rewritten (default: "
                   "docs/patches_vs_tokens.md when publishing, else none; '' for none)")
    p.add_argument("--readme", default=None, help="markdown file whose short results (matched compute, noise, "
                   "the reading, figure) are rewritten (default: README.md when publishing, else none; '' for none)")
    p.add_argument("--publish", action=argparse.BooleanOptionalAction, default=None,
                   help="rewrite README.md, docs/patches_vs_tokens.md and figures/ (default: only for the published "
                        "run, the cpu preset with the default --data, --vocab-size, --patch-sizes, --seeds, "
                        "--extra-seeds and --noise-rate)")
    p.add_argument("--plan", action="store_true", help="print the models, their FLOPs per byte, the runs and the "
                   "estimated time; train nothing")
    args = p.parse_args(argv)
    if args.quick:
        if args.preset not in ("cpu", "quick"):
            sys.exit(f"error: --quick is the quick preset; it cannot be combined with --preset {args.preset}")
        args.preset = "quick"
    if min(args.patch_sizes) < 1 or not 0 <= args.noise_rate <= 1:
        sys.exit("error: --patch-sizes must be >= 1 and --noise-rate in [0, 1]")
    out = Path(args.out or ("out/patches_vs_tokens_quick" if args.preset == "quick" else "out/patches_vs_tokens"))
    args.out = str(out)
    publish = args.publish if args.publish is not None else published_run(
        p, args, ("preset", "data", "vocab_size", "patch_sizes", "seeds", "extra_seeds", "noise_rate"))
    args.figures = args.figures or str(ROOT / "figures" if publish else out / "figures")
    args.docs = str(ROOT / "docs" / "patches_vs_tokens.md") if args.docs is None and publish else args.docs
    args.readme = str(ROOT / "README.md") if args.readme is None and publish else args.readme
    out.mkdir(parents=True, exist_ok=True)
    try:
        with runtime.FolderLock(out):  # one study per folder: two would train into the same runs
            return study(args)
    except runtime.UsageError as e:
        sys.exit(f"error: {e}")


# Seconds per training step on 2 idle cores, per preset and model kind, for --plan's estimate: the wall-clock
# step times of the study's own runs on a 2-core AVX2 machine without native bf16 (fp32), read from
# OUT/experiments.log (a machine with native bf16 runs them about twice as fast). overhead_s: train.py's
# set-up, checkpoints and final evaluation, per run; score_s: scoring one run on the validation pieces.
SEC_PER_STEP = {"cpu": {"bpe": 0.91, "byte": 1.07, "blt": 1.15, "overhead_s": 1.5, "score_s": 10.0, "entropy_s": 110},
                "quick": {"bpe": 0.12, "byte": 0.14, "blt": 0.25, "overhead_s": 1.5, "score_s": 1.5, "entropy_s": 15},
                "gpu": {"bpe": 0.05, "byte": 0.05, "blt": 0.08, "overhead_s": 20.0, "score_s": 5.0, "entropy_s": 200},
                "smoke": {"bpe": 0.01, "byte": 0.01, "blt": 0.02, "overhead_s": 0.5, "score_s": 0.1, "entropy_s": 1}}


def study(args):
    s = PRESETS[args.preset]
    args.vocab_size = args.vocab_size or s["vocab_size"]
    data = args.data or s["data"]
    args.cores_note = "2 CPU cores" if args.preset != "gpu" else "one GPU"
    t0 = time.time()
    try:
        corpus = load_corpus(data)
    except DataError as e:
        sys.exit(f"error: {e}")
    out = Path(args.out)
    plan = design(s, corpus, args.vocab_size, args.patch_sizes)
    rates = SEC_PER_STEP[args.preset]
    for m in plan["models"].values():
        m["sec_per_step"] = rates[m["kind"]]
    seeds, extra = list(args.seeds), [x for x in args.extra_seeds if x not in args.seeds]
    print(f"target: {plan['target_flops_per_byte'] / 1e6:.3f} MFLOP/byte inference (the BPE model's, "
          f"{plan['bytes_per_token_train']:.2f} bytes per token on the training split, windows of "
          f"{plan['token_seq_len']} tokens); entropy model training {plan['entropy_training_flops']:.2e} FLOPs")
    for name, m in plan["models"].items():
        params = parameters(m["kind"], m["config"])
        share = "" if m["global_share"] is None else f" | global model {100 * m['global_share']:.0f}% of its FLOPs"
        print(f"  {label(name):42s} {m['flops'] / 1e6:7.3f} MFLOP/byte ({m['flops_without_entropy'] / 1e6:.3f} "
              f"without entropy model) at {m['unit']:.2f} bytes per step{share} | parameters "
              f"{params['model'] / 1e6:.2f}M (+ hash {params['hash'] / 1e6:.2f}M) | " + " ".join(m["flags"]))
    t = plan_time(plan, s, seeds, extra, args.patch_sizes)
    # scoring: every run once; noise: 5 whole-text copies of the pieces and 6 x half as many context windows
    scoring = t["runs"] * rates["score_s"] + len(plan["models"]) * 8 * rates["score_s"]
    overhead = t["runs"] * rates["overhead_s"]
    total = t["sweep_s"] + t["main_s"] + scoring + overhead + rates["entropy_s"]
    middle = s["budgets"][len(s["budgets"]) // 2]
    extension = sum(middle * m["sec_per_step"] + rates["overhead_s"] + rates["score_s"] for m in plan["models"].values())
    where = "one GPU" if args.preset == "gpu" else "2 idle CPU cores"
    print(f"runs: {t['runs']} ({t['steps']:,} training steps); estimated on {where}: learning-rate sweep "
          f"{t['sweep_s'] / 60:.0f} min, curve and matched compute {t['main_s'] / 60:.0f} min, per-run set-up "
          f"{overhead / 60:.0f} min, scoring and noise {scoring / 60:.0f} min, entropy model and calibration "
          f"{rates['entropy_s'] / 60:.1f} min: {total / 60:.0f} min in all, and up to {extension / 60:.0f} more for each "
          f"round of the sweep's extension (one more learning rate where a best is at an edge; up to {s['lr_extend']})")
    if args.plan:
        return
    runner = Runner(out, s, data, args.preset)
    prepare_entropy(runner, s, args.patch_sizes, s["nohash_patch"])
    scores = Scores(out / "scores.json", corpus, s, args.noise_rate)
    runs = {}
    for job in sweep_jobs(list(plan["models"]), s, seeds[0]):
        runs[job] = train_job(runner, plan, job)
    sweep = {(m, lr): scores.clean(runs[(m, b, sd, lr)])["val_bpb"] for m, b, sd, lr in runs}
    middle = s["budgets"][len(s["budgets"]) // 2]
    for _ in range(s["lr_extend"]):  # a best at the edge of the range: one more rate beyond it, so that it is bracketed
        for m, lr in edge_learning_rates(sweep):
            job = (m, middle, seeds[0], lr)
            runs[job] = train_job(runner, plan, job)
            sweep[(m, lr)] = scores.clean(runs[job])["val_bpb"]
    best_lr = {m: min((lr for model, lr in sweep if model == m), key=lambda lr: sweep[(m, lr)]) for m in plan["models"]}
    swept = dict(runs)
    runs = {}
    for job in main_jobs(list(plan["models"]), s, seeds, extra, args.patch_sizes, best_lr):
        runs[job] = swept[job] if job in swept else train_job(runner, plan, job)
    minutes = (time.time() - t0) / 60
    text, short, numbers = report(plan, s, args, seeds, extra, args.patch_sizes, sweep, best_lr, runs, scores, minutes)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(numbers, indent=1, default=str) + "\n")
    Path(args.figures).mkdir(parents=True, exist_ok=True)
    plot_patches_vs_tokens(numbers["fixed_inference"],
                           {label(m): v for m, v in numbers["context_noise_increase"].items()},
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

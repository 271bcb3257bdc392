"""Reproduce the paper's comparisons at small scale, from one command (paper sections 4.4-4.6, tables 3-4).

    python tools/experiments.py                 # CPU preset: under an hour on 2 cores
    python tools/experiments.py --preset gpu    # one GPU
    python tools/experiments.py --study tokens  # patches versus tokens (BPE baseline): tools/patches_vs_tokens.py

Every model is trained by train.py on the default corpus with the same batches, so all see the same bytes
(matched data), and is evaluated on the same held-out bytes. The plain byte-level transformer is sized so
that its training FLOPs per byte match the BLT's (matched compute). The models:
  byte        a plain byte-level transformer (no patches)
  strided     BLT, a patch every k bytes, k = the entropy scheme's average patch size, rounded
  space       BLT, space patching (its patch size is what the text gives)
  entropy     BLT, entropy patching with a global threshold (calibrated to --patch-size)
  monotonic   BLT, entropy patching with the approximate monotonic rule (calibrated the same way)
  no-hash     BLT, entropy patching without hash n-gram embeddings
  learned     boundaries learned end to end (H-Net's dynamic chunking, learned.py), target --patch-size bytes
              per chunk: the same encoder, global transformer and decoder layers, no entropy model
The key comparison (entropy vs strided) runs with two seeds.

Outputs: OUT/results.md (the results table) and the figures (patching schemes, entropy, patch-size
histograms, BPB against training FLOPs). README.md and figures/ publish the numbers of one run, the cpu preset
on the default corpus with the default flags: only that run rewrites them (the table between README.md's
experiments markers, the figures in figures/), or any run given --publish; every other run draws its figures in
OUT/figures and leaves the repository's files alone. It says which files it rewrote. Runs that finished are
reused (train.py --resume), so an interrupted experiment continues where it stopped. One experiment per OUT
at a time (runtime.FolderLock).
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# As train.py says: OpenMP threads that spin while they wait make torch many times slower on a machine shared
# with other work. It must be set before torch loads, and the studies run train.py in this process.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere: the paper modules live at the top of the repository

import torch

from checkpoint import read_checkpoint  # noqa: E402
from entropy_model import ByteLMConfig  # noqa: E402
from blt import BLTConfig, build_model, byte_transformer_flops_per_byte, count_parameters, flops_per_byte
from plots import plot_bpb_vs_flops  # noqa: E402
from runtime import FolderLock, UsageError  # noqa: E402

README_START, README_END = "<!-- experiments:start -->", "<!-- experiments:end -->"

PRESETS = {
    "cpu": dict(steps=150, entropy_steps=300, final_eval_bytes=1 << 16, seq_len=256, byte_layers=4),
    "gpu": dict(steps=6000, entropy_steps=3000, final_eval_bytes=1 << 21, seq_len=1024, byte_layers=8),
    "smoke": dict(steps=20, entropy_steps=20, final_eval_bytes=4096, seq_len=64, byte_layers=2),  # tests only
}


def train(out: Path, *flags: str, preset: str, log):
    """One train.py run (reusing finished checkpoints in out), its output appended to the log file."""
    preset = "cpu" if preset == "smoke" else preset
    cmd = [sys.executable, str(ROOT / "train.py"), "--preset", preset, "--out", str(out), "--resume", *flags]
    print("$", " ".join(cmd[1:]), flush=True)
    log.write("$ " + " ".join(cmd[1:]) + "\n")
    log.flush()
    result = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"error: train.py failed (exit {result.returncode}); see {log.name}")


def checkpoint_metrics(path: Path) -> dict:
    ckpt = read_checkpoint(path)
    return {"metrics": ckpt["metrics"], "config": ckpt["config"], "kind": ckpt["kind"], "train": ckpt["train"]}


def parameters(kind: str, config: dict) -> tuple[int, int]:
    """(parameters without hash tables or the entropy model, hash-table parameters)."""
    if kind == "blt":
        with torch.device("meta"):
            counts = count_parameters(build_model(BLTConfig.from_dict(config)))
        return counts["encoder"] + counts["global_transformer"] + counts["decoder"], counts["hash_embeddings"]
    with torch.device("meta"):
        model = ByteLMConfig(**config).build()
    return sum(p.numel() for p in model.parameters()), 0


def matched_byte_dim(blt_cfg: BLTConfig, patch_size: float, seq_len: int, layers: int) -> int:
    """Width (a multiple of 32) of a plain byte transformer with training FLOPs per byte closest to BLT's."""
    target = flops_per_byte(blt_cfg, patch_size, seq_len)["train_total"]
    return min(range(64, 1025, 32),
               key=lambda d: abs(byte_transformer_flops_per_byte(d, layers, seq_len, 32)["train_total"] - target))


def main(argv=None):
    study = argparse.ArgumentParser(add_help=False)
    study.add_argument("--study", choices=("bytes", "tokens"), default="bytes")
    known, rest = study.parse_known_args(argv)
    if known.study == "tokens":  # its own flags: python tools/patches_vs_tokens.py --help
        sys.path.insert(0, str(ROOT / "tools"))
        import patches_vs_tokens
        return patches_vs_tokens.main(rest)
    argv = rest
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", choices=("bytes", "tokens"), default="bytes",
                   help="bytes: this study; tokens: patches versus tokens (tools/patches_vs_tokens.py, own flags)")
    p.add_argument("--preset", choices=PRESETS, default="cpu")
    p.add_argument("--data", default="shakespeare", help="corpus (train.py --data)")
    p.add_argument("--patch-size", type=float, default=4.0, help="target average patch size of the entropy schemes")
    p.add_argument("--out", default="out/experiments", help="folder for the runs")
    p.add_argument("--figures", default=None,
                   help="folder for the figures (default: figures/ when publishing, else OUT/figures)")
    p.add_argument("--publish", action=argparse.BooleanOptionalAction, default=None,
                   help="rewrite README.md's table and figures/ (default: only for the published run, the cpu "
                        "preset on the default corpus with the default --patch-size)")
    p.add_argument("--no-readme", action="store_true", help="do not write the table into README.md")
    args = p.parse_args(argv)
    s = PRESETS[args.preset]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    publish = args.publish if args.publish is not None else published_run(p, args, ("preset", "data", "patch_size"))
    args.figures = args.figures or str(ROOT / "figures" if publish else out / "figures")
    try:
        with FolderLock(out):  # one experiment per folder: two would train into the same runs
            run_all(args, s, out, publish and not args.no_readme)
    except UsageError as e:
        sys.exit(f"error: {e}")


def published_run(parser, args, keys) -> bool:
    """Whether these are the settings whose numbers the repository publishes: every key at its default."""
    return all(getattr(args, k) == parser.get_default(k) for k in keys)


def tell_written(paths: list[Path]):
    """One line: the files this run wrote, and whether the repository's published ones (README.md, docs/,
    figures/) were among them."""
    published = [q for q in paths if q.resolve() == ROOT / "README.md"
                 or q.resolve().parent in (ROOT / "docs", ROOT / "figures")]
    print(f"wrote {', '.join(map(str, paths))}" + ("" if published else
          "; README.md, docs/ and figures/ left as they are (--publish rewrites them)"))


def run_all(args, s: dict, out: Path, readme: bool):
    common = ["--data", args.data, "--steps", str(s["steps"]), "--entropy-steps", str(s["entropy_steps"]),
              "--final-eval-bytes", str(s["final_eval_bytes"]), "--seq-len", str(s["seq_len"])]
    t0 = time.time()
    log = open(out / "experiments.log", "a")
    run = lambda d, *f: train(d, *f, *common, preset=args.preset, log=log)  # noqa: E731
    size = ["--patch-size", str(args.patch_size)]

    seed0, seed1, nohash = out / "seed0", out / "seed1", out / "no-hash"
    run(seed0, "--stage", "entropy", "--patching", "entropy", *size)
    for scheme in ("entropy", "monotonic"):
        run(seed0, "--stage", "calibrate", "--patching", scheme, *size)
        run(seed0, "--stage", "blt", "--patching", scheme, *size)
    entropy_run = checkpoint_metrics(seed0 / "blt_entropy.pt")
    k = max(1, round(entropy_run["metrics"]["patch_size"]))
    run(seed0, "--stage", "blt", "--patching", "strided", "--patch-size", str(k))
    run(seed0, "--stage", "blt", "--patching", "space")
    run(seed0, "--stage", "blt", "--patching", "learned", *size)
    blt_cfg = BLTConfig.from_dict(entropy_run["config"])
    dim = matched_byte_dim(blt_cfg, entropy_run["metrics"]["patch_size"], s["seq_len"], s["byte_layers"])
    run(seed0, "--model", "byte", "--config", f"dim={dim}", "--config", f"layers={s['byte_layers']}",
        "--config", f"heads={dim // 32}", "--config", "multiple_of=32")
    for folder in (seed1, nohash):  # reuse the seed-0 entropy model: only the BLT changes
        folder.mkdir(exist_ok=True)
        if not (folder / "entropy.pt").exists():
            shutil.copy(seed0 / "entropy.pt", folder / "entropy.pt")
    run(nohash, "--stage", "calibrate", "--patching", "entropy", *size, "--config", "hash_ngram_sizes=[]")
    run(nohash, "--stage", "blt", "--patching", "entropy", *size, "--config", "hash_ngram_sizes=[]")
    run(seed1, "--stage", "calibrate", "--patching", "entropy", *size, "--seed", "1")
    run(seed1, "--stage", "blt", "--patching", "entropy", *size, "--seed", "1")
    run(seed1, "--stage", "blt", "--patching", "strided", "--patch-size", str(k), "--seed", "1")
    minutes = (time.time() - t0) / 60

    runs = {
        "byte-level transformer": (seed0 / "byte.pt", None),
        f"BLT strided (k = {k})": (seed0 / "blt_strided.pt", seed1 / "blt_strided.pt"),
        "BLT space": (seed0 / "blt_space.pt", None),
        "BLT entropy, global threshold": (seed0 / "blt_entropy.pt", seed1 / "blt_entropy.pt"),
        "BLT entropy, monotonic rule": (seed0 / "blt_monotonic.pt", None),
        "BLT entropy, no hash n-grams": (nohash / "blt_entropy.pt", None),
        "BLT learned boundaries (H-Net)": (seed0 / "blt_learned.pt", None),
    }
    rows, curves = [], {}
    for name, (path, path_seed1) in runs.items():
        r = checkpoint_metrics(path)
        m = r["metrics"]
        params, hash_params = parameters(r["kind"], r["config"])
        bpb = f"{m['val_bpb']:.3f}"
        if path_seed1 is not None:
            bpb += f" / {checkpoint_metrics(path_seed1)['metrics']['val_bpb']:.3f}"
        rows.append(f"| {name} | {bpb} | {m.get('patch_size', 1.0):.2f} | {m['train_flops_per_byte'] / 1e6:.2f} | "
                    f"{m['forward_flops_per_byte'] / 1e6:.2f} | {params / 1e6:.2f}M | {hash_params / 1e6:.2f}M | "
                    f"{m['stage_seconds']:.0f} |")
        curves[name] = {"jsonl": path.with_suffix(".jsonl")}
    seen = checkpoint_metrics(seed0 / "byte.pt")["metrics"]
    table = "\n".join([
        README_START,
        f"Regenerate with `python tools/experiments.py` ({args.preset} preset, {minutes:.0f} minutes here, "
        f"{seen['steps']} steps x {seen['bytes'] // seen['steps']:,} bytes = {seen['bytes'] / 1e6:.1f} MB seen by every model, "
        f"validation on the first {seen['val_bytes']:,} held-out bytes).",
        "",
        "| model | val BPB (seed 0 / seed 1) | avg patch size | train MFLOP/byte | inference MFLOP/byte | parameters | hash parameters | train s |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        README_END,
    ])
    (out / "results.md").write_text(table + "\n")
    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    names = ("bpb_vs_flops.png", "patching_schemes.png", "entropy.png", "patch_sizes.png")
    before = {n: (figures / n).stat().st_mtime_ns if (figures / n).exists() else None for n in names}
    plot_bpb_vs_flops(curves, figures / "bpb_vs_flops.png")
    subprocess.run([sys.executable, str(ROOT / "tools" / "figures.py"), "--checkpoint", str(seed0 / "blt_entropy.pt"),
                    "--data", args.data, "--out", str(figures), "--learned-checkpoint", str(seed0 / "blt_learned.pt")],
                   check=True, cwd=ROOT)
    written = [figures / n for n in names if (figures / n).exists() and (figures / n).stat().st_mtime_ns != before[n]]
    if readme:
        path = ROOT / "README.md"
        text = path.read_text()
        if README_START in text and README_END in text:
            before_table, rest = text.split(README_START, 1)
            path.write_text(before_table + table + rest.split(README_END, 1)[1])
            written.append(path)
    print(table)
    print(f"done in {minutes:.0f} minutes; figures in {figures}/, table in {out / 'results.md'}")
    tell_written([*written, out / "results.md"])


if __name__ == "__main__":
    main()

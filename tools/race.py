"""The race: BLT, the BPE transformer and the byte transformer, each run by its plain command under the same
wall-clock budget, one after another on this machine, all scored on the same held-out bytes.

    python tools/race.py --data tinyshakespeare --time-budget 300     # 4 runs of 300 s: about 21 minutes
    python tools/race.py --data tinyshakespeare --time-budget 300 --controls   # and 2 controls (6 runs)
    python tools/race.py --time-budget 600                            # the default corpus, 10 minutes each
    python tools/race.py --data tinyshakespeare --time-budget 300 --publish   # also rewrite the README's table

What a user with a laptop sees is wall-clock time, not FLOPs (paper section 4.5 counts FLOPs). Each run is
exactly the command a user would type, `python train.py --data D --time-budget S` plus one flag:

    BLT               (nothing: the plain command)
    BLT --preset cpu  (entropy patching: the entropy model trains first, inside the same budget)
    BPE               --model bpe
    byte              --model byte

Under a budget on a training split under 16 MB every plain command picks the small preset (train.py's
defaults block): settings found for BLT, given to the baselines alike. --controls adds the baselines with the
cpu preset's settings, which asks whether the plain command is each baseline's best.

Under --time-budget no model evaluates along the way (train.py's rule for every preset), so none loses
seconds that another keeps; each ends with the same evaluation over the whole validation split, inside its
budget. The table gives the facts that do not depend on the day (steps, bytes seen, training FLOPs per
byte) beside the ones that do (achieved FLOP/s, bits per byte).

A finished run is reused when the race is run again (its folder under --out holds its metrics); an
unfinished one starts over, since a budgeted run resumed later would not be the same race. --publish writes
the table between this race's markers in README.md and docs/training.md and says which files it rewrote;
without it nothing tracked is touched.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RUNS = [  # (name in the table, folder, extra flags): the plain commands
    ("BLT (plain command)", "blt", []),
    ("BLT, `--preset cpu` (entropy patching)", "blt-cpu", ["--preset", "cpu"]),
    ("BPE transformer, `--model bpe`", "bpe", ["--model", "bpe"]),
    ("byte transformer, `--model byte`", "byte", ["--model", "byte"]),
]
CONTROLS = [  # the baselines with their settings for step-counted runs: is the plain command their best?
    ("control: BPE transformer, `--model bpe --preset cpu`", "bpe-cpu", ["--model", "bpe", "--preset", "cpu"]),
    ("control: byte transformer, `--model byte --preset cpu`", "byte-cpu", ["--model", "byte", "--preset", "cpu"]),
]
PUBLISHED = (ROOT / "README.md", ROOT / "docs" / "training.md")


def markers(data: str, budget: float) -> tuple[str, str]:
    key = f"race {Path(data).stem if os.sep in data else data} {budget:g}s"
    return f"<!-- {key}:start -->", f"<!-- {key}:end -->"


def read_log(log: Path) -> list[dict] | None:
    try:
        return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None


def final_of(records: list[dict] | None) -> dict | None:
    """The final evaluation record in a metrics log (train.py's Run.finish), or None if it did not finish."""
    return next((r for r in reversed(records or []) if r.get("type") == "eval" and "stage_seconds" in r), None)


def final_record(folder: Path) -> tuple[dict, list[dict]] | None:
    """The final evaluation of the one model trained in `folder` (None if it did not finish), and its log. For
    BLT --preset cpu, the BLT's log (the entropy model's is entropy.jsonl)."""
    logs = [p for p in sorted(folder.glob("*.jsonl")) if p.stem != "entropy"]
    records = read_log(logs[0]) if len(logs) == 1 else None
    final = final_of(records)
    return (final, records) if final else None


def machine() -> str:
    """The CPU's model name and the torch threads, for the table's caption."""
    import torch
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    from runtime import default_dtype
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    what = torch.cuda.get_device_name() if device.type == "cuda" else f"{name}, {torch.get_num_threads()} threads"
    return f"{what}; default dtype {default_dtype(device)}"


def run_one(folder: Path, flags: list[str], data: str, budget: float, log_path: Path) -> None:
    cmd = [sys.executable, "train.py", "--data", data, "--time-budget", f"{budget:g}", *flags,
           "--out", str(folder), "--overwrite"]
    print("$ python " + " ".join(cmd[1:]), flush=True)
    with open(log_path, "a") as log:
        log.write("$ python " + " ".join(cmd[1:]) + "\n")
        log.flush()
        result = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if result.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-1:] or ["?"]
        sys.exit(f"error: train.py failed (exit {result.returncode}): {tail[0]} (whole output in {log_path})")


def train_bytes_per_token(final: dict, folder: Path | None) -> float | None:
    """A BPE run's bytes per token on its training split: its final record's, or (logs written before it was
    recorded there) its checkpoint's. None for the byte-level models."""
    if final.get("bytes_per_token") is None:
        return None
    if final.get("train_bytes_per_token"):
        return final["train_bytes_per_token"]
    import torch
    for path in sorted(folder.glob("*.pt")) if folder else []:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)["tokens"]["train_bytes_per_token"]
        except (OSError, RuntimeError, KeyError, TypeError):
            continue
    return None


def row(name: str, final: dict, records: list[dict], entropy_final: dict | None, folder: Path | None = None) -> dict:
    """One line of the table from a run's final evaluation and log (folder: the run's, for a BPE checkpoint)."""
    trains = [r for r in records if r.get("type") == "train"]
    train_seconds = trains[-1]["time"] if trains else final["stage_seconds"]  # the clock at the last step
    bytes_seen = final["bytes"]
    # Achieved FLOP/s counts the FLOPs of the bytes trained on. The FLOPs per byte of the table are the held-out
    # text's; a BPE model's FLOPs go per token, and its tokenizer packs its own training text tighter (about 3.26
    # bytes per token on tiny Shakespeare's against 2.90 held out), so its training bytes cost fewer FLOPs each.
    seen_flops_per_byte = final["train_flops_per_byte"]
    train_bpt = train_bytes_per_token(final, folder)
    if train_bpt:
        seen_flops_per_byte *= final["bytes_per_token"] / train_bpt
    return {"name": name, "steps": final["steps"], "bytes_seen": bytes_seen,
            "train_mflop_per_byte": final["train_flops_per_byte"] / 1e6,
            "gflop_per_s": seen_flops_per_byte * bytes_seen / max(1e-9, train_seconds) / 1e9,
            "val_bpb": final["val_bpb"], "val_bytes": final["val_bytes"], "patch_size": final.get("patch_size"),
            "bytes_per_token": final.get("bytes_per_token"),
            "entropy_seconds": entropy_final["stage_seconds"] if entropy_final else None}


def table(rows: list[dict], command: str, budget: float, where: str) -> str:
    best = min(r["val_bpb"] for r in rows)
    lines = [f"`{command}` ({where}; "
             f"{rows[0]['val_bytes']:,} validation bytes scored by every model):", "",
             f"| command (`--time-budget {budget:g}`) | steps | bytes seen | train MFLOP/byte | achieved GFLOP/s | "
             "val bits per byte |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["val_bpb"]):
        unit = (f", patch {r['patch_size']:.2f} B" if r["patch_size"] else "") + \
               (f", {r['bytes_per_token']:.2f} B/token" if r["bytes_per_token"] else "") + \
               (f", entropy model {r['entropy_seconds']:.0f} s of the budget" if r["entropy_seconds"] else "")
        bpb = f"**{r['val_bpb']:.4f}**" if r["val_bpb"] == best else f"{r['val_bpb']:.4f}"
        lines.append(f"| {r['name']}{unit} | {r['steps']:,} | {r['bytes_seen'] / 1e6:.2f} MB | "
                     f"{r['train_mflop_per_byte']:.1f} | {r['gflop_per_s']:.1f} | {bpb} |")
    return "\n".join(lines)


def shown(path: Path) -> str:
    """A page's path as the user reads it: relative to the repository when inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def publish(text: str, start: str, end: str) -> list[Path]:
    """Rewrite the part of each published page between this race's markers; returns the pages rewritten.
    A page without the markers is left alone (with a warning)."""
    rewritten = []
    for page in PUBLISHED:
        try:
            body = page.read_text()
            if start not in body or end not in body:
                print(f"warning: {shown(page)} has no {start} ... {end} markers; left as it is",
                      file=sys.stderr)
                continue
            before, rest = body.split(start, 1)
            page.write_text(before + start + "\n" + text + "\n" + end + rest.split(end, 1)[1])
            rewritten.append(page)
        except (OSError, UnicodeDecodeError) as e:
            sys.exit(f"error: cannot rewrite {page}: {getattr(e, 'strerror', None) or e}")
    return rewritten


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="shakespeare", help="corpus name or file, as train.py --data (default: shakespeare)")
    p.add_argument("--time-budget", type=float, default=300.0, metavar="SECONDS", help="each model's budget (default 300)")
    p.add_argument("--out", default=None, help="folder for the runs (default: out/race-<corpus>-<budget>s)")
    p.add_argument("--only", default=None, help="comma-separated run folders to race (default: all: "
                   + ",".join(f for _, f, _ in RUNS) + ")")
    p.add_argument("--controls", action="store_true",
                   help="also race the BPE and byte transformers with the cpu preset's settings (6 runs in all)")
    p.add_argument("--extra", default="", help=argparse.SUPPRESS)  # flags added to every run (tests: --preset smoke)
    p.add_argument("--publish", action="store_true", help="write the table into README.md and docs/training.md")
    args = p.parse_args(argv)
    if not args.time_budget > 0:
        p.error(f"--time-budget must be a number > 0, not {args.time_budget:g}")
    runs = RUNS + CONTROLS if args.controls else RUNS
    if args.only:
        wanted = args.only.split(",")
        unknown = set(wanted) - {f for _, f, _ in RUNS + CONTROLS}
        if unknown:
            p.error(f"--only: unknown run(s) {', '.join(sorted(unknown))}; choose from "
                    f"{', '.join(f for _, f, _ in RUNS + CONTROLS)}")
        runs = [r for r in RUNS + CONTROLS if r[1] in wanted]
    stem = Path(args.data).stem if os.sep in args.data else args.data
    out = Path(args.out or ROOT / "out" / f"race-{stem}-{args.time_budget:g}s")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        sys.exit(f"error: cannot create {out}: {e.strerror or e}")
    rows = []
    for name, folder, flags in runs:
        done = final_record(out / folder)
        if done is None:
            run_one(out / folder, flags + args.extra.split(), args.data, args.time_budget, out / "race.log")
            done = final_record(out / folder)
            if done is None:
                sys.exit(f"error: {out / folder} holds no finished run after train.py; see {out / 'race.log'}")
        else:
            print(f"{name}: finished earlier in {out / folder}, reused")
        entropy = final_of(read_log(out / folder / "entropy.jsonl")) if (out / folder / "entropy.jsonl").is_file() else None
        rows.append(row(name, *done, entropy, out / folder))
        r = rows[-1]
        print(f"{name}: {r['steps']} steps, {r['bytes_seen'] / 1e6:.2f} MB seen, {r['gflop_per_s']:.1f} GFLOP/s, "
              f"val {r['val_bpb']:.4f} bpb", flush=True)
    where = f"{machine()}, {datetime.date.today().isoformat()}"
    command = (f"python tools/race.py --data {args.data} --time-budget {args.time_budget:g}"
               + (" --controls" if args.controls else "") + (f" --only {args.only}" if args.only else ""))
    text = table(rows, command, args.time_budget, where)
    print("\n" + text)
    for path, body in ((out / "race.md", text), (out / "race.json", json.dumps({"machine": where, "rows": rows}, indent=1))):
        try:
            path.write_text(body + "\n")
        except OSError as e:
            sys.exit(f"error: cannot write {path}: {e.strerror or e}")
    if args.publish:
        rewritten = publish(text, *markers(args.data, args.time_budget))
        print("rewrote " + (", ".join(shown(p) for p in rewritten) or "nothing"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

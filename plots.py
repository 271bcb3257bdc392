"""Every picture this project draws, in one place (matplotlib, written as PNG files).

    plot_curves         training curves: train and validation bits per byte against bytes and time (train.py)
    plot_entropies      per-byte entropy with the global threshold and patch starts, paper figure 4 (sample.py)
    draw_schemes        one sentence under the four patching schemes, paper figure 3 (tools/figures.py)
    draw_histograms     patch-size histograms per scheme (tools/figures.py)
    plot_learned_training  learned boundaries over training: bits per byte against BLT's, and the realised
                        bytes per chunk against the target (tools/figures.py)
    plot_bpb_vs_flops   validation bits per byte against training FLOPs, paper figure 1's axes (tools/experiments.py)
    plot_patches_vs_tokens  BPE vs BLT at fixed inference FLOPs, and robustness to noise (tools/patches_vs_tokens.py)

matplotlib is imported inside `pyplot()`, with the Agg backend, so importing this module costs nothing and
no display is needed. Every figure is saved to a temporary name and renamed, so a reader never sees half a PNG.
"""
import json
import os
from pathlib import Path

from patching import BOS_ID, OFFSET

COLOURS = ["#f4a3a3", "#a3d3f4", "#b9e6a3", "#f4dca3", "#d5b3f0"]


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path, **kwargs):
    """fig -> path (PNG) through a temporary file; closes the figure."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    try:
        fig.savefig(tmp, **kwargs)
        os.replace(tmp, path)
    finally:
        pyplot().close(fig)
        if tmp.exists():
            tmp.unlink()


def plot_curves(jsonl_paths: list[Path], png: Path, title: str):
    """Training curves (train and validation bits per byte against bytes seen and wall time) -> PNG."""
    plt = pyplot()

    fig, (ax_bytes, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
    for path in jsonl_paths:
        records = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
        train = [r for r in records if r["type"] == "train"]
        evals = [r for r in records if r["type"] == "eval"]
        label = path.stem
        for ax, key, scale in ((ax_bytes, "bytes", 1e6), (ax_time, "time", 1.0)):
            if train:
                line, = ax.plot([r[key] / scale for r in train], [r["bpb"] for r in train], alpha=0.35, lw=1)
                color = line.get_color()
            else:
                color = None
            if evals:
                ax.plot([r[key] / scale for r in evals], [r["val_bpb"] for r in evals], "o-", color=color,
                        ms=3, label=f"{label} (val {evals[-1]['val_bpb']:.3f})")
    ax_bytes.set_xlabel("training bytes (millions)")
    ax_time.set_xlabel("wall time in this stage (s)")
    for ax in (ax_bytes, ax_time):
        ax.set_ylabel("bits per byte (faint: train, dots: validation)")
        ax.grid(alpha=0.3)
        ax.set_ylim(top=min(ax.get_ylim()[1], 6))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save(fig, png, dpi=110)


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_learned_training(learned_log: Path, png: Path, target: float, other_log: Path | None = None):
    """A learned-boundary run (train.py --patching learned) over training -> PNG: left, train and validation
    bits per byte against steps, beside another run's (other_log, e.g. BLT with entropy patching); right, the
    realised bytes per chunk against the ratio loss's target."""
    plt = pyplot()
    fig, (ax_bpb, ax_chunk) = plt.subplots(1, 2, figsize=(11, 4))
    for path, name in ((learned_log, "learned boundaries"), (other_log, None)):
        if path is None:
            continue
        records = read_log(path)
        train = [r for r in records if r["type"] == "train"]
        evals = [r for r in records if r["type"] == "eval"]
        name = name or Path(path).stem
        line, = ax_bpb.plot([r["step"] for r in train], [r["bpb"] for r in train], alpha=0.35, lw=1)
        if evals:
            ax_bpb.plot([r["step"] for r in evals], [r["val_bpb"] for r in evals], "o-", color=line.get_color(), ms=3,
                        label=f"{name} (val {evals[-1]['val_bpb']:.3f})")
        chunks = [r for r in train if "bytes_per_chunk" in r]
        if chunks:
            ax_chunk.plot([r["step"] for r in chunks], [r["bytes_per_chunk"] for r in chunks], color=line.get_color(),
                          label=f"{name}: realised bytes per chunk")
    ax_chunk.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:g}")
    ax_bpb.set_ylabel("bits per byte (faint: train, dots: validation)")
    ax_bpb.set_ylim(top=min(ax_bpb.get_ylim()[1], 6))
    ax_chunk.set_ylabel("bytes per chunk")
    for ax in (ax_bpb, ax_chunk):
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, png, dpi=110)


def plot_entropies(path: str, ids: list[int], entropies: list[float], starts: list[bool], threshold, monotonic):
    """Per-byte entropy with the threshold line and patch starts marked (the style of paper figure 4)."""
    plt = pyplot()
    # Byte j is drawn at the entropy H[j-1] that decided whether it starts a patch (patching.py), so with
    # the global rule the bytes above the threshold line are exactly the patch starts.
    n = min(len(ids), len(entropies) + 1, 120)  # a readable stretch
    fig, ax = plt.subplots(figsize=(max(8, n * 0.13), 3.2))
    x = list(range(1, n))
    ax.plot(x, entropies[: n - 1], color="0.3", lw=1, marker="o", ms=2.5)
    for i in x:
        if starts[i]:
            ax.axvline(i - 0.5, color="tab:blue", alpha=0.25, lw=1)
    if threshold is not None and not monotonic:
        ax.axhline(threshold, color="tab:red", ls="--", lw=1, label=f"global threshold θ = {threshold:.2f}")
        ax.legend(loc="upper right", fontsize=8)
    labels = [("BOS" if i == BOS_ID else chr(i - OFFSET) if 32 <= i - OFFSET < 127 else "·") for i in ids[:n]]
    ax.set_xticks(x, labels[1:], fontsize=6)
    ax.set_ylabel("entropy H (nats)")
    ax.set_title("next-byte entropy; blue lines: patch starts")
    fig.tight_layout()
    save(fig, path, dpi=130)


def draw_schemes(path, text: bytes, rows: dict):
    """rows: {scheme name: patch lengths (1, P) of [BOS] + text} -> bytes coloured by patch, one row each."""
    plt = pyplot()
    n = len(text)
    fig, ax = plt.subplots(figsize=(max(8, 0.17 * n), 0.55 * len(rows) + 0.6))
    for r, (name, lengths) in enumerate(rows.items()):
        y = len(rows) - 1 - r
        lengths = [int(x) for x in lengths[0] if x > 0][1:]  # drop the BOS patch; the slot is past the text
        pos = 0
        for p, length in enumerate(lengths):
            for i in range(pos, min(pos + length, n)):
                ax.add_patch(plt.Rectangle((i, y + 0.1), 1, 0.8, color=COLOURS[p % len(COLOURS)], lw=0))
                char = chr(text[i]) if 32 <= text[i] < 127 else "·"
                ax.text(i + 0.5, y + 0.5, "␣" if char == " " else char, ha="center", va="center",
                        fontsize=8, family="monospace")
            if pos < n:
                ax.plot([pos, pos], [y + 0.05, y + 0.95], color="black", lw=1.2)
            pos += length
        ax.text(-0.5, y + 0.5, name, ha="right", va="center", fontsize=9)
    ax.set_xlim(-0.2, n + 0.2)
    ax.set_ylim(0, len(rows))
    ax.axis("off")
    ax.set_title("Patching schemes (paper section 2): colour = patch, bar = patch start", fontsize=10)
    fig.tight_layout()
    save(fig, path, dpi=140, bbox_inches="tight")


def draw_histograms(path, sizes: dict):
    """sizes: {scheme name: 1-D tensor of patch sizes} -> one histogram per scheme."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(sizes), figsize=(3.2 * len(sizes), 2.8), sharey=True)
    for ax, (name, values) in zip(axes, sizes.items()):
        top = min(int(values.max()), 24)
        ax.hist(values.clamp(max=top).numpy(), bins=range(1, top + 2), color="tab:blue", alpha=0.8, align="left")
        ax.set_title(f"{name}\nmean {values.float().mean():.2f} bytes", fontsize=8)
        ax.set_xlabel("patch size (bytes)")
    axes[0].set_ylabel("patches")
    fig.suptitle("Patch sizes on the validation split", fontsize=10)
    fig.tight_layout()
    save(fig, path, dpi=130)


def plot_bpb_vs_flops(runs: dict, path: Path):
    """runs: {label: {"jsonl": metrics log of train.py}} -> validation BPB against training FLOPs (log x)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, run in runs.items():
        records = [json.loads(l) for l in run["jsonl"].read_text().splitlines() if l.strip()]
        evals = [r for r in records if r["type"] == "eval"]
        x = [r["bytes"] * r["train_flops_per_byte"] for r in evals]
        ax.plot(x, [r["val_bpb"] for r in evals], "o-", ms=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (paper section 4.5 accounting)")
    ax.set_ylabel("validation bits per byte")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Bits per byte against training compute")
    fig.tight_layout()
    save(fig, path, dpi=130)


def plot_patches_vs_tokens(lines: dict, noise_increase: dict, path: Path):
    """Paper figure 1 in miniature, and robustness to noise (tools/patches_vs_tokens.py).

    lines: {model: {"label", "flops": [training FLOPs per budget], "bpb": [mean val BPB per budget], "err": [its
    standard deviation over seeds]}}, all at the same inference FLOPs per byte -> left: BPB against training
    FLOPs (log x), one line per model, error bars over seeds. noise_increase: {label: {noise: BPB increase over
    clean}} -> right: grouped bars."""
    plt = pyplot()
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(13, 4.4), gridspec_kw={"width_ratios": [1.1, 1]})
    for run in lines.values():
        ax.errorbar(run["flops"], run["bpb"], yerr=run.get("err"), fmt="o-", ms=4, capsize=3, label=run["label"])
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (paper section 4.5 accounting; BLT's entropy model included)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("Fixed inference FLOPs per byte: BPE vs BLT patch sizes\n(mean over seeds, bars: standard deviation)",
                 fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    models = list(noise_increase)
    kinds = list(next(iter(noise_increase.values())))
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        bars.bar([k + (i - (len(models) - 1) / 2) * width for k in range(len(kinds))],
                 [noise_increase[model][kind] for kind in kinds], width, label=model)
    bars.set_xticks(range(len(kinds)), kinds, fontsize=8)
    bars.set_ylabel("increase in validation bits per byte")
    bars.set_title("Noised context, clean continuation: bits per byte minus with clean context", fontsize=10)
    bars.grid(alpha=0.3, axis="y")
    bars.legend(fontsize=7)
    fig.tight_layout()
    save(fig, path, dpi=130)

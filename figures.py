"""Pictures of patching (paper section 2, figures 3 and 4), drawn from a trained BLT checkpoint.

    python figures.py --checkpoint out/shakespeare-cpu/blt_entropy.pt --data shakespeare --out figures

writes
  patching_schemes.png  one sentence under the four schemes, bytes coloured by patch (paper figure 3):
                        strided, space, entropy with a global threshold, entropy with the monotonic rule
  entropy.png           per-byte entropy of the sentence, the global threshold and the patch starts
                        (paper figure 4)
  patch_sizes.png       patch-size histograms per scheme on the validation split (with --data)

The entropy model and the global threshold come from the checkpoint. The monotonic threshold is calibrated
here on the same text so that it gives the same average patch size as the global one; the strided patch size
is that average, rounded.
"""
import argparse
import os
import sys
from pathlib import Path

import torch

from patching import (OFFSET, average_patch_size, calibrate_threshold, entropy_patch_starts, lengths_from_starts,
                      limit_patch_length, patch_lengths, tokenize)

SENTENCE = "Daenerys Targaryen is in Game of Thrones, a fantasy epic by George R.R. Martin."
COLOURS = ["#f4a3a3", "#a3d3f4", "#b9e6a3", "#f4dca3", "#d5b3f0"]


def scheme_lengths(tokens, entropy_model, threshold_global, threshold_monotonic, stride, max_len):
    """Patch lengths (B, P) of tokens (B, T) under each of the four schemes."""
    H = entropy_model.entropies(tokens)
    return {
        f"strided (k = {stride})": patch_lengths(tokens, "strided", patch_size=stride, max_patch_length=max_len),
        "space": patch_lengths(tokens, "space", max_patch_length=max_len),
        f"entropy, global θ = {threshold_global:.2f}": lengths_from_starts(
            limit_patch_length(entropy_patch_starts(H, threshold_global), max_len)),
        f"entropy, monotonic θ = {threshold_monotonic:.2f}": lengths_from_starts(
            limit_patch_length(entropy_patch_starts(H, threshold_monotonic, monotonic=True), max_len)),
    }


def draw_schemes(path, text: bytes, rows: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    fig.savefig(path, dpi=140, bbox_inches="tight")
    plt.close(fig)


def draw_histograms(path, sizes: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(sizes), figsize=(3.2 * len(sizes), 2.8), sharey=True)
    for ax, (name, values) in zip(axes, sizes.items()):
        top = min(int(values.max()), 24)
        ax.hist(values.clamp(max=top).numpy(), bins=range(1, top + 2), color="tab:blue", alpha=0.8, align="left")
        ax.set_title(f"{name}\nmean {values.float().mean():.2f} bytes", fontsize=8)
        ax.set_xlabel("patch size (bytes)")
    axes[0].set_ylabel("patches")
    fig.suptitle("Patch sizes on the validation split", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description="Draw the patching pictures from a trained BLT checkpoint.")
    p.add_argument("--checkpoint", required=True, help="a BLT checkpoint with entropy patching (train.py)")
    p.add_argument("--text", default=SENTENCE, help="the sentence to draw")
    p.add_argument("--data", default=None, help="corpus for the patch-size histograms (e.g. shakespeare)")
    p.add_argument("--val-bytes", type=int, default=1 << 18, help="validation bytes for the histograms")
    p.add_argument("--out", default="figures", help="output folder")
    args = p.parse_args(argv)

    from sample import CheckpointError, load_blt, plot_entropies
    try:
        model = load_blt(args.checkpoint)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    cfg = model.cfg
    if model.entropy_model is None or cfg.entropy_threshold is None:
        sys.exit("error: the checkpoint has no entropy model; train one with entropy patching (train.py)")
    os.makedirs(args.out, exist_ok=True)
    torch.set_grad_enabled(False)

    text = args.text.encode()
    tokens = torch.tensor([tokenize(text)])
    H = model.entropy_model.entropies(tokens)
    global_lengths = lengths_from_starts(entropy_patch_starts(H, cfg.entropy_threshold))
    target = average_patch_size(global_lengths)
    theta_m = cfg.entropy_threshold if cfg.patching == "monotonic" else calibrate_threshold(H, target, monotonic=True)
    theta_g = cfg.entropy_threshold if cfg.patching == "entropy" else calibrate_threshold(H, target)
    stride = max(1, round(target))
    rows = scheme_lengths(tokens, model.entropy_model, theta_g, theta_m, stride, cfg.max_patch_length)
    draw_schemes(Path(args.out) / "patching_schemes.png", text, rows)
    starts = torch.zeros(tokens.shape[1] + 1, dtype=torch.bool)
    starts[(global_lengths[0].cumsum(0) - global_lengths[0])] = True
    plot_entropies(Path(args.out) / "entropy.png", tokens[0].tolist(), H[0].tolist(), starts.tolist(), theta_g, False)
    print(f"wrote {args.out}/patching_schemes.png and {args.out}/entropy.png")

    if args.data:
        from data import DataError, eval_windows, load_corpus
        try:
            corpus = load_corpus(args.data)
        except DataError as e:
            sys.exit(f"error: {e}")
        sizes = {}
        for x, _ in eval_windows(corpus.val, 512, 16, max_bytes=args.val_bytes):
            for name, lengths in scheme_lengths(x, model.entropy_model, theta_g, theta_m, stride,
                                                cfg.max_patch_length).items():
                real = lengths[:, 1:]  # drop the BOS patch
                sizes.setdefault(name, []).append(real[real > 0])
        draw_histograms(Path(args.out) / "patch_sizes.png", {k: torch.cat(v) for k, v in sizes.items()})
        print(f"wrote {args.out}/patch_sizes.png")


if __name__ == "__main__":
    main()

"""Pictures of patching (paper section 2, figures 3 and 4), drawn from a trained BLT checkpoint.

    python tools/figures.py --checkpoint out/shakespeare-cpu/blt_entropy.pt --data shakespeare --out figures
    python tools/figures.py --checkpoint out/shakespeare-cpu/blt_entropy.pt \
        --learned-checkpoint out/shakespeare-cpu/blt_learned.pt --out figures    # with learned boundaries

writes
  patching_schemes.png  one sentence under the four schemes, bytes coloured by patch (paper figure 3):
                        strided, space, entropy with a global threshold, entropy with the monotonic rule;
                        and, given --learned-checkpoint (train.py --patching learned), the boundaries that
                        model learned (H-Net's dynamic chunking, learned.py) on the same sentence
  entropy.png           per-byte entropy of the sentence, the global threshold and the patch starts
                        (paper figure 4)
  patch_sizes.png       patch-size histograms per scheme on the validation split (with --data)
  learned_training.png  with --learned-checkpoint: that run's bits per byte over training beside the
                        --checkpoint's run (their .jsonl logs, next to the checkpoints), and its realised bytes
                        per chunk against the target

The entropy model and the global threshold come from the checkpoint. The monotonic threshold is calibrated
here on the same text so that it gives the same average patch size as the global one; the strided patch size
is that average, rounded.
"""
import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere: the paper modules live at the top of the repository

import torch

from checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from plots import draw_histograms, draw_schemes, plot_entropies, plot_learned_training  # noqa: E402
from sample import load_blt  # noqa: E402
from patching import ( average_patch_size, calibrate_threshold, entropy_patch_starts, lengths_from_starts,
                      limit_patch_length, patch_lengths, tokenize)

SENTENCE = "Daenerys Targaryen is in Game of Thrones, a fantasy epic by George R.R. Martin."


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


def learned_lengths(model, tokens: torch.Tensor, bos_patch: bool) -> torch.Tensor:
    """Chunk lengths (B, P) of tokens (B, T) under a model with learned boundaries (b_t from its router), in
    the layout of patch_lengths: with bos_patch, BOS is a patch of its own and the first byte starts one (the
    learned chunk that holds BOS may hold bytes too), as draw_schemes expects; a final start closes the last."""
    starts = torch.cat([model.boundaries(tokens), torch.ones_like(tokens[:, :1], dtype=torch.bool)], dim=1)
    if bos_patch:
        starts[:, :2] = True
    return lengths_from_starts(starts)


def load_learned(path: str):
    """The model of a train.py --patching learned checkpoint, or exit with one line."""
    try:
        kind, cfg, model = load_checkpoint(path, kinds=("blt",))
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    if cfg.patching != "learned":
        sys.exit(f"error: {path} uses {cfg.patching} patching; --learned-checkpoint needs train.py --patching learned")
    return model


@torch.no_grad()  # pictures only: and, called from Python, no global switch left behind
def main(argv=None):
    p = argparse.ArgumentParser(description="Draw the patching pictures from a trained BLT checkpoint.")
    p.add_argument("--checkpoint", required=True, help="a BLT checkpoint with entropy patching (train.py)")
    p.add_argument("--text", default=SENTENCE, help="the sentence to draw")
    p.add_argument("--data", default=None, help="corpus for the patch-size histograms (e.g. shakespeare)")
    p.add_argument("--val-bytes", type=int, default=1 << 18, help="validation bytes for the histograms")
    p.add_argument("--out", default="figures", help="output folder")
    p.add_argument("--learned-checkpoint", default=None,
                   help="a BLT with learned boundaries (train.py --patching learned): its chunks join the pictures")
    args = p.parse_args(argv)
    learned = load_learned(args.learned_checkpoint) if args.learned_checkpoint else None

    try:
        model = load_blt(args.checkpoint)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    cfg = model.cfg
    if model.entropy_model is None or cfg.entropy_threshold is None:
        sys.exit("error: the checkpoint has no entropy model; train one with entropy patching (train.py)")
    os.makedirs(args.out, exist_ok=True)

    text = args.text.encode()
    tokens = torch.tensor([tokenize(text)])
    H = model.entropy_model.entropies(tokens)
    global_lengths = lengths_from_starts(entropy_patch_starts(H, cfg.entropy_threshold))
    target = average_patch_size(global_lengths)
    theta_m = cfg.entropy_threshold if cfg.patching == "monotonic" else calibrate_threshold(H, target, monotonic=True)
    theta_g = cfg.entropy_threshold if cfg.patching == "entropy" else calibrate_threshold(H, target)
    stride = max(1, round(target))
    rows = scheme_lengths(tokens, model.entropy_model, theta_g, theta_m, stride, cfg.max_patch_length)
    if learned is not None:
        rows[f"learned (H-Net), target {learned.cfg.patch_size:g}"] = learned_lengths(learned, tokens, bos_patch=True)
    draw_schemes(Path(args.out) / "patching_schemes.png", text, rows)
    starts = torch.zeros(tokens.shape[1] + 1, dtype=torch.bool)
    starts[(global_lengths[0].cumsum(0) - global_lengths[0])] = True
    plot_entropies(Path(args.out) / "entropy.png", tokens[0].tolist(), H[0].tolist(), starts.tolist(), theta_g, False)
    print(f"wrote {args.out}/patching_schemes.png and {args.out}/entropy.png")
    if learned is not None:
        log, other = Path(args.learned_checkpoint).with_suffix(".jsonl"), Path(args.checkpoint).with_suffix(".jsonl")
        if log.is_file():
            plot_learned_training(log, Path(args.out) / "learned_training.png", learned.cfg.patch_size,
                                  other if other.is_file() else None)
            print(f"wrote {args.out}/learned_training.png")
        else:
            print(f"no {log}: learned_training.png not drawn")

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
            if learned is not None:  # every chunk but the one holding BOS
                real = learned_lengths(learned, x, bos_patch=False)[:, 1:]
                sizes.setdefault("learned (H-Net)", []).append(real[real > 0])
        draw_histograms(Path(args.out) / "patch_sizes.png", {k: torch.cat(v) for k, v in sizes.items()})
        print(f"wrote {args.out}/patch_sizes.png")


if __name__ == "__main__":
    main()

"""The command line of train.py: its flags, and `--config KEY=VALUE` overrides of a model config.

Values a preset decides default to None here; train.py fills them from its PRESETS (the defaults, in one place).
"""
import argparse
import json
from dataclasses import fields

from runtime import UsageError


def parse_overrides(pairs: list[str], cls) -> dict:
    """["local_dim=192", "hash_ngram_sizes=[3,4,5]"] -> {"local_dim": 192, ...}, checked against cls's fields."""
    known = {f.name for f in fields(cls)}
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in known:
            raise UsageError(f"--config {pair!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(known))}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def parse_args(argv, presets) -> argparse.Namespace:
    """train.py's flags. Each defaults to None where the preset decides."""
    p = argparse.ArgumentParser(description="Train the entropy model, calibrate its threshold, train BLT "
                                "(or a byte-level baseline), and report held-out bits per byte.")
    p.add_argument("--data", default="shakespeare",
                   help="a local file (last 10%% is validation), a directory, or a corpus name: shakespeare "
                        "(default), tinyshakespeare, enwik8")
    p.add_argument("--preset", choices=presets, default=None, help="cpu or gpu (default: gpu if CUDA is available)")
    p.add_argument("--stage", choices=("all", "entropy", "calibrate", "blt"), default="all",
                   help="run one stage alone (each reads what the previous one wrote into --out)")
    p.add_argument("--model", choices=("blt", "byte", "bpe"), default="blt",
                   help="byte: a plain byte-level transformer; bpe: a transformer over byte-level BPE tokens")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="--model bpe: BPE vocabulary, trained on the training split (default 4096: ~3 bytes per "
                        "token on shakespeare)")
    p.add_argument("--patching", choices=("entropy", "monotonic", "strided", "space"), default="entropy")
    p.add_argument("--patch-size", type=float, default=None,
                   help="target average patch size (entropy schemes) or stride (strided)")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model config field (BLTConfig; ByteLMConfig with --model byte; "
                        "tokens.TokenLMConfig with --model bpe)")
    p.add_argument("--out", default=None, help="output folder (default: out/<corpus>-<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the checkpoints in --out (finished stages are skipped)")
    p.add_argument("--overwrite", action="store_true", help="start over even if --out holds checkpoints")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="wall-clock budget for the whole command; the schedules follow the clock")
    p.add_argument("--steps", type=int, default=None, help="training steps of the main model")
    p.add_argument("--entropy-steps", type=int, default=None, help="training steps of the entropy model")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows per optimizer step of the main model (the global batch, over all processes)")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="windows per forward/backward in one process; the rest of the batch is gradient "
                        "accumulation (default: batch size / processes)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="bytes per window of the main model; --model bpe reads round(seq_len / bytes per token "
                        "of the training split) tokens, so every model's windows span the same bytes")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate of the main model")
    p.add_argument("--entropy-lr", type=float, default=None, help="peak learning rate of the entropy model")
    p.add_argument("--entropy-seq-len", type=int, default=None, help="bytes per window for the entropy model")
    p.add_argument("--warmup-steps", type=int, default=None, help="warmup steps of the main model")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay of the main model (default 0.1)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="autocast dtype (default bf16)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice, the physical cores)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--eval-interval", type=int, default=None, help="steps between validation estimates")
    p.add_argument("--eval-bytes", type=int, default=None, help="validation bytes per periodic estimate")
    p.add_argument("--final-eval-bytes", type=int, default=0, help="bytes of the final evaluation (0: all)")
    p.add_argument("--log-interval", type=int, default=None, help="steps between logged training losses")
    p.add_argument("--checkpoint-interval", type=int, default=None,
                   help="save a checkpoint at every evaluation whose step is a multiple of this (default: eval interval)")
    p.add_argument("--calibration-windows", type=int, default=256, help="training windows used to calibrate")
    p.add_argument("--stop-at", type=int, default=None, help="save a resumable checkpoint after this step and stop")
    return p.parse_args(argv)

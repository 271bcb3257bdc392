"""The command line of train.py (and the checks sample.py shares): flags, `--config KEY=VALUE` overrides of a
model config, and every check of a user-supplied value, done here as it enters.

Values a preset decides default to None here; train.py fills them from its PRESETS (the defaults, in one place).
A bad value is one line on stderr, `error: ...`, naming the flag or key, the value and what is allowed; the
model configs check their own fields (BLTConfig, ByteLMConfig), and this module says which flag set them.
"""
import argparse
import json
import math
import re
from dataclasses import asdict, fields

import torch

from blt import BLTConfig
from entropy_model import ConfigError
from runtime import UsageError


class Parser(argparse.ArgumentParser):
    """argparse, with a bad command line told in one line rather than the usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def int_at_least(minimum: int):
    """An argparse type: a whole number >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: must be a whole number >= {minimum}")
        return value
    return parse


def number(above: float | None = None, at_least: float | None = None, at_most: float | None = None):
    """An argparse type: a finite number within the given bounds."""
    bounds = [f"> {above:g}" if above is not None else "", f">= {at_least:g}" if at_least is not None else "",
              f"<= {at_most:g}" if at_most is not None else ""]

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (above is None or value > above) and (at_least is None or value >= at_least)
                and (at_most is None or value <= at_most)):
            raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number {' and '.join(b for b in bounds if b)}")
        return value
    return parse


def nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def device_name(text: str) -> str:
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r}: must be cpu, cuda, cuda:N or mps")
    return text


SEED = int_at_least(0)  # numpy seeds must be >= 0
THREADS = int_at_least(1)


def parse_args(argv, presets) -> argparse.Namespace:
    """train.py's flags, each checked; None where the preset decides."""
    p = Parser(description="Train the entropy model, calibrate its threshold, train BLT (or a byte-level "
               "baseline), and report held-out bits per byte.")
    pos, count = int_at_least(1), int_at_least(0)
    p.add_argument("--data", type=nonempty, default=None,
                   help="a local file (last 10%% is validation), a directory, or a corpus name: shakespeare "
                        "(default), tinyshakespeare, enwik8 (the default of the gpu preset)")
    p.add_argument("--preset", choices=presets, default=None,
                   help="cpu, gpu, small (a small corpus under --time-budget), or smoke (every stage in under a "
                        "minute, for trying flags) (default: gpu if CUDA is available; else small for BLT under "
                        "--time-budget on a small training split, as train.py's defaults say; else cpu)")
    p.add_argument("--stage", choices=("all", "entropy", "calibrate", "blt"), default="all",
                   help="run one stage alone (each reads what the previous one wrote into --out)")
    p.add_argument("--model", choices=("blt", "byte", "bpe"), default="blt",
                   help="byte: a plain byte-level transformer; bpe: a transformer over byte-level BPE tokens")
    p.add_argument("--hash-ngrams", action="store_true",
                   help="--model byte: add BLT's hash n-gram embeddings to the byte embeddings (the preset BLT's "
                        "n-gram sizes, tables and hash; lookups, no FLOPs): a control for what patching adds")
    p.add_argument("--no-hash", action="store_true",
                   help="BLT without hash n-gram embeddings (the same as --config hash_ngram_sizes=[])")
    p.add_argument("--vocab-size", type=int_at_least(257), default=None,
                   help="--model bpe: BPE vocabulary, trained on the training split (default 4096: ~3 bytes per "
                        "token on shakespeare)")
    p.add_argument("--patching", choices=("entropy", "monotonic", "strided", "space", "learned"), default=None,
                   help="the patching scheme (default entropy; the same as --config patching=...); learned: "
                        "boundaries learned end to end (H-Net's dynamic chunking, learned.py)")
    p.add_argument("--patch-size", type=number(at_least=1), default=None,
                   help="target average patch size (entropy schemes), stride (strided, a whole number) or target "
                        "bytes per chunk (learned, above 1)")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model config field (BLTConfig; ByteLMConfig with --model byte; "
                        "tokens.TokenLMConfig with --model bpe)")
    p.add_argument("--out", type=nonempty, default=None, help="output folder (default: out/<corpus>-<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the checkpoints in --out (finished stages are skipped)")
    p.add_argument("--overwrite", action="store_true", help="start over even if --out holds checkpoints")
    p.add_argument("--new-corpus", action="store_true",
                   help="with --resume: continue checkpoints trained on another corpus on --data (the metrics log "
                        "marks the change); without it such a resume is refused")
    p.add_argument("--time-budget", type=number(above=0), default=None, metavar="SECONDS",
                   help="wall-clock budget for the whole command, instead of --steps; the schedules follow the clock")
    p.add_argument("--steps", type=pos, default=None, help="training steps of the main model")
    p.add_argument("--entropy-steps", type=pos, default=None, help="training steps of the entropy model")
    p.add_argument("--batch-size", type=pos, default=None,
                   help="windows per optimizer step of the main model (the global batch, over all processes)")
    p.add_argument("--micro-batch-size", type=pos, default=None,
                   help="windows per forward/backward in one process; the rest of the batch is gradient "
                        "accumulation (default: batch size / processes)")
    p.add_argument("--seq-len", type=pos, default=None,
                   help="bytes per window of the main model; --model bpe reads round(seq_len / bytes per token "
                        "of the training split) tokens, so every model's windows span the same bytes")
    p.add_argument("--lr", type=number(above=0), default=None, help="peak learning rate of the main model")
    p.add_argument("--outer-lr-multiplier", type=number(above=0), default=None,
                   help="--patching learned: the encoder, router and decoder train at --lr x this, the global "
                        "transformer at --lr (H-Net's per-stage multiplier; default 1)")
    p.add_argument("--entropy-lr", type=number(above=0), default=None, help="peak learning rate of the entropy model")
    p.add_argument("--entropy-seq-len", type=pos, default=None, help="bytes per window for the entropy model")
    p.add_argument("--warmup-steps", type=count, default=None, help="warmup steps of the main model")
    p.add_argument("--weight-decay", type=number(at_least=0), default=None,
                   help="AdamW weight decay of the main model (default 0.1)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="autocast dtype (default: bf16 where the device multiplies bf16 natively, else fp16 on a GPU "
                        "(with a gradient scaler), fp32 on a CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--threads", type=THREADS, default=None,
                   help="CPU threads (default: OMP_NUM_THREADS if set, else torch's choice, the physical cores)")
    p.add_argument("--device", type=device_name, default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--eval-interval", type=pos, default=None, help="steps between validation estimates")
    p.add_argument("--eval-bytes", type=pos, default=None, help="validation bytes per periodic estimate")
    p.add_argument("--final-eval-bytes", type=count, default=None, help="bytes of the final evaluation (0: all)")
    p.add_argument("--log-interval", type=pos, default=None, help="steps between logged training losses")
    p.add_argument("--checkpoint-interval", type=pos, default=None,
                   help="save a checkpoint at every evaluation whose step is a multiple of this (default: eval interval)")
    p.add_argument("--calibration-windows", type=pos, default=None, help="training windows used to calibrate")
    p.add_argument("--stop-at", type=pos, default=None, help="save a resumable checkpoint after this step and stop")
    args = p.parse_args(argv)
    check_flags(args)
    return args


def check_flags(args):
    """Flags that contradict each other: refused with both named, never one silently dropped."""
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other")
    if args.new_corpus and not args.resume:
        raise UsageError("--new-corpus continues a checkpoint on another corpus: it needs --resume")
    if args.time_budget is not None and (args.steps or args.entropy_steps):
        raise UsageError(f"--time-budget and --{'steps' if args.steps else 'entropy-steps'} both set how long to "
                         f"train: give one")
    if args.model in ("byte", "bpe"):
        for flag, value in (("--patching", args.patching), ("--patch-size", args.patch_size)):
            if value is not None:
                raise UsageError(f"{flag} sets BLT's patches; --model {args.model} has none")
        if args.stage != "all":
            raise UsageError(f"--stage {args.stage} is a stage of BLT; --model {args.model} trains in one stage")
    if args.hash_ngrams and args.model != "byte":
        raise UsageError(f"--hash-ngrams adds BLT's hash n-grams to --model byte, not to --model {args.model}"
                         + (" (BLT has them already)" if args.model == "blt" else ""))
    if args.no_hash and args.model != "blt":
        raise UsageError(f"--no-hash turns off BLT's hash n-grams; --model {args.model} has none")
    if args.vocab_size is not None and args.model != "bpe":
        raise UsageError(f"--vocab-size is the BPE vocabulary of --model bpe, not of --model {args.model}")


def parse_overrides(pairs: list[str], cls) -> dict:
    """["local_dim=192", "hash_ngram_sizes=[3,4,5]"] -> {"local_dim": 192, ...}, checked against cls's fields.
    Values are JSON (numbers, lists, true, null), anything else a string; the config checks them."""
    known = {f.name for f in fields(cls)}
    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in known:
            raise UsageError(f"--config {pair!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(known))}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        out[key] = value  # a key given twice: the last one counts, as for any repeated flag
    return out


FLAG_OF_KEY = {"patching": "--patching", "patch_size": "--patch-size", "vocab_size": "--vocab-size",
               "hash_ngram_sizes": "--no-hash / --hash-ngrams"}  # flags that set a config field


def model_configs(args, preset: dict, preset_name: str) -> tuple[BLTConfig, object]:
    """The preset's configs of BLT and of the baseline --model trains (ByteLMConfig for byte, TokenLMConfig for
    bpe), with --config and the flags that set a config field applied. A key set by both, with different
    values, is refused naming both; a value the config refuses is named by the flag or --config pair that set it."""
    base = "bpe" if args.model == "bpe" else "byte"
    base_cls = type(preset[base])
    blt_cfg, base_cfg = BLTConfig.from_dict(preset["blt"].to_dict()), base_cls(**asdict(preset[base]))
    overrides = parse_overrides(args.config, BLTConfig if args.model == "blt" else base_cls)
    flags = {key: getattr(args, key) for key in ("patching", "patch_size") if getattr(args, key) is not None}
    if args.model == "bpe" and args.vocab_size is not None:
        flags = {"vocab_size": args.vocab_size}
    if getattr(args, "no_hash", False):
        flags["hash_ngram_sizes"] = []
    if getattr(args, "hash_ngrams", False):  # the preset BLT's tables; --config hash_buckets=... etc. still apply
        hashes = {k: getattr(blt_cfg, k) for k in ("hash_ngram_sizes", "hash_buckets", "hash_functions")}
        flags.update({k: v for k, v in hashes.items() if k not in overrides})
    for key, value in flags.items():
        if key in overrides and overrides[key] != value:
            raise UsageError(f"{FLAG_OF_KEY[key]} {value:{'g' if isinstance(value, float) else ''}} and --config "
                             f"{key}={overrides[key]} disagree: give one")
    if "entropy_threshold" in overrides:
        raise UsageError("--config entropy_threshold: the threshold comes from --stage calibrate, not from a flag")
    try:
        if args.model == "blt":
            blt_cfg = BLTConfig.from_dict({**blt_cfg.to_dict(), **overrides, **flags})
        else:
            base_cfg = base_cls(**{**asdict(base_cfg), **overrides, **flags})
    except ConfigError as e:
        if any(k in overrides for k in e.keys):
            raise UsageError(f"--config {e}") from None
        if len(e.keys) == 1 and e.keys[0] in flags:
            raise UsageError(f"{FLAG_OF_KEY[e.keys[0]]} {flags[e.keys[0]]:g}: {e.allowed}") from None
        raise UsageError(f"preset {preset_name}: {e}") from None
    return blt_cfg, base_cfg


def pick_device(name: str | None, dist) -> torch.device:
    """--device, or the default (cuda if available), checked against this machine."""
    default = (f"cuda:{dist.local_rank}" if dist.enabled else "cuda") if torch.cuda.is_available() else "cpu"
    device = torch.device(name or default)
    if dist.enabled and name and device.type != "cpu":  # checked first: the same answer on any machine
        raise UsageError(f"--device {name}: under torchrun each process takes the GPU of its LOCAL_RANK; drop "
                         f"--device (--device cpu alone is allowed: gloo CPU processes, also on a GPU machine)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available here")
    return device


def check_batches(batches: list[tuple[str, int]], micro_batch_size: int | None, world: int):
    """Each trained model's global batch must split evenly into processes, and each share into micro-batches."""
    for what, batch_size in batches:
        per_rank = batch_size // world
        if batch_size % world or (micro_batch_size and per_rank % micro_batch_size):
            raise UsageError(f"{what} {batch_size} must split evenly into {world} processes"
                             + (f" x micro-batches of {micro_batch_size}" if micro_batch_size else ""))


def check_stop_at(stop_at: int | None, planned_steps: list[int]):
    """--stop-at must fall before the last step of some stage, or it would stop nothing."""
    if stop_at and planned_steps and stop_at >= max(planned_steps):
        raise UsageError(f"--stop-at {stop_at} is not before the last step ({max(planned_steps)}): it would stop "
                         f"nothing")

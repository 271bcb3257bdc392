"""Checkpoints: one format, one writer, one reader, shared by train.py, sample.py and the tools.

A checkpoint is self-sufficient (it rebuilds its model alone) and safe to load: every value is a tensor,
dict, list or primitive, so `torch.load(..., weights_only=True)` reads it and never runs pickled code.

    {"format": 1,
     "kind": "entropy" | "blt" | "byte" | "bpe",
     "config": dict,        # blt: BLTConfig (patching mode, threshold, entropy model sizes included);
                            # entropy / byte: entropy_model.ByteLMConfig; bpe: tokens.TokenLMConfig
     "model": state_dict,   # uncompiled weights; for blt the frozen entropy model is inside
     # bpe only: "tokenizer": str (the tokenizer's JSON), "tokens": {"seq_len" (tokens per window),
     #           "train_bytes_per_token", "tokenizer_sha256"}
     # written by train.py, absent from converted checkpoints (tools/convert.py):
     "train": dict,         # train.TrainConfig: the settings a resumed run must share
     "optimizer": state_dict, "step": int, "steps": int, "done": bool,
     "rng": {"torch", "numpy", "python", "cuda" (where CUDA was in use)}, "data": {"seed", "batches"},   # batches drawn so far
     "scaler": dict,        # --dtype fp16 only: the gradient scaler's scale and growth tracker
     "elapsed": float, "time_budget": float | None, "metrics": dict,    # last evaluation
     "log_records": int}    # records of the metrics log written up to this checkpoint

Writes are atomic: a temporary file in the same folder, fsync, then a rename, so a crash or a kill at any
moment leaves either the old checkpoint or the new one, never half of one. Everything read here is checked
before use: a damaged or foreign file is a CheckpointError, an unreadable or unwritable path (no permission, a
full disk, a file where a folder should be) a StorageError, each one line for the user.
"""
import json
import math
import os
import random
from contextlib import nullcontext, suppress
from pathlib import Path

import numpy as np
import torch

from blt import BLTConfig, build_model as build_blt
from entropy_model import ByteLMConfig
from tokens import TokenLM, TokenLMConfig, TokenSetup

FORMAT = 1
KINDS = ("entropy", "blt", "byte", "bpe")


class CheckpointError(Exception):
    """A missing, damaged, foreign or mismatched checkpoint (or calibration file); one line for the user."""


class StorageError(Exception):
    """A path that cannot be read or written: no permission, no such folder, a full disk, a file where a folder
    is needed. One line naming the path and the operating system's reason."""


def _first_line(e: BaseException) -> str:
    """The gist of an exception's message in one line ("Error(s) in loading state_dict:" takes its next line)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    return " ".join(lines[:2] if lines[0].endswith(":") else lines[:1])[:240]


def os_reason(e: BaseException) -> str:
    """The operating system's reason behind e: torch.save turns a failed write into a RuntimeError whose
    context is the OSError."""
    cause = e
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__context__
    return (cause.strerror or _first_line(cause)) if cause is not None else _first_line(e)


def _atomic_write(path: Path, write):
    """write(binary file) into a temporary file beside path, fsync, then rename it over path. On any failure
    path is left as it was and StorageError says why."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        kept = "; the previous version is unchanged" if path.is_file() else ""
        raise StorageError(f"cannot write {path}: {os_reason(e)}{kept}") from None
    finally:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)


def atomic_save(obj, path: Path):
    """torch.save(obj) to path, atomically (see _atomic_write)."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: Path, text: str):
    _atomic_write(path, lambda f: f.write(text.encode()))


def output_folder(path: Path) -> Path:
    """Create the output folder and check that a file can be written in it: a run fails now, not at its
    first checkpoint."""
    if path.exists() and not path.is_dir():
        raise StorageError(f"cannot use {path} as the output folder: it is a file")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise StorageError(f"cannot write in the output folder {path}: {os_reason(e)}") from None
    return path


def read_checkpoint(path) -> dict:
    """torch.load(weights_only=True) of one of our checkpoints, with one-line errors."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint")
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise StorageError(f"cannot read {path}: {os_reason(e)}") from None
    except Exception as e:  # truncated files, foreign pickles and random bytes all end up here
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated, corrupted or not ours): "
                              f"{_first_line(e)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or ckpt.get("kind") not in KINDS:
        raise CheckpointError(f"{path} is not a BLT checkpoint of this project (format {FORMAT})")
    return ckpt


def build_model(kind: str, config: dict, device: str | torch.device | None = None):
    """(kind, config dict) -> (config object, fresh model). On the meta device nothing is allocated or
    initialised: a checkpoint then supplies every weight (tools/convert.py's BLT-1B has 4.6B parameters)."""
    with torch.device(device) if device is not None else nullcontext():
        if kind == "blt":
            cfg = BLTConfig.from_dict(config)
            return cfg, build_blt(cfg)  # BLT, or learned.LearnedBLT for learned boundaries
        if kind == "bpe":
            cfg = TokenLMConfig.from_dict(config)
            return cfg, TokenLM(cfg)
        cfg = ByteLMConfig(**config)
        return cfg, cfg.build()


def load_checkpoint(path, kinds=KINDS) -> tuple[str, object, torch.nn.Module]:
    """Checkpoint -> (kind, config, float32 model in eval mode on the CPU). kind "blt": BLTConfig and BLT (with its
    entropy model); "entropy" or "byte": ByteLMConfig and EntropyModel; "bpe": TokenLMConfig and TokenLM, with
    model.tokens (tokens.TokenSetup: the tokenizer and window length it was trained with). Raises CheckpointError."""
    ckpt = read_checkpoint(path)
    if ckpt["kind"] not in kinds:
        raise CheckpointError(f"{path} holds {'an' if ckpt['kind'] == 'entropy' else 'a'} {ckpt['kind']} model; "
                              f"this needs {' or '.join(kinds)}")
    try:
        cfg, model = build_model(ckpt["kind"], ckpt["config"], device="meta")
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{path}: its config is not usable: {_first_line(e)}") from None
    try:
        model.load_state_dict(ckpt["model"], assign=True)
    except (TypeError, ValueError, RuntimeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{path}: weights do not fit the config stored with them: {_first_line(e)}") from None
    if any(w.is_floating_point() and w.dtype != torch.float32 for w in model.state_dict().values()):
        model.float()  # stored in bf16 (tools/convert.py --dtype bfloat16): assign=True kept it; run in float32
    if ckpt["kind"] == "bpe":
        try:
            model.tokens = TokenSetup.from_checkpoint(ckpt)
        except Exception as e:  # `tokenizers` raises its own exception type for a malformed JSON
            raise CheckpointError(f"{path}: no usable tokenizer in the checkpoint: {_first_line(e)}") from None
    return ckpt["kind"], cfg, model.eval()


# What train.py reads from its own checkpoints to continue or reuse a run, and the type each must have.
TRAINING_ENTRIES = {"config": dict, "train": dict, "model": dict, "optimizer": dict, "step": int, "steps": int,
                    "done": bool, "rng": dict, "elapsed": (int, float), "time_budget": (int, float, type(None)),
                    "metrics": dict}
FINAL_METRICS = ("val_bpb", "val_bytes", "train_flops_per_byte", "steps", "stage_seconds")  # of a finished stage


def read_training_checkpoint(path) -> dict:
    """read_checkpoint, then every entry train.py needs to continue (or skip) a stage, checked for presence
    and type, so that a damaged file is one line now rather than a traceback later."""
    ckpt = read_checkpoint(path)
    for key, types in TRAINING_ENTRIES.items():
        value = ckpt.get(key)
        if key not in ckpt or not isinstance(value, types) or (types is int and isinstance(value, bool)):
            found = "missing" if key not in ckpt else f"a {type(value).__name__}"
            raise CheckpointError(f"{path} is damaged: its {key!r} entry is {found}; start over with --overwrite")
    if ckpt["step"] < 0 or ckpt["steps"] < 1:
        raise CheckpointError(f"{path} is damaged: step {ckpt['step']} of {ckpt['steps']}; start over with --overwrite")
    missing = [k for k in FINAL_METRICS if not isinstance(ckpt["metrics"].get(k), (int, float))]
    if ckpt["done"] and missing:
        raise CheckpointError(f"{path} is damaged: a finished stage without its final {missing[0]!r}; "
                              f"start over with --overwrite")
    return ckpt


def load_weights(model: torch.nn.Module, weights, path):
    """model.load_state_dict(weights), or CheckpointError if they do not fit."""
    try:
        model.load_state_dict(weights)
    except (TypeError, ValueError, RuntimeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{path}: weights do not fit the model: {_first_line(e)}") from None


def restore(ckpt: dict, path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler=None):
    """Continue a training checkpoint: its weights, optimizer state, gradient scaler (fp16) and random state,
    each checked to fit."""
    load_weights(model, ckpt["model"], path)
    if scaler is not None and scaler.is_enabled():
        try:
            scaler.load_state_dict(ckpt["scaler"])
        except (TypeError, ValueError, RuntimeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{path} is damaged: its gradient scaler state is unusable ({_first_line(e)}); "
                                  f"start over with --overwrite") from None
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:  # load_state_dict does not compare shapes; AdamW would fail later
            for p in group["params"]:
                for name, v in optimizer.state.get(p, {}).items():
                    if torch.is_tensor(v) and v.dim() and v.shape != p.shape:
                        raise ValueError(f"{name} of shape {tuple(v.shape)} for a parameter of shape {tuple(p.shape)}")
    except (TypeError, ValueError, RuntimeError, KeyError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path} is damaged: its optimizer state does not fit the model ({_first_line(e)}); "
                              f"start over with --overwrite") from None
    try:
        set_rng_state(ckpt["rng"])
    except (TypeError, ValueError, RuntimeError, KeyError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path} is damaged: its random state is unusable ({_first_line(e)}); "
                              f"start over with --overwrite") from None


CALIBRATION_ENTRIES = {"scheme": str, "target_patch_size": (int, float), "threshold": (int, float),
                       "max_patch_length": (int, type(None)), "entropy_model": dict}


def read_calibration(path: Path) -> dict:
    """calibration.json, written by train.py's stage 2, with its entries checked."""
    try:
        cal = json.loads(Path(path).read_bytes())
    except OSError as e:
        raise StorageError(f"cannot read {path}: {os_reason(e)}") from None
    except ValueError as e:  # not JSON, not UTF-8
        raise CheckpointError(f"{path} is damaged ({_first_line(e)}); rerun --stage calibrate") from None
    for key, types in CALIBRATION_ENTRIES.items():
        if not isinstance(cal, dict) or not isinstance(cal.get(key), types) or isinstance(cal.get(key), bool):
            raise CheckpointError(f"{path} is damaged: no valid {key!r} entry; rerun --stage calibrate")
    if not math.isfinite(cal["threshold"]):
        raise CheckpointError(f"{path} is damaged: threshold {cal['threshold']}; rerun --stage calibrate")
    return cal


def config_difference(saved: dict, current: dict) -> str | None:
    """The first key whose value differs, as 'key: saved in the checkpoint, current now', or None."""
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            a, b = list(a), list(b)
        if a != b:
            return f"{key}: {a!r} in the checkpoint, {b!r} now"
    return None


def rng_state() -> dict:
    """Every random generator a run draws from, as tensors and lists (weights_only can read them)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
             "python": [py_state[0], list(py_state[1]), py_state[2]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # this process's GPU (each rank has its own)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():  # a CPU run of a GPU checkpoint keeps its own
        torch.cuda.set_rng_state(state["cuda"])

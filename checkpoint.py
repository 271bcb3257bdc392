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
     "rng": {"torch", "numpy", "python"}, "data": {"seed", "batches"},   # batches drawn so far
     "elapsed": float, "time_budget": float | None, "metrics": dict}   # last evaluation

Writes are atomic: a temporary file in the same folder, fsync, then a rename, so a crash or a kill at any
moment leaves either the old checkpoint or the new one, never half of one.
"""
import os
import random
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from blt import BLT, BLTConfig
from entropy_model import ByteLMConfig
from tokens import TokenLM, TokenLMConfig, TokenSetup

FORMAT = 1
KINDS = ("entropy", "blt", "byte", "bpe")


class CheckpointError(Exception):
    """A missing, unreadable or mismatched checkpoint; the message is one line for the user."""


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def atomic_save(obj, path: Path):
    """torch.save to a temporary file beside path, fsync, then rename over path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_checkpoint(path) -> dict:
    """torch.load(weights_only=True) of one of our checkpoints, with one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
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
            return cfg, BLT(cfg)
        if kind == "bpe":
            cfg = TokenLMConfig.from_dict(config)
            return cfg, TokenLM(cfg)
        cfg = ByteLMConfig(**config)
        return cfg, cfg.build()


def load_checkpoint(path, kinds=KINDS) -> tuple[str, object, torch.nn.Module]:
    """Checkpoint -> (kind, config, model in eval mode on the CPU). kind "blt": BLTConfig and BLT (with its
    entropy model); "entropy" or "byte": ByteLMConfig and EntropyModel; "bpe": TokenLMConfig and TokenLM, with
    model.tokens (tokens.TokenSetup: the tokenizer and window length it was trained with). Raises CheckpointError."""
    ckpt = read_checkpoint(path)
    if ckpt["kind"] not in kinds:
        raise CheckpointError(f"{path} holds a {ckpt['kind']} model; this needs {' or '.join(kinds)}")
    try:
        cfg, model = build_model(ckpt["kind"], ckpt["config"], device="meta")
        model.load_state_dict(ckpt["model"], assign=True)
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"{path}: weights do not fit the config stored with them: {_first_line(e)}") from None
    if ckpt["kind"] == "bpe":
        try:
            model.tokens = TokenSetup.from_checkpoint(ckpt)
        except Exception as e:  # `tokenizers` raises its own exception type for a malformed JSON
            raise CheckpointError(f"{path}: no usable tokenizer in the checkpoint: {_first_line(e)}") from None
    return ckpt["kind"], cfg, model.eval()


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
    return {"torch": torch.get_rng_state(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": [py_state[0], list(py_state[1]), py_state[2]]}


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))

"""Held-out bits per byte (paper section 4), with the average patch size and FLOPs per byte (section 4.5).

Every model is scored on the same bytes: the validation split cut into fixed, non-overlapping windows
(data.eval_windows), each starting afresh from BOS, so every byte is predicted exactly once whatever the model
or its patching. Bits per byte = the summed next-byte cross-entropy in nats / (ln 2 * number of bytes).

Shapes: B = batch, T = bytes per window (BOS included), V = 260.
"""
import torch
import torch.nn.functional as F

from blt import bits_per_byte, byte_transformer_flops_per_byte, flops_per_byte
from data import eval_windows
from patching import VOCAB_SIZE
from runtime import DIST, autocast, to_device


@torch.no_grad()
def evaluate(model, kind: str, config, val, seq_len: int, batch_size: int, dtype: str, device: torch.device,
             max_bytes: int | None = None) -> dict:
    """Bits per byte of a "blt" or byte-level ("entropy", "byte") model over val[:max_bytes]. Under torchrun
    each process takes every N-th batch and the sums are added up. BLT is patched by its own (fp32) entropy
    model, outside autocast, as in training. Returns val_bpb, val_bytes, FLOPs per byte and, for BLT, the
    average patch size (and the entropy model's forward FLOPs per byte, counted apart as the paper does)."""
    was_training = model.training
    model.eval()
    nats, n_bytes, positions, patches = 0.0, 0, 0, 0
    for i, (x, y) in enumerate(eval_windows(val, seq_len, batch_size, max_bytes)):
        if i % DIST.world != DIST.rank:
            continue
        x, y = to_device(x, device), to_device(y, device)  # (B, T) each
        lengths = model.patch(x) if kind == "blt" else None  # (B, P)
        with autocast(device, dtype):
            logits = model(x, patch_lengths=lengths) if kind == "blt" else model(x)  # (B, T, V)
        nats += F.cross_entropy(logits.float().reshape(-1, VOCAB_SIZE), y.reshape(-1), reduction="sum").item()
        n_bytes += y.numel()
        if lengths is not None:
            positions, patches = positions + int(lengths.sum()), patches + int((lengths > 0).sum())
    model.train(was_training)
    nats, n_bytes, positions, patches = DIST.sum([nats, n_bytes, positions, patches])
    out = {"val_bpb": bits_per_byte(nats, int(n_bytes)), "val_bytes": int(n_bytes)}
    if kind == "blt":
        out["patch_size"] = positions / patches
        f = flops_per_byte(config, out["patch_size"], seq_len)
        out["entropy_forward_flops_per_byte"] = f["entropy_model_forward"]
    else:
        f = byte_transformer_flops_per_byte(config.dim, config.layers, min(config.window or seq_len, seq_len),
                                            config.multiple_of)
    return {**out, "train_flops_per_byte": f["train_total"], "forward_flops_per_byte": f["forward_total"]}

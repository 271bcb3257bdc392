"""Held-out bits per byte (paper section 4), with the average patch size and FLOPs per byte (section 4.5).

Every model is scored on the same bytes: the validation split cut into fixed, non-overlapping windows
(data.eval_windows), each starting afresh from BOS, so every byte is predicted exactly once whatever the model
or its patching. Bits per byte = the summed next-byte cross-entropy in nats / (ln 2 * number of bytes).

A BPE token model ("bpe", tokens.py) is scored on the same bytes: the same prefix of the validation split,
encoded with the model's own tokenizer; its summed next-token cross-entropy is divided by ln 2 and by the
number of bytes (tokens.evaluate_bpb), and its FLOPs per byte use the bytes per token of those bytes.

Shapes: B = batch, T = bytes per window (BOS included), V = 260.
"""
import torch
import torch.nn.functional as F

from blt import LEARNED, bits_per_byte, byte_transformer_flops_per_byte, flops_per_byte
from data import eval_windows
from patching import VOCAB_SIZE
from runtime import DIST, autocast, full_fp32, to_device
from tokens import evaluate_bpb, token_flops_per_byte


@torch.no_grad()
def evaluate(model, kind: str, config, val, seq_len: int, batch_size: int, dtype: str, device: torch.device,
             max_bytes: int | None = None, tokens=None) -> dict:
    """Bits per byte of a "blt", byte-level ("entropy", "byte") or "bpe" model over val[:max_bytes]. Under
    torchrun each process takes every N-th batch and the sums are added up. BLT is patched by its own (fp32,
    TF32 off) entropy model, outside autocast, as in training. Returns val_bpb, val_bytes, FLOPs per byte and,
    for BLT, the average patch size (and the entropy model's forward FLOPs per byte, counted apart as the paper
    does); with learned boundaries (learned.py) the realised bytes per chunk is the patch size.
    "bpe" needs tokens (tokens.TokenSetup) and ignores seq_len (its windows are tokens.seq_len tokens)."""
    if kind == "bpe":
        return evaluate_token_model(model, config, val, tokens, batch_size, dtype, device, max_bytes)
    learned = kind == "blt" and model.cfg.patching == LEARNED
    was_training = model.training
    model.eval()
    nats, n_bytes, positions, patches = 0.0, 0, 0, 0
    for i, (x, y) in enumerate(eval_windows(val, seq_len, batch_size, max_bytes)):
        if i % DIST.world != DIST.rank:
            continue
        x, y = to_device(x, device), to_device(y, device)  # (B, T) each
        patched = kind == "blt" and not learned  # learned boundaries come out of the model's own forward
        with full_fp32():  # TF32 off, as in training and sampling
            lengths = model.patch(x) if patched else None  # (B, P)
        with autocast(device, dtype):
            logits = model(x, patch_lengths=lengths) if patched else model(x)  # (B, T, V)
        # the sums stay on the device until the end: no host sync per batch
        nats = nats + F.cross_entropy(logits.float().reshape(-1, VOCAB_SIZE), y.reshape(-1), reduction="sum").double()
        n_bytes += y.numel()
        if lengths is not None:
            positions, patches = positions + lengths.sum(), patches + (lengths > 0).sum()
        if learned:  # bytes per chunk: input positions (BOS included) per chunk
            positions, patches = positions + model.stats["bytes"], patches + model.stats["chunks"]
    model.train(was_training)
    nats, n_bytes, positions, patches = DIST.sum([float(nats), n_bytes, int(positions), int(patches)])
    out = {"val_bpb": bits_per_byte(nats, int(n_bytes)), "val_bytes": int(n_bytes)}
    if kind == "blt":
        out["patch_size"] = positions / patches
        f = flops_per_byte(config, out["patch_size"], seq_len)
        out["entropy_forward_flops_per_byte"] = f["entropy_model_forward"]
        out["forward_flops_per_byte_with_entropy"] = f["forward_total_with_entropy"]
        out["train_flops_per_byte_with_entropy"] = f["train_total_with_entropy"]
    else:
        f = byte_transformer_flops_per_byte(config.dim, config.layers, min(config.window or seq_len, seq_len),
                                            config.multiple_of)
    return {**out, "train_flops_per_byte": f["train_total"], "forward_flops_per_byte": f["forward_total"]}


@torch.no_grad()
def evaluate_token_model(model, config, val, tokens, batch_size: int, dtype: str, device: torch.device,
                         max_bytes: int | None) -> dict:
    """The "bpe" case of evaluate: the same bytes, encoded. Every process evaluates all of them (the token
    windows are few), so the result is the same on every rank."""
    split = tokens.split(val, max_bytes)
    with autocast(device, dtype):
        out = evaluate_bpb(model, split, tokens.seq_len, batch_size, device)
    bytes_per_token = split.n_bytes / max(1, split.n_tokens)  # the token model's "patch size"
    f = token_flops_per_byte(config, bytes_per_token, tokens.seq_len)
    return {"val_bpb": out["bpb"], "val_bytes": split.n_bytes, "bytes_per_token": bytes_per_token,
            "train_bytes_per_token": tokens.train_bytes_per_token,  # the tokenizer packs its own text tighter
            "train_flops_per_byte": f["train_total"], "forward_flops_per_byte": f["forward_total"]}

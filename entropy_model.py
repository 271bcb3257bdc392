"""The entropy model (paper section 2.3): a small causal byte-level language model p_e.

It is trained on the same bytes as BLT, separately, then frozen. Its only job in BLT is to say how unsure it
is about the next byte:

    H(x_i) = - sum_{v in V} p_e(x_i = v | x_<i) * log p_e(x_i = v | x_<i)          (paper eq. 3)

in nats, over all 260 ids. A patch starts where this entropy is high (patching.py). Entropy at position j is
computed from bytes <= j and predicts byte j+1, so patch boundaries never depend on future bytes.

The architecture is the same Llama-style stack as the rest of BLT (layers.py) with an optional sliding
window: the paper's entropy model has 100M parameters, 14 layers, width 512 and a 512-byte window; paper
figure 8 shows that much smaller models with short context still patch sensibly, which is what the CPU
presets use.

Shapes: B = batch, T = bytes, D = width, V = 260.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from encoder import hash_ngram_ids
from layers import KVCache, RMSNorm, TransformerBlock, causal_mask, compute_dtype, rope_cos_sin, swiglu_hidden_dim
from patching import VOCAB_SIZE

HASH_INIT_STD = 0.02  # the byte model's hash n-gram tables (a control only): blt.init_weights' std


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of softmax(logits) over the last axis. (..., V) -> (...)."""
    # --- solution: lesson 1: entropy of softmax(logits) in nats (paper §2.3, eq. 3) ---
    p = F.softmax(logits.float(), dim=-1)
    return -torch.special.xlogy(p, p).sum(dim=-1)  # xlogy takes 0 log 0 = 0, so masked (-inf) classes add nothing
    # --- end solution ---


class ConfigError(ValueError):
    """A model config value the model cannot be built or trained with. The message names the keys, their
    values and what is allowed; `keys` lets the command line say which flag or --config pair set them."""

    def __init__(self, config, keys: tuple[str, ...], allowed: str):
        self.keys, self.allowed = keys, allowed
        super().__init__(", ".join(f"{k}={getattr(config, k)!r}" for k in keys) + f": {allowed}")


def whole(value, minimum: int = 1) -> bool:
    """An int (not a bool) >= minimum."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def real(value, above: float = -math.inf) -> bool:
    """A finite int or float (not a bool) > above."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > above


def check(config, key: str, ok: bool, allowed: str):
    if not ok:
        raise ConfigError(config, (key,), allowed)


def check_heads(config, dim_key: str, heads_key: str):
    """Attention splits the width into heads, and RoPE rotates channel pairs: each head's width must be even."""
    dim, heads = getattr(config, dim_key), getattr(config, heads_key)
    if dim % heads or dim // heads % 2:
        raise ConfigError(config, (dim_key, heads_key), f"each head's width {dim_key} / {heads_key} must be a whole "
                          f"even number (RoPE rotates pairs of channels)")


def check_transformer(cfg):
    """Refuse values a plain transformer config (dim, layers, heads, window, ...) cannot be built or trained
    with: ConfigError, one line. Shared by ByteLMConfig and tokens.TokenLMConfig."""
    for key in ("dim", "layers", "heads", "multiple_of"):
        check(cfg, key, whole(getattr(cfg, key)), "must be a whole number >= 1")
    check_heads(cfg, "dim", "heads")
    check(cfg, "window", cfg.window is None or whole(cfg.window), "must be null (no window) or a whole number >= 1")
    for key in ("rope_theta", "norm_eps"):
        check(cfg, key, real(getattr(cfg, key), above=0), "must be a number > 0")
    check(cfg, "dropout", real(cfg.dropout) and 0 <= cfg.dropout < 1, "must be a number in [0, 1)")


@dataclass
class ByteLMConfig:
    """A plain causal byte transformer: the entropy model, or the byte-level baseline train.py compares with."""
    dim: int = 256
    layers: int = 4
    heads: int = 4
    window: int | None = None  # sliding attention window in bytes; None = the whole sequence
    rope_theta: float = 10000.0
    multiple_of: int = 256  # SwiGLU hidden width rounding
    norm_eps: float = 1e-5
    dropout: float = 0.0  # training only (the byte baseline, to match a BLT trained with dropout)
    # A control, not part of the paper's baseline: BLT's hash n-gram embeddings (paper section 3.2.1) added to
    # the byte embeddings, the same sizes, tables and hash as encoder.LocalEncoder.embed; lookups, no FLOPs.
    # () = none (the entropy model and the plain byte baseline).
    hash_ngram_sizes: tuple[int, ...] = ()
    hash_buckets: int = 4096
    hash_functions: int = 1

    def __post_init__(self):
        check_transformer(self)
        check(self, "hash_ngram_sizes", isinstance(self.hash_ngram_sizes, (list, tuple))
              and all(whole(n) for n in self.hash_ngram_sizes), "must be a list of whole numbers >= 1, e.g. [3,4,5]")
        self.hash_ngram_sizes = tuple(self.hash_ngram_sizes)
        for key in ("hash_buckets", "hash_functions"):
            check(self, key, whole(getattr(self, key)), "must be a whole number >= 1")

    def to_dict(self) -> dict:
        """The fields, without the hash ones when there are no hash tables: a plain byte model or entropy
        model is stored (and compared on --resume and calibration) exactly as before they existed."""
        d = asdict(self)
        if not self.hash_ngram_sizes:
            for key in ("hash_ngram_sizes", "hash_buckets", "hash_functions"):
                del d[key]
        return d

    @classmethod
    def of_blt(cls, cfg) -> "ByteLMConfig":
        """The entropy model of a BLTConfig (its entropy_* fields): the one mapping between the two."""
        return cls(cfg.entropy_dim, cfg.entropy_layers, cfg.entropy_heads, cfg.entropy_window,
                   cfg.entropy_rope_theta, cfg.multiple_of, cfg.norm_eps)

    def build(self) -> "EntropyModel":
        return EntropyModel(self.dim, self.layers, self.heads, self.window, self.rope_theta, self.multiple_of,
                            self.norm_eps, self.dropout, self.hash_ngram_sizes, self.hash_buckets, self.hash_functions)


class EntropyModel(nn.Module):
    """Causal byte LM. forward(tokens) -> logits (B, T, V); entropies(tokens) -> (B, T) nats."""

    def __init__(self, dim: int, n_layers: int, n_heads: int, window: int | None = None,
                 rope_theta: float = 10000.0, multiple_of: int = 256, eps: float = 1e-5, dropout: float = 0.0,
                 hash_ngram_sizes: tuple[int, ...] = (), hash_buckets: int = 4096, hash_functions: int = 1):
        super().__init__()
        self.window, self.rope_theta, self.head_dim = window, rope_theta, dim // n_heads
        self.tok_embeddings = nn.Embedding(VOCAB_SIZE, dim)
        # the attribute names of encoder.LocalEncoder, so that incremental.NewestByteEmbedding serves both
        self.hash_sizes, self.hash_buckets, self.hash_functions = tuple(hash_ngram_sizes), hash_buckets, hash_functions
        # one table per (hash function, n), in LocalEncoder's order, initialised as BLT's are (blt.init_weights,
        # Normal(0, 0.02)): at nn.Embedding's Normal(0, 1) the tables start as noise several times the byte
        # embedding, and at the learning rate BLT's tables learn with, Adam moves them too little to unlearn it
        self.hash_embeddings = nn.ModuleList(
            nn.Embedding(hash_buckets, dim) for _ in range(hash_functions * len(self.hash_sizes)))
        for table in self.hash_embeddings:
            nn.init.normal_(table.weight, mean=0.0, std=HASH_INIT_STD)
        hidden = swiglu_hidden_dim(dim, multiple_of)
        self.layers = nn.ModuleList(TransformerBlock(dim, n_heads, hidden, eps, dropout, window=window)
                                    for _ in range(n_layers))
        self.norm = RMSNorm(dim, eps)
        self.output = nn.Linear(dim, VOCAB_SIZE, bias=False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                caches: list[KVCache] | None = None, start_pos: int = 0):
        """tokens: (B, T) ids -> logits (B, T, V), plus the mean cross-entropy if targets (B, T) are given.

        With caches (one KVCache per layer), tokens are the next T positions after start_pos cached ones.
        """
        B, T = tokens.shape
        pos = torch.arange(start_pos, start_pos + T, device=tokens.device)  # (T,)
        cos, sin = rope_cos_sin(pos, self.head_dim, self.rope_theta, compute_dtype(self.output.weight))  # (T, Dh)
        # --- solution: lesson 1: causal sliding-window mask (paper §2.3, §2.4) ---
        mask = None if caches else causal_mask(pos, pos, self.window)  # (1, 1, T, T)
        # --- end solution ---
        h = self.embed(tokens)  # (B, T, D)
        for i, layer in enumerate(self.layers):
            h = layer(h, mask, cos, sin, caches[i] if caches else None, pos)
        logits = self.output(self.norm(h))  # (B, T, V)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, VOCAB_SIZE), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def hash_ids(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """(B, T) ids -> the row of every hash table at every position, [(B, T)] in table order: the ids
        encoder.LocalEncoder.embed looks up, from the same function (encoder.hash_ngram_ids)."""
        return [hash_ngram_ids(tokens, n, self.hash_buckets, f)
                for f in range(self.hash_functions) for n in self.hash_sizes]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, D): the byte embedding, plus the hash n-gram embeddings if there are tables
        (no division by the number of tables, as encoder.LocalEncoder.embed)."""
        h = self.tok_embeddings(tokens)
        for table, ids in zip(self.hash_embeddings, self.hash_ids(tokens) if self.hash_sizes else []):
            h = h + table(ids)
        return h

    def new_caches(self) -> list[KVCache]:
        return [KVCache(self.window) for _ in self.layers]

    @torch.no_grad()
    def entropies(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T) next-byte entropies in nats: entry j is the uncertainty about byte j+1."""
        return entropy_from_logits(self.forward(tokens))

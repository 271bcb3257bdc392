"""The whole Byte Latent Transformer (paper section 3, figure 2), its config, presets and FLOPs per byte.

    bytes -> patch boundaries (patching.py, entropy_model.py)
          -> local encoder: byte states and one representation per patch (encoder.py)
          -> global latent transformer over patches (global_transformer.py)
          -> local decoder: next-byte logits, reading the previous complete patch (decoder.py)

Token ids follow the released models: byte + 4, pad 0, BOS 1, EOS 2, vocabulary 260 (patching.tokenize).

Shapes: B = batch, T = bytes (incl. BOS), P = patches, V = 260.
"""
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from decoder import LocalDecoder, decoder_patch_ids
from encoder import LocalEncoder
from entropy_model import ByteLMConfig, check, check_heads, real, whole
from global_transformer import GlobalTransformer
from layers import swiglu_hidden_dim
from patching import VOCAB_SIZE, patch_lengths as compute_patch_lengths

SCHEMES = ("strided", "space", "entropy", "monotonic")  # BLT's patchers
LEARNED = "learned"  # H-Net's dynamic chunking: the model learns its boundaries (learned.py)


@dataclass
class BLTConfig:
    # patching (section 2)
    patching: str = "entropy"  # strided | space | entropy | monotonic | learned
    patch_size: float = 4.0  # strided: k; entropy schemes: the calibration target (average bytes per patch);
    #                          learned: N, the ratio loss's target bytes per chunk
    entropy_threshold: float | None = None  # theta_g or theta_r in nats, set by calibration (patching.py)
    max_patch_length: int | None = None
    # entropy model (section 2.3), a separate small byte LM
    entropy_dim: int = 64
    entropy_layers: int = 2
    entropy_heads: int = 2
    entropy_window: int | None = 64  # sliding attention window in bytes
    entropy_rope_theta: float = 10000.0
    # local encoder and decoder (sections 3.2, 3.3); the released code gives both the same width
    local_dim: int = 128
    local_heads: int = 4
    encoder_layers: int = 1
    decoder_layers: int = 2
    local_window: int | None = 512  # sliding attention window in bytes
    hash_ngram_sizes: tuple[int, ...] = (3, 4, 5, 6, 7, 8)  # () turns hash n-gram embeddings off
    hash_buckets: int = 4096  # rows per hash table (500002 in the released models)
    hash_functions: int = 1
    cross_attn_k: int = 2  # query vectors per patch: global input width is k * local_dim
    cross_attn_all_layers_decoder: bool = True  # cross-attention before every decoder layer, as released
    # global latent transformer (section 3.1)
    global_dim: int = 256
    global_layers: int = 4
    global_heads: int = 4
    rope_theta: float = 500000.0  # local and global models, as released
    # shared
    multiple_of: int = 256  # SwiGLU hidden width rounding (Llama convention)
    norm_eps: float = 1e-5
    ratio_loss_weight: float | None = None  # learned: alpha of the ratio loss (None: H-Net's 0.03)
    dropout: float = 0.0  # training only: local embeddings and every residual branch of the encoder, global
    #                       model and decoder (0 as released; a corpus of a few MB is seen many times and needs it)

    def __post_init__(self):
        """Refuse values the model cannot be built, patched or trained with: ConfigError (a ValueError) naming
        the key, the value and what is allowed. The one place these are checked, for flags and checkpoints."""
        check(self, "patching", self.patching in SCHEMES + (LEARNED,),
              f"unknown patching scheme; choose one of {', '.join(SCHEMES + (LEARNED,))}")
        check(self, "patch_size", real(self.patch_size) and self.patch_size >= 1, "must be a number >= 1")
        if self.patching == LEARNED:
            check(self, "patch_size", self.patch_size > 1, "learned boundaries need a target above 1 byte per chunk")
            check(self, "max_patch_length", self.max_patch_length is None, "learned boundaries have no maximum: null")
        check(self, "ratio_loss_weight", self.ratio_loss_weight is None or real(self.ratio_loss_weight)
              and self.ratio_loss_weight >= 0, "must be null (0.03) or a number >= 0")
        if self.patching == "strided":
            check(self, "patch_size", float(self.patch_size).is_integer(), "strided patching needs a whole stride")
        check(self, "max_patch_length", self.max_patch_length is None or whole(self.max_patch_length),
              "must be null (no limit) or a whole number >= 1")
        if self.max_patch_length is not None and self.patching != "space":
            check(self, "max_patch_length", self.max_patch_length >= self.patch_size,
                  f"must be at least patch_size {self.patch_size:g}, or no patch could reach the target size")
        check(self, "entropy_threshold", self.entropy_threshold is None or real(self.entropy_threshold),
              "must be null (not calibrated yet) or a finite number")
        for key in ("entropy_dim", "entropy_layers", "entropy_heads", "local_dim", "local_heads", "encoder_layers",
                    "decoder_layers", "hash_buckets", "hash_functions", "cross_attn_k", "global_dim",
                    "global_layers", "global_heads", "multiple_of"):
            check(self, key, whole(getattr(self, key)), "must be a whole number >= 1")
        for dim, heads in (("entropy_dim", "entropy_heads"), ("local_dim", "local_heads"), ("global_dim", "global_heads")):
            check_heads(self, dim, heads)
        for key in ("entropy_window", "local_window"):
            check(self, key, getattr(self, key) is None or whole(getattr(self, key)),
                  "must be null (no window) or a whole number >= 1")
        check(self, "hash_ngram_sizes", isinstance(self.hash_ngram_sizes, (list, tuple))
              and all(whole(n) for n in self.hash_ngram_sizes), "must be a list of whole numbers >= 1, e.g. [3,4,5]")
        self.hash_ngram_sizes = tuple(self.hash_ngram_sizes)
        check(self, "cross_attn_all_layers_decoder", isinstance(self.cross_attn_all_layers_decoder, bool),
              "must be true or false")
        for key in ("entropy_rope_theta", "rope_theta", "norm_eps"):
            check(self, key, real(getattr(self, key), above=0), "must be a number > 0")
        check(self, "dropout", real(self.dropout) and 0 <= self.dropout < 1, "must be a number in [0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BLTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"config has unknown fields {sorted(unknown)}")
        return cls(**d)


# ---- presets: plain functions returning a config ----

def cpu_tiny(**overrides) -> BLTConfig:
    """Trains in minutes on a 2-core CPU: ~3M parameters outside the hash tables."""
    base = dict(entropy_dim=64, entropy_layers=2, entropy_heads=2, entropy_window=64, local_dim=128,
                local_heads=4, encoder_layers=1, decoder_layers=2, local_window=128, hash_buckets=4096,
                global_dim=256, global_layers=4, global_heads=4, multiple_of=32)
    return BLTConfig(**{**base, **overrides})


def one_gpu(**overrides) -> BLTConfig:
    """About an hour on one modern GPU: a ~100M-parameter global model."""
    base = dict(entropy_dim=256, entropy_layers=6, entropy_heads=4, entropy_window=256, local_dim=512,
                local_heads=8, encoder_layers=1, decoder_layers=4, local_window=512, hash_buckets=50002,
                global_dim=768, global_layers=12, global_heads=12)
    return BLTConfig(**{**base, **overrides})


def blt_1b(**overrides) -> BLTConfig:
    """The released BLT-1B shape (paper table 10), for reference and FLOP counting; too big for a CPU."""
    base = dict(entropy_dim=768, entropy_layers=14, entropy_heads=12, entropy_window=512, local_dim=1024,
                local_heads=16, encoder_layers=1, decoder_layers=9, local_window=512, hash_buckets=500002,
                global_dim=2048, global_layers=25, global_heads=16, cross_attn_k=2)
    return BLTConfig(**{**base, **overrides})


def build_model(cfg: BLTConfig) -> nn.Module:
    """BLT for a patching scheme, or learned.LearnedBLT (H-Net's dynamic chunking) for learned boundaries."""
    if cfg.patching == LEARNED:
        from learned import LearnedBLT  # learned.py builds on this file's init_weights
        return LearnedBLT(cfg)
    return BLT(cfg)


class BLT(nn.Module):
    def __init__(self, cfg: BLTConfig):
        super().__init__()
        if cfg.patching == LEARNED:
            raise ValueError("learned boundaries are a model of their own: build it with blt.build_model")
        self.cfg = cfg
        # The entropy model is trained separately (train.py stage 1) and frozen; it lives here so that one
        # checkpoint holds everything needed to patch and generate.
        self.entropy_model = ByteLMConfig.of_blt(cfg).build() if cfg.patching in ("entropy", "monotonic") else None
        self.encoder = LocalEncoder(cfg)
        self.global_transformer = GlobalTransformer(cfg)
        self.decoder = LocalDecoder(cfg)
        self.apply(init_weights)
        if self.entropy_model is not None:
            self.entropy_model.requires_grad_(False)

    @torch.no_grad()
    def patch(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> patch lengths (B, P) summing to T + 1 per row (the next-byte slot)."""
        cfg = self.cfg
        entropies = None
        if self.entropy_model is not None:
            if cfg.entropy_threshold is None:
                raise ValueError("entropy patching needs a threshold: calibrate it first (train.py stage 2)")
            entropies = self.entropy_model.entropies(tokens)  # (B, T) nats
        return compute_patch_lengths(tokens, cfg.patching, patch_size=int(cfg.patch_size), entropies=entropies,
                                     threshold=cfg.entropy_threshold, max_patch_length=cfg.max_patch_length)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                patch_lengths: torch.Tensor | None = None):
        """tokens: (B, T) ids; targets: (B, T) next ids or -1 to ignore; patch_lengths: (B, P) or None to
        patch here. Returns logits (B, T, V), plus the mean cross-entropy in nats if targets are given."""
        T = tokens.shape[1]
        if patch_lengths is None:
            patch_lengths = self.patch(tokens)
        h, patches = self.encoder(tokens, patch_lengths)  # (B, T, D_E), (B, P, k*D_E)
        # real patches: up to each row's last non-empty one (rows are right-padded to the longest)
        real = (patch_lengths > 0).flip(1).cummax(dim=1).values.flip(1)  # (B, P)
        global_out = self.global_transformer(patches, real=real)  # (B, P, D_G), 0 at the padding
        positions = torch.arange(T, device=tokens.device)
        logits = self.decoder(h, global_out, decoder_patch_ids(patch_lengths, T), positions)  # (B, T, V)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, VOCAB_SIZE), targets.reshape(-1), ignore_index=-1)
        return logits, loss


def init_weights(module: nn.Module, std: float = 0.02):
    """Normal(0, 0.02) for linear and embedding weights (GPT-2 / nanoGPT convention); norms start at 1."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)


def count_parameters(model: nn.Module) -> dict:
    """Parameters by part; hash tables are counted apart (they cost memory, not FLOPs)."""
    def n(m):
        return sum(p.numel() for p in m.parameters()) if m is not None else 0
    counts = {"entropy_model": n(getattr(model, "entropy_model", None))}
    if isinstance(model, BLT):
        hashes = n(model.encoder.hash_embeddings)
        counts.update(encoder=n(model.encoder) - hashes, hash_embeddings=hashes,
                      global_transformer=n(model.global_transformer), decoder=n(model.decoder))
    elif getattr(getattr(model, "cfg", None), "patching", None) == LEARNED:  # router and residual: the encoder's
        hashes = n(model.encoder.hash_embeddings)
        counts.update(encoder=n(model.encoder) - hashes + n(model.chunking), hash_embeddings=hashes,
                      global_transformer=n(model.global_transformer) + n(model.global_output), decoder=n(model.decoder))
    else:
        counts = {"model": n(model)}
    return counts


# ---- FLOPs per byte (paper section 4.5, eqs. 13-17; appendix B) ----
# Chinchilla-style counting: 2 FLOPs per multiply-add, embeddings are free lookups, attention over a context
# of m keys costs 2 * 2 * h * m per query (scores and weighted sum), backward = 2 x forward.
#
# The attention convention, one for every model (BLT's global, local and entropy models here, the plain byte
# transformer below, the BPE transformer in tokens.token_flops_per_byte): each query is charged its FULL window
# m = min(sliding window, training window), in that model's own steps (bytes, patches or tokens), as paper
# eq. 14 writes it with m = n_ctx; not the causal average (about m / 2) that a causal mask actually computes.
# The convention inflates every model's attention term alike (by 2x); it is small beside the matmuls here.

def transformer_flops(h: int, layers: int, context: float, vocab: int = 0, ffn_hidden: int | None = None) -> float:
    """Forward FLOPs per position of a transformer stack (paper eq. 14): feed-forward + QKVO + attention +
    de-embedding. ffn_hidden is the SwiGLU width (three matrices); 8h/3 makes it equal the paper's 4h MLP."""
    ffn_hidden = ffn_hidden if ffn_hidden is not None else 8 * h / 3
    feed_forward = 2 * 3 * h * ffn_hidden * layers
    qkvo = 2 * 4 * h * h * layers
    attention = 2 * 2 * h * context * layers
    de_embedding = 2 * h * vocab
    return feed_forward + qkvo + attention + de_embedding


def cross_attention_flops(h: int, layers: int, queries_per_byte: float, keys_per_byte: float, keys_per_query: float) -> float:
    """Forward FLOPs per byte of cross-attention (paper eq. 17): Q and O projections on the queries, K and V
    projections on the keys/values, and attention over keys_per_query keys."""
    qo = 2 * 2 * h * h * queries_per_byte
    kv = 2 * 2 * h * h * keys_per_byte
    attention = 2 * 2 * h * keys_per_query * queries_per_byte
    return layers * (qo + kv + attention)


def flops_per_byte(cfg: BLTConfig, patch_size: float, seq_len: int = 512) -> dict:
    """Forward and training FLOPs per byte by component, for any config and average patch size n_p.

    FL_BLT = Transf(h_G, l_G, m = n_ctx / n_p) / n_p + Transf(h_E, l_E, m = w_E)
             + Transf(h_D, l_D, m = w_D, V) + CrossAttn(encoder) + CrossAttn(decoder)          (paper eq. 13)
    "projections" (patch -> k vectors, k*h_E -> h_G, h_G -> k vectors) are left out of eq. 13; they are
    counted here on their own line. The entropy model is reported apart and not in forward_total / train_total
    (the paper counts it separately); the *_with_entropy totals add it: its forward pass over every byte, at
    inference (patching) and in training (every training batch is patched by it, frozen: forward only). Its
    own training is a fixed cost, not per byte: entropy_training_flops.
    """
    if cfg.patching == LEARNED:
        return learned_flops_per_byte(cfg, patch_size, seq_len)
    n_p, k = patch_size, cfg.cross_attn_k
    h_E = h_D = cfg.local_dim
    w_local = min(cfg.local_window or seq_len, seq_len)
    ffn = lambda d: swiglu_hidden_dim(d, cfg.multiple_of)  # noqa: E731
    forward = {
        "global": transformer_flops(cfg.global_dim, cfg.global_layers, seq_len / n_p, 0, ffn(cfg.global_dim)) / n_p,
        "encoder": transformer_flops(h_E, cfg.encoder_layers, w_local, 0, ffn(h_E)),
        "decoder": transformer_flops(h_D, cfg.decoder_layers, w_local, VOCAB_SIZE, ffn(h_D)),
        # encoder: k queries per patch, each attends to the n_p bytes of its patch; keys are all bytes
        "encoder_cross_attention": cross_attention_flops(h_E, 1, k / n_p, 1.0, n_p),
        # decoder: every byte queries the k slots of one patch; k key/value slots per patch
        "decoder_cross_attention": cross_attention_flops(
            h_D, cfg.decoder_layers if cfg.cross_attn_all_layers_decoder else 1, 1.0, k / n_p, k),
        "projections": 2 * (h_E * k * h_E + (k * h_E * cfg.global_dim if k * h_E != cfg.global_dim else 0)
                            + cfg.global_dim * k * h_D) / n_p,
    }
    total = sum(forward.values())
    w_entropy = min(cfg.entropy_window or seq_len, seq_len)
    entropy = transformer_flops(cfg.entropy_dim, cfg.entropy_layers, w_entropy, VOCAB_SIZE, ffn(cfg.entropy_dim))
    entropy = entropy if cfg.patching in ("entropy", "monotonic") else 0.0
    return {"forward": forward, "forward_total": total, "train_total": 3 * total, "entropy_model_forward": entropy,
            "forward_total_with_entropy": total + entropy, "train_total_with_entropy": 3 * total + entropy}


def entropy_training_flops(cfg: BLTConfig, bytes_seen: float, seq_len: int) -> float:
    """FLOPs of training BLT's entropy model on bytes_seen bytes in windows of seq_len (3 x its forward per
    byte); 0 for patching schemes without one. A fixed cost paid once, before any BLT trains."""
    if cfg.patching not in ("entropy", "monotonic"):
        return 0.0
    w = min(cfg.entropy_window or seq_len, seq_len)
    ffn = swiglu_hidden_dim(cfg.entropy_dim, cfg.multiple_of)
    return 3 * transformer_flops(cfg.entropy_dim, cfg.entropy_layers, w, VOCAB_SIZE, ffn) * bytes_seen


def blt_training_flops(cfg: BLTConfig, patch_size: float, seq_len: int, bytes_seen: float,
                       entropy_bytes_seen: float = 0.0, entropy_seq_len: int | None = None) -> dict:
    """A BLT run's whole training compute, with and without its entropy model: bytes_seen x train_total
    (without), plus the entropy model's forward over every training byte and its own training on
    entropy_bytes_seen bytes (with)."""
    f = flops_per_byte(cfg, patch_size, seq_len)
    without = bytes_seen * f["train_total"]
    entropy = bytes_seen * f["entropy_model_forward"] + entropy_training_flops(cfg, entropy_bytes_seen,
                                                                                entropy_seq_len or seq_len)
    return {"without_entropy": without, "with_entropy": without + entropy, "entropy": entropy}


def learned_flops_per_byte(cfg: BLTConfig, bytes_per_chunk: float, seq_len: int = 512) -> dict:
    """flops_per_byte for learned boundaries (learned.py), n_p = the realised bytes per chunk: the same global,
    encoder and decoder stacks; no cross-attention; instead the router (W_q, W_k on every byte), the
    residual projection (every byte), and the projections D_E -> D_G -> D_E (once per chunk). The smoothing
    and the cosines are a few operations per width and left out, as norms are."""
    n_p, h_E, D_G = bytes_per_chunk, cfg.local_dim, cfg.global_dim
    w_local = min(cfg.local_window or seq_len, seq_len)
    ffn = lambda d: swiglu_hidden_dim(d, cfg.multiple_of)  # noqa: E731
    forward = {
        "global": transformer_flops(D_G, cfg.global_layers, seq_len / n_p, 0, ffn(D_G)) / n_p,
        "encoder": transformer_flops(h_E, cfg.encoder_layers, w_local, 0, ffn(h_E)),
        "decoder": transformer_flops(h_E, cfg.decoder_layers, w_local, VOCAB_SIZE, ffn(h_E)),
        "router": 2 * 2 * h_E * h_E,
        "residual": 2 * h_E * h_E,
        "projections": 2 * ((h_E * D_G if h_E != D_G else 0) + D_G * h_E) / n_p,
    }
    total = sum(forward.values())
    return {"forward": forward, "forward_total": total, "train_total": 3 * total, "entropy_model_forward": 0.0,
            "forward_total_with_entropy": total, "train_total_with_entropy": 3 * total}  # no entropy model


def byte_transformer_flops_per_byte(dim: int, layers: int, context: int, multiple_of: int = 256) -> dict:
    """The same accounting for a plain byte-level transformer (no patches): one step per byte."""
    fwd = transformer_flops(dim, layers, context, VOCAB_SIZE, swiglu_hidden_dim(dim, multiple_of))
    return {"forward_total": fwd, "train_total": 3 * fwd}


def bits_per_byte(nats_sum: float, n_bytes: int) -> float:
    """Sum of cross-entropies in nats over n predicted bytes -> bits per byte."""
    # --- solution: lesson 7: summed nats to bits per byte (paper §4) ---
    return nats_sum / (math.log(2) * n_bytes)
    # --- end solution ---

"""Convert released BLT weights to this project's checkpoints, and back.

Three formats meet here:

  ours     BLT (blt.py) state dict + BLTConfig. Names follow Meta's code: encoder.layers.0.attention.wq, ...
  HF       the Hugging Face `transformers` port (BltForCausalLM): model.local_encoder.layers.0.self_attn.q_proj,
           one fused hash table, lm_head, the entropy model as model.patcher. Checkpoints saved with
           transformers (config.json with encoder_config / decoder_config / global_config / patcher_config).
  Meta     the original release (facebook/blt-1b, facebook/blt-7b): config.json {"args": {...}},
           model.safetensors, and the entropy model in entropy_model/{params.json, consolidated.pth}
           (facebook/blt-entropy holds the same entropy model on its own).

    hf_to_ours(hf_state_dict, hf_config) -> (BLTConfig, state_dict)
    ours_to_hf(cfg, state_dict)          -> (config dict for transformers.BltConfig(**d), hf_state_dict)
    meta_to_hf(args, entropy_params, state_dict, entropy_state_dict) -> (hf config dict, hf_state_dict)

    python tools/convert.py DOWNLOADED_FOLDER OUT.pt [--entropy-dir DIR] [--dtype float32|bfloat16|keep]

The CLI reads either a transformers folder or a Meta folder (detected from config.json) and writes the
checkpoint format of train.py / sample.py: {"format": 1, "kind": "blt", "config": BLTConfig.to_dict(),
"model": state_dict, "step": 0, "source": ...}. It needs torch only; `safetensors` (installed with
transformers) reads .safetensors files.

Mapping, in short (HF -> ours):
  model.local_encoder.embed_tokens             -> encoder.tok_embeddings
  model.encoder_hash_tok_embedding (fused)     -> encoder.hash_embeddings.{i}, rows [i*V, (i+1)*V), i in
                                                  (hash function, n) order, V = encoder_hash_byte_group_vocab
  *.layers.{l}.self_attn.{q,k,v,o}_proj        -> *.layers.{l}.attention.{wq,wk,wv,wo}
  *.layers.{l}.mlp.{gate,up,down}_proj         -> *.layers.{l}.feed_forward.{w1,w3,w2}
  *.layers.{l}.{input,post_attention}_layernorm -> *.layers.{l}.{attention_norm,ffn_norm}
  model.local_encoder.patch_embedding_projection -> encoder.patch_projection
  model.local_encoder.cross_attn_layers.0      -> encoder.cross_attn ({q,k}_norm -> {query,kv}_norm)
  model.global_transformer.token_embedding_projection -> global_transformer.input_projection
  model.local_decoder.patch_embedding_projection -> decoder.patch_projection
  model.local_decoder.cross_attn_layers.{i}    -> decoder.cross_attn.{i}
  model.local_decoder.norm, lm_head            -> decoder.norm, decoder.output
  model.patcher.{embed_tokens,layers,norm,lm_head} -> entropy_model.{tok_embeddings,layers,norm,output}
RoPE: both use the interleaved pair layout (x_2i, x_2i+1), so q/k weights are copied as they are (no
permutation, unlike Llama conversions). Grouped-query attention (num_key_value_heads < heads) is expanded to
full heads by repeating k/v rows, which computes the same function.

Patch lengths: the port omits the next-byte slot (rows sum to T; a trailing zero-length patch means "the
slot starts a new patch") and pads ragged rows with a start at T+1. `hf_patch_lengths_to_ours` and
`ours_patch_lengths_to_hf` translate between the two conventions.
"""
import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere: the paper modules live at the top of the repository

import torch

from blt import BLT, BLTConfig
from checkpoint import StorageError, atomic_save, os_reason
from layers import swiglu_hidden_dim
from patching import VOCAB_SIZE, lengths_from_starts

# transformers' defaults, used when a config dict leaves a field out (transformers/models/blt/configuration_blt.py).
HF_DEFAULTS = {
    "top": dict(vocab_size=260, patch_in_forward=True, patch_size=4, patching_mode="entropy",
                patching_threshold=1.335442066192627, max_patch_length=None, local_attention_window_len=512,
                cross_attn_k=2, encoder_hash_byte_group_size=None, encoder_hash_byte_group_vocab=500002,
                encoder_hash_byte_group_nb_functions=1),
    "encoder_config": dict(vocab_size=260, cross_attn_all_layers=False, cross_attn_k=2, hidden_size_global=2048,
                           hidden_size=1024, num_attention_heads=16, num_key_value_heads=None, num_hidden_layers=1,
                           rms_norm_eps=1e-5, hidden_act="silu", intermediate_size=None, theta=500000.0),
    "decoder_config": dict(vocab_size=260, cross_attn_all_layers=True, cross_attn_k=2, hidden_size_global=2048,
                           hidden_size=1024, num_attention_heads=16, num_key_value_heads=None, num_hidden_layers=9,
                           rms_norm_eps=1e-5, hidden_act="silu", intermediate_size=2816, theta=500000.0),
    "global_config": dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=None, num_hidden_layers=25,
                          rms_norm_eps=1e-5, hidden_act="silu", intermediate_size=5632, theta=500000.0),
    "patcher_config": dict(vocab_size=260, hidden_size=768, num_hidden_layers=14, num_attention_heads=12,
                           num_key_value_heads=None, rms_norm_eps=1e-5, hidden_act="silu", intermediate_size=2048,
                           sliding_window=512, theta=10000.0),  # no default_theta: the base default 10000
}
DEFAULT_HASH_SIZES = [3, 4, 5, 6, 7, 8]


class ConversionError(ValueError):
    """The checkpoint cannot be represented exactly by this project's model; the message says why."""


# ---------------------------------------------------------------- reading an HF config (dict or BltConfig)

def _get(obj, key, default=None):
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _sub_config(hf_config, name: str) -> dict:
    """Effective values of one sub-config, with transformers' defaults and post-init rules applied."""
    sub = _get(hf_config, name)
    sub = {} if sub is None else sub
    d = {key: (_get(sub, key) if _has(sub, key) else default)
         for key, default in HF_DEFAULTS[name].items() if key != "theta"}
    d["num_key_value_heads"] = d["num_key_value_heads"] or d["num_attention_heads"]
    d["intermediate_size"] = d["intermediate_size"] or int(8 * d["hidden_size"] / 3)
    if name == "patcher_config":
        d["hidden_act"] = "silu"  # forced by BltPatcherConfig
    rope = _get(sub, "rope_parameters") or _get(sub, "rope_scaling") or {}
    if _get(rope, "rope_type", "default") not in (None, "default"):
        raise ConversionError(f"{name}: RoPE type {_get(rope, 'rope_type')!r} is not supported (only plain RoPE)")
    theta = _get(rope, "rope_theta") or _get(sub, "rope_theta")
    d["theta"] = float(theta) if theta is not None else HF_DEFAULTS[name]["theta"]
    return d


def _has(obj, key) -> bool:
    return key in obj if isinstance(obj, dict) else hasattr(obj, key)


def hf_effective_config(hf_config) -> dict:
    """A transformers BltConfig, or the dict of its config.json, -> every value the forward pass uses."""
    top = {k: _get(hf_config, k, v) if _has(hf_config, k) else v for k, v in HF_DEFAULTS["top"].items()}
    top["encoder_hash_byte_group_size"] = list(top["encoder_hash_byte_group_size"] or DEFAULT_HASH_SIZES)
    return {"top": top, **{name: _sub_config(hf_config, name)
                           for name in ("encoder_config", "decoder_config", "global_config", "patcher_config")}}


def choose_multiple_of(widths_and_sizes: dict, prefer: int | None = None) -> int:
    """Largest m with swiglu_hidden_dim(width, m) == intermediate size for every (width, size) given, or
    `prefer` when it fits (several m can give the same sizes).

    Ours derives every SwiGLU width from one `multiple_of` (Llama's rounding); transformers stores explicit
    sizes. The released models use multiple_of = 256 everywhere (encoder 1024 -> 2816, global 2048 -> 5632,
    entropy model 768 -> 2048)."""
    sizes = [size for _, size in widths_and_sizes.values()]
    if prefer is not None and all(swiglu_hidden_dim(w, prefer) == size for w, size in widths_and_sizes.values()):
        return prefer
    common = math.gcd(*sizes)
    for m in sorted((d for d in range(1, common + 1) if common % d == 0), reverse=True):
        if all(swiglu_hidden_dim(w, m) == size for w, size in widths_and_sizes.values()):
            return m
    detail = ", ".join(f"{name}: width {w} -> {s}" for name, (w, s) in widths_and_sizes.items())
    raise ConversionError(
        "feed-forward sizes cannot come from one multiple_of (ours uses multiple_of * ceil(int(8 * width / 3) / "
        f"multiple_of) for every stack): {detail}")


def _hf_to_our_config(e: dict, multiple_of: int | None = None) -> BLTConfig:
    top, enc, dec, glob, pat = e["top"], e["encoder_config"], e["decoder_config"], e["global_config"], e["patcher_config"]
    problems = []
    for name, value in (("vocab_size", top["vocab_size"]), ("encoder vocab_size", enc["vocab_size"]),
                        ("decoder vocab_size", dec["vocab_size"])):
        if value != VOCAB_SIZE:
            problems.append(f"{name} is {value}, ours is fixed at {VOCAB_SIZE} (byte + 4)")
    if enc["hidden_size"] != dec["hidden_size"]:
        problems.append(f"encoder width {enc['hidden_size']} != decoder width {dec['hidden_size']}")
    if enc["num_attention_heads"] != dec["num_attention_heads"]:
        problems.append(f"encoder heads {enc['num_attention_heads']} != decoder heads {dec['num_attention_heads']}")
    if dec["hidden_size_global"] != glob["hidden_size"]:
        problems.append(f"decoder hidden_size_global {dec['hidden_size_global']} != global width {glob['hidden_size']}")
    if not top["cross_attn_k"] == enc["cross_attn_k"] == dec["cross_attn_k"]:
        problems.append(f"cross_attn_k differs: top {top['cross_attn_k']}, encoder {enc['cross_attn_k']}, "
                        f"decoder {dec['cross_attn_k']}")
    if enc["cross_attn_all_layers"] and enc["num_hidden_layers"] > 1:
        problems.append("encoder cross_attn_all_layers=True with more than one encoder layer: ours pools and "
                        "cross-attends once, after the last encoder layer")
    if not enc["theta"] == dec["theta"] == glob["theta"]:
        problems.append(f"RoPE theta differs between encoder {enc['theta']}, decoder {dec['theta']} and global "
                        f"{glob['theta']}; ours has one rope_theta for the three")
    use_patcher = bool(top["patch_in_forward"]) and top["patching_mode"] == "entropy"
    stacks = [("encoder", enc), ("decoder", dec), ("global", glob)] + ([("patcher", pat)] if use_patcher else [])
    eps = {s["rms_norm_eps"] for _, s in stacks}
    if len(eps) > 1:
        problems.append(f"rms_norm_eps differs between stacks {sorted(eps)}; ours has one norm_eps")
    for name, s in stacks:
        if s["hidden_act"] != "silu":
            problems.append(f"{name} activation {s['hidden_act']!r}; ours is SwiGLU (silu)")
        if s["hidden_size"] % s["num_attention_heads"] or (s["hidden_size"] // s["num_attention_heads"]) % 2:
            problems.append(f"{name}: width {s['hidden_size']} / {s['num_attention_heads']} heads is not an even head width")
        if s["num_attention_heads"] % s["num_key_value_heads"]:
            problems.append(f"{name}: {s['num_attention_heads']} heads not divisible by {s['num_key_value_heads']} kv heads")
    if use_patcher and top["patch_size"] is None:
        problems.append("patch_size=None makes the port's patcher return one byte per patch without the slot")
    if use_patcher and pat["vocab_size"] != VOCAB_SIZE:
        problems.append(f"patcher vocab_size {pat['vocab_size']} != {VOCAB_SIZE}")
    if problems:
        raise ConversionError("cannot convert this checkpoint exactly: " + "; ".join(problems))
    if top["patch_in_forward"] and not use_patcher:
        warnings.warn(f"patching_mode {top['patching_mode']!r}: the port patches one byte per patch and never "
                      "uses its patcher; the converted model does the same (strided, patch_size 1)")

    multiple_of = choose_multiple_of({name: (s["hidden_size"], s["intermediate_size"]) for name, s in stacks}, multiple_of)
    return BLTConfig(
        patching="entropy" if use_patcher else "strided",
        patch_size=float(top["patch_size"]) if use_patcher else 1.0,
        entropy_threshold=(float(top["patching_threshold"]) if top["patching_threshold"] is not None else None)
        if use_patcher else None,
        max_patch_length=top["max_patch_length"],
        entropy_dim=pat["hidden_size"], entropy_layers=pat["num_hidden_layers"], entropy_heads=pat["num_attention_heads"],
        entropy_window=pat["sliding_window"], entropy_rope_theta=pat["theta"],
        local_dim=enc["hidden_size"], local_heads=enc["num_attention_heads"],
        encoder_layers=enc["num_hidden_layers"], decoder_layers=dec["num_hidden_layers"],
        local_window=top["local_attention_window_len"],
        hash_ngram_sizes=tuple(top["encoder_hash_byte_group_size"]),
        hash_buckets=top["encoder_hash_byte_group_vocab"], hash_functions=top["encoder_hash_byte_group_nb_functions"],
        cross_attn_k=top["cross_attn_k"], cross_attn_all_layers_decoder=bool(dec["cross_attn_all_layers"]),
        global_dim=glob["hidden_size"], global_layers=glob["num_hidden_layers"], global_heads=glob["num_attention_heads"],
        rope_theta=enc["theta"], multiple_of=multiple_of, norm_eps=float(eps.pop()),
    )


# ---------------------------------------------------------------- state dict names

_LAYER = [("self_attn.q_proj", "attention.wq"), ("self_attn.k_proj", "attention.wk"),
          ("self_attn.v_proj", "attention.wv"), ("self_attn.o_proj", "attention.wo"),
          ("mlp.gate_proj", "feed_forward.w1"), ("mlp.up_proj", "feed_forward.w3"),
          ("mlp.down_proj", "feed_forward.w2"),
          ("input_layernorm", "attention_norm"), ("post_attention_layernorm", "ffn_norm")]
_CROSS = [("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo"),
          ("q_norm", "query_norm"), ("k_norm", "kv_norm")]


def key_pairs(cfg: BLTConfig) -> list[tuple[str, str]]:
    """(HF name, our name) of every weight except the hash tables, for a model of config cfg."""
    pairs = []

    def stack(hf, ours, n):
        for i in range(n):
            pairs.extend((f"{hf}.layers.{i}.{a}.weight", f"{ours}.layers.{i}.{b}.weight") for a, b in _LAYER)

    def cross(hf, ours):
        pairs.extend((f"{hf}.{a}.weight", f"{ours}.{b}.weight") for a, b in _CROSS)

    stack("model.local_encoder", "encoder", cfg.encoder_layers)
    pairs += [("model.local_encoder.embed_tokens.weight", "encoder.tok_embeddings.weight"),
              ("model.local_encoder.patch_embedding_projection.weight", "encoder.patch_projection.weight")]
    cross("model.local_encoder.cross_attn_layers.0", "encoder.cross_attn")
    stack("model.global_transformer", "global_transformer", cfg.global_layers)
    if cfg.cross_attn_k * cfg.local_dim != cfg.global_dim:
        pairs.append(("model.global_transformer.token_embedding_projection.weight", "global_transformer.input_projection.weight"))
    stack("model.local_decoder", "decoder", cfg.decoder_layers)
    pairs += [("model.local_decoder.patch_embedding_projection.weight", "decoder.patch_projection.weight"),
              ("model.local_decoder.norm.weight", "decoder.norm.weight"), ("lm_head.weight", "decoder.output.weight")]
    for i in range(cfg.decoder_layers if cfg.cross_attn_all_layers_decoder else 1):
        cross(f"model.local_decoder.cross_attn_layers.{i}", f"decoder.cross_attn.{i}")
    if cfg.patching in ("entropy", "monotonic"):
        stack("model.patcher", "entropy_model", cfg.entropy_layers)
        pairs += [("model.patcher.embed_tokens.weight", "entropy_model.tok_embeddings.weight"),
                  ("model.patcher.norm.weight", "entropy_model.norm.weight"),
                  ("model.patcher.lm_head.weight", "entropy_model.output.weight")]
    return pairs


def _expand_kv(weight: torch.Tensor, n_heads: int, n_kv: int) -> torch.Tensor:
    """k/v projection of n_kv heads -> n_heads heads; head h reads kv head h // (n_heads / n_kv), as repeat_kv."""
    if weight.shape[0] % n_kv or weight.shape[0] // n_kv != weight.shape[1] // n_heads:
        raise ConversionError(f"k/v projection of shape {tuple(weight.shape)} does not fit {n_heads} heads / {n_kv} kv heads")
    if n_kv == n_heads:
        return weight
    head_dim = weight.shape[0] // n_kv
    return weight.view(n_kv, head_dim, -1).repeat_interleave(n_heads // n_kv, dim=0).reshape(n_heads * head_dim, -1)


def hf_to_ours(hf_state_dict: dict, hf_config, multiple_of: int | None = None) -> tuple[BLTConfig, dict]:
    """transformers BltForCausalLM weights + BltConfig (object or config.json dict) -> (BLTConfig, our state dict).

    multiple_of: keep this SwiGLU rounding if it reproduces the port's sizes (default: the largest that does).
    Raises ConversionError when the checkpoint uses something our modules cannot compute exactly."""
    sd = dict(hf_state_dict)
    if "lm_head.weight" in sd and not any(k.startswith("model.") for k in sd):  # a BltModel dict plus a head
        sd = {k if k == "lm_head.weight" else f"model.{k}": v for k, v in sd.items()}
    e = hf_effective_config(hf_config)
    cfg = _hf_to_our_config(e, multiple_of)
    kv_heads = {"model.local_encoder": e["encoder_config"], "model.local_decoder": e["decoder_config"],
                "model.global_transformer": e["global_config"], "model.patcher": e["patcher_config"]}
    ours, missing = {}, []
    for hf_key, our_key in key_pairs(cfg):
        if hf_key not in sd:
            missing.append(hf_key)
            continue
        w = sd.pop(hf_key)
        if hf_key.endswith(("k_proj.weight", "v_proj.weight")):
            sub = kv_heads[".".join(hf_key.split(".")[:2])]
            w = _expand_kv(w, sub["num_attention_heads"], sub["num_key_value_heads"])
        ours[our_key] = w
    fused = sd.pop("model.encoder_hash_tok_embedding.weight", None)
    n_tables, V = cfg.hash_functions * len(cfg.hash_ngram_sizes), cfg.hash_buckets
    if fused is None:
        missing.append("model.encoder_hash_tok_embedding.weight")
    elif fused.shape[0] != n_tables * V:
        raise ConversionError(f"fused hash table has {fused.shape[0]} rows, expected {n_tables} tables x {V}")
    else:
        for i in range(n_tables):
            ours[f"encoder.hash_embeddings.{i}.weight"] = fused[i * V:(i + 1) * V]
    if cfg.patching == "strided":  # the port's patcher is unused without entropy patching
        sd = {k: v for k, v in sd.items() if not k.startswith("model.patcher.")}
    if missing or sd:
        raise ConversionError(f"state dict does not fit its config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"unexpected {sorted(sd)[:5]}{'...' if len(sd) > 5 else ''}")
    return cfg, ours


def ours_to_hf(cfg: BLTConfig, state_dict: dict) -> tuple[dict, dict]:
    """(BLTConfig, our state dict) -> (config dict for transformers.BltConfig(**d), BltForCausalLM state dict).

    The port has no space, strided (k > 1) or monotonic patching: such models are exported with their
    weights but the port must then be given explicit patch_lengths (a warning says so)."""
    if not cfg.hash_ngram_sizes:
        raise ConversionError("the port always adds hash n-gram embeddings (an empty size list means 3..8)")
    has_entropy = cfg.patching in ("entropy", "monotonic")
    if cfg.patching == "monotonic":
        warnings.warn("the port has no monotonic rule: it will patch with the global rule H > threshold")
    elif cfg.patching == "space" or (cfg.patching == "strided" and cfg.patch_size != 1):
        warnings.warn(f"the port cannot do {cfg.patching} patching: pass patch_lengths to its forward "
                      "(convert.ours_patch_lengths_to_hf)")
    ffn = lambda d: swiglu_hidden_dim(d, cfg.multiple_of)  # noqa: E731
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}

    def local(layers, all_layers):
        return dict(vocab_size=VOCAB_SIZE, hidden_size=cfg.local_dim, num_attention_heads=cfg.local_heads,
                    num_key_value_heads=cfg.local_heads, num_hidden_layers=layers, intermediate_size=ffn(cfg.local_dim),
                    cross_attn_k=cfg.cross_attn_k, cross_attn_all_layers=all_layers, hidden_size_global=cfg.global_dim,
                    rms_norm_eps=cfg.norm_eps, rope_parameters=dict(rope), hidden_act="silu")

    hf_cfg = dict(
        model_type="blt", vocab_size=VOCAB_SIZE, patch_in_forward=has_entropy,
        patching_mode="entropy" if has_entropy else "none",
        patch_size=max(1, round(cfg.patch_size)), patching_threshold=cfg.entropy_threshold,
        max_patch_length=cfg.max_patch_length, local_attention_window_len=cfg.local_window,
        cross_attn_k=cfg.cross_attn_k, encoder_hash_byte_group_size=list(cfg.hash_ngram_sizes),
        encoder_hash_byte_group_vocab=cfg.hash_buckets, encoder_hash_byte_group_nb_functions=cfg.hash_functions,
        encoder_config=local(cfg.encoder_layers, False),
        decoder_config=local(cfg.decoder_layers, cfg.cross_attn_all_layers_decoder),
        global_config=dict(hidden_size=cfg.global_dim, num_attention_heads=cfg.global_heads,
                           num_key_value_heads=cfg.global_heads, num_hidden_layers=cfg.global_layers,
                           intermediate_size=ffn(cfg.global_dim), rms_norm_eps=cfg.norm_eps,
                           rope_parameters=dict(rope), hidden_act="silu"),
        tie_word_embeddings=False, use_cache=False,  # the port's cache path crashes (transformers 5.24)
    )
    if has_entropy:
        hf_cfg["patcher_config"] = dict(
            vocab_size=VOCAB_SIZE, hidden_size=cfg.entropy_dim, num_hidden_layers=cfg.entropy_layers,
            num_attention_heads=cfg.entropy_heads, num_key_value_heads=cfg.entropy_heads,
            intermediate_size=ffn(cfg.entropy_dim), rms_norm_eps=cfg.norm_eps, sliding_window=cfg.entropy_window,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.entropy_rope_theta})
    sd = dict(state_dict)
    hf = {hf_key: sd.pop(our_key) for hf_key, our_key in key_pairs(cfg)}
    tables = [sd.pop(f"encoder.hash_embeddings.{i}.weight") for i in range(cfg.hash_functions * len(cfg.hash_ngram_sizes))]
    hf["model.encoder_hash_tok_embedding.weight"] = torch.cat(tables, dim=0)
    if sd:
        raise ConversionError(f"unexpected weights {sorted(sd)[:5]}")
    return hf_cfg, hf


# ---------------------------------------------------------------- patch lengths between conventions

def hf_patch_lengths_to_ours(hf_lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The port's patch lengths (B, P), rows summing to T with an optional trailing zero-length patch and
    ragged rows padded by starts beyond T, -> ours (B, P'), rows summing to T + 1 (next-byte slot), zero-padded.

    Only the patch starts matter in both models. A start at T (the port's trailing zero-length patch) is our
    slot starting its own patch; starts beyond T are padding. Zero-length patches elsewhere (two patches
    starting at one position) have no counterpart here and raise ConversionError."""
    B, _ = hf_lengths.shape
    starts = hf_lengths.cumsum(dim=1) - hf_lengths  # (B, P) exclusive cumsum, as the port computes it
    out = torch.zeros(B, seq_len + 1, dtype=torch.bool, device=hf_lengths.device)
    for b in range(B):
        s = starts[b][starts[b] <= seq_len]
        if s.numel() == 0 or s[0] != 0 or (s.numel() > 1 and bool((s[1:] <= s[:-1]).any())):
            raise ConversionError(f"row {b}: patch starts {s.tolist()} are not strictly increasing from 0")
        out[b, s] = True
    return lengths_from_starts(out)


def ours_patch_lengths_to_hf(lengths: torch.Tensor) -> torch.Tensor:
    """Our patch lengths (B, P), rows summing to T + 1, -> exactly what the port's patcher returns for the
    same starts: [0, 1, later starts..., T+1 padding] turned into lengths, the last patch ending at T - 1.

    Rows must start with the BOS patch and a patch at position 1 (every patching scheme here does)."""
    B = lengths.shape[0]
    total = lengths.sum(dim=1)
    if bool((total != total[0]).any()):
        raise ConversionError("rows of a batch must cover the same number of positions")
    T = int(total[0]) - 1
    rows = []
    for b in range(B):
        L = lengths[b][lengths[b] > 0]
        s = (L.cumsum(0) - L).tolist()
        if s[:2] != [0, 1]:
            raise ConversionError(f"row {b}: the port's patcher always starts patches at 0 and 1, got starts {s[:3]}")
        rows.append(s[2:])
    width = max(len(r) for r in rows)
    out = []
    for r in rows:
        s = torch.tensor([0, 1] + r + [T + 1] * (width - len(r)), dtype=torch.long)
        ends = torch.cat([s[1:] - 1, torch.tensor([T - 1])])
        out.append(ends - s + 1)
    return torch.stack(out).to(lengths.device)


# ---------------------------------------------------------------- Meta's original release

_META_RENAMES = [(".attention.", ".self_attn."), (".feed_forward.", ".mlp."), (".attention_norm.", ".input_layernorm."),
                 (".ffn_norm.", ".post_attention_layernorm."), (".tok_embeddings.", ".embed_tokens."),
                 (".cross_attn_norm_q.", ".q_norm."), (".cross_attn_norm_kv.", ".k_norm."),
                 (".w1.", ".gate_proj."), (".w2.", ".down_proj."), (".w3.", ".up_proj."), (".wq.", ".q_proj."),
                 (".wk.", ".k_proj."), (".wv.", ".v_proj."), (".wo.", ".o_proj."), (".output.", ".lm_head.")]


def meta_to_hf(args: dict, entropy_params: dict | None, state_dict: dict, entropy_state_dict: dict | None) -> tuple[dict, dict]:
    """Meta's release (config.json "args", entropy_model/params.json, their weights) -> the port's config dict
    and state dict. Follows transformers' own convert_blt_weights_to_hf.py, with more checks: settings the
    port cannot express raise ConversionError."""
    a = dict(args)
    problems = []
    expected = {"use_rope": True, "cross_attn_encoder": True, "cross_attn_decoder": True,
                "cross_attn_init_by_pooling": True, "downsampling_by_pooling": "max", "pm_size": 0,
                "encoder_enable_byte_ngrams": False, "non_linearity": "swiglu", "norm_type": "rmsnorm",
                "tie_local_encoder_decoder_logits": False, "weight_tying": False, "norm_affine": True}
    for key, want in expected.items():
        if key in a and a[key] != want and not (key == "pm_size" and not a[key]):
            problems.append(f"{key}={a[key]!r} (expected {want!r})")
    heads = {a.get("n_heads_local_encoder"), a.get("n_heads_local_decoder"), a.get("cross_attn_nheads", a.get("n_heads_local_encoder"))}
    if len(heads) > 1:
        problems.append(f"local and cross-attention head counts differ {sorted(map(str, heads))}")
    if a.get("ffn_dim_multiplier") not in (None, 1.0):
        problems.append(f"ffn_dim_multiplier={a['ffn_dim_multiplier']}")
    patcher_args = ((entropy_params or {}).get("data") or {}).get("patcher_args") or {}
    if patcher_args.get("monotonicity") or a.get("monotonicity"):
        problems.append("monotonicity=True (the port and this converter only know the global threshold rule)")
    if problems:
        raise ConversionError("unsupported settings in Meta's config: " + "; ".join(problems))

    def ffn(dim, m):
        return m * math.ceil(int(8 * dim / 3) / m)

    m = a.get("multiple_of", 256)
    eps = a.get("norm_eps", 1e-5)
    rope = {"rope_type": "default", "rope_theta": a.get("rope_theta", 10000.0)}

    def local(prefix, all_layers_key, default_all):
        d = a[f"dim_local_{prefix}"]
        return dict(vocab_size=a.get("vocab_size", 260), hidden_size=d, num_attention_heads=a[f"n_heads_local_{prefix}"],
                    num_key_value_heads=a.get("n_kv_heads"), num_hidden_layers=a[f"n_layers_local_{prefix}"],
                    intermediate_size=ffn(d, m), rms_norm_eps=eps, rope_parameters=dict(rope),
                    cross_attn_k=a.get("cross_attn_k", 2), hidden_size_global=a["dim_global"],
                    cross_attn_all_layers=a.get(all_layers_key, default_all))

    hf_cfg = dict(
        model_type="blt", vocab_size=a.get("vocab_size", 260), cross_attn_k=a.get("cross_attn_k", 2),
        local_attention_window_len=a.get("local_attention_window_len", 512) if "local_attention_window_len" in a else 512,
        encoder_hash_byte_group_size=a.get("encoder_hash_byte_group_size"),
        encoder_hash_byte_group_vocab=a.get("encoder_hash_byte_group_vocab", 30000),
        encoder_hash_byte_group_nb_functions=a.get("encoder_hash_byte_group_nb_functions", 3),
        encoder_config=local("encoder", "cross_attn_all_layers_encoder", False),
        decoder_config=local("decoder", "cross_attn_all_layers_decoder", False),
        global_config=dict(hidden_size=a["dim_global"], num_attention_heads=a["n_heads_global"],
                           num_key_value_heads=a.get("n_kv_heads_global"), num_hidden_layers=a["n_layers_global"],
                           intermediate_size=ffn(a["dim_global"], m), rms_norm_eps=eps, rope_parameters=dict(rope)),
        patch_in_forward=entropy_params is not None, patching_mode="entropy",
        patch_size=int(patcher_args.get("patch_size") or 4), patching_threshold=patcher_args.get("threshold", 1.335442066192627),
        max_patch_length=patcher_args.get("max_patch_length"), tie_word_embeddings=False, use_cache=False,
    )
    if isinstance(hf_cfg["encoder_hash_byte_group_size"], str):
        hf_cfg["encoder_hash_byte_group_size"] = [int(x) for x in hf_cfg["encoder_hash_byte_group_size"].split(",") if x]
    if entropy_params is not None:
        em = entropy_params.get("entropy_model", entropy_params)
        em_m = em.get("multiple_of", 256)
        hf_cfg["patcher_config"] = dict(
            vocab_size=em.get("vocab_size", 260), hidden_size=em["dim"], num_hidden_layers=em["n_layers"],
            num_attention_heads=em["n_heads"], num_key_value_heads=em.get("n_kv_heads"),
            intermediate_size=ffn(em["dim"], em_m), rms_norm_eps=em.get("norm_eps", 1e-5),
            sliding_window=em.get("sliding_window", 512),
            rope_parameters={"rope_type": "default", "rope_theta": em.get("rope_theta", 10000.0)})

    renamed = {}
    items = list(state_dict.items()) + [(f"patcher.{k}", v) for k, v in (entropy_state_dict or {}).items()]
    hash_tables = {}
    for key, value in items:
        if key.startswith("encoder_hash_tok_embedding."):
            hash_tables[int(key.split(".")[1])] = value
            continue
        for old, new in _META_RENAMES:
            key = key.replace(old, new)
        renamed["lm_head.weight" if key == "local_decoder.lm_head.weight" else f"model.{key}"] = value
    if hash_tables:
        renamed["model.encoder_hash_tok_embedding.weight"] = torch.cat([hash_tables[i] for i in sorted(hash_tables)])
    return hf_cfg, renamed


# ---------------------------------------------------------------- files and the CLI

def load_weights(folder: str, stem: str = "model") -> dict:
    """model.safetensors (also sharded, with its index), pytorch_model.bin or consolidated.pth in folder."""
    def st(path):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ConversionError(f"{path} needs the `safetensors` package (pip install safetensors; it comes with transformers)")
        return load_file(path)

    index = os.path.join(folder, f"{stem}.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        out = {}
        for shard in shards:
            out.update(st(os.path.join(folder, shard)))
        return out
    if os.path.isfile(os.path.join(folder, f"{stem}.safetensors")):
        return st(os.path.join(folder, f"{stem}.safetensors"))
    for name in ("pytorch_model.bin", "consolidated.pth"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            sd = torch.load(path, map_location="cpu", weights_only=True)
            for wrapper in ("model", "state_dict"):
                if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
                    sd = sd[wrapper]
            return sd
    raise ConversionError(f"no weights in {folder} (looked for model.safetensors, pytorch_model.bin, consolidated.pth)")


EXPECTED = "a downloaded checkpoint folder: config.json with model.safetensors or pytorch_model.bin"


def read_folder(folder: str, entropy_dir: str | None = None) -> tuple[BLTConfig, dict, str]:
    """A downloaded checkpoint folder -> (BLTConfig, our state dict, description of the source format)."""
    if not os.path.isdir(folder):
        raise ConversionError(f"{folder} is {'a file' if os.path.exists(folder) else 'not there'}: expected {EXPECTED}")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ConversionError(f"{folder} has no config.json: expected {EXPECTED}")
    if entropy_dir is not None and not os.path.isdir(entropy_dir):
        raise ConversionError(f"--entropy-dir {entropy_dir} is not a folder: expected the entropy model's folder "
                              f"(params.json and consolidated.pth), e.g. a download of facebook/blt-entropy")
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    if not isinstance(config, dict):
        raise ConversionError(f"{folder}/config.json holds no BLT config: expected {EXPECTED}")
    if "args" in config:  # Meta's release
        entropy_dir = entropy_dir or (os.path.join(folder, "entropy_model")
                                      if os.path.isdir(os.path.join(folder, "entropy_model")) else None)
        if entropy_dir is None:
            raise ConversionError(f"{folder} has no entropy_model/ folder: pass --entropy-dir (e.g. a download of "
                                  "facebook/blt-entropy)")
        if os.path.isdir(os.path.join(entropy_dir, "entropy_model")):
            entropy_dir = os.path.join(entropy_dir, "entropy_model")
        with open(os.path.join(entropy_dir, "params.json")) as f:
            entropy_params = json.load(f)
        hf_cfg, hf_sd = meta_to_hf(config["args"], entropy_params, load_weights(folder), load_weights(entropy_dir))
        cfg, sd = hf_to_ours(hf_sd, hf_cfg)
        return cfg, sd, "meta"
    cfg, sd = hf_to_ours(load_weights(folder), config)
    return cfg, sd, "transformers"


def check_shapes(cfg: BLTConfig, sd: dict):
    """Every weight present with the shape BLT(cfg) expects (checked on the meta device: no memory used)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in BLT(cfg).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if expected != got:
        wrong = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
        raise ConversionError(f"converted weights do not fit BLT({cfg}): {[(k, expected.get(k), got.get(k)) for k in wrong[:5]]}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Convert a downloaded BLT checkpoint (Meta's release or a transformers "
                                            "BltForCausalLM folder) into this project's checkpoint format.")
    p.add_argument("folder", help="folder with config.json and model.safetensors / pytorch_model.bin")
    p.add_argument("out", help="output checkpoint (.pt), for sample.py --checkpoint")
    p.add_argument("--entropy-dir", help="entropy model folder (params.json + consolidated.pth) when FOLDER has no "
                                         "entropy_model/ (Meta format only)")
    p.add_argument("--dtype", choices=["keep", "float32", "bfloat16"], default="keep",
                   help="store weights in this dtype (default: as in the source; the model runs in float32)")
    args = p.parse_args(argv)
    try:
        cfg, sd, source = read_folder(args.folder, args.entropy_dir)
        check_shapes(cfg, sd)
    except (ConversionError, KeyError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e.filename or args.folder}: {os_reason(e)}", file=sys.stderr)
        return 1
    if args.dtype != "keep":  # stored so; checkpoint.load_checkpoint runs it in float32
        sd = {k: v.to(getattr(torch, args.dtype)) for k, v in sd.items()}
    sd = {k: v.contiguous() for k, v in sd.items()}
    try:
        atomic_save({"format": 1, "kind": "blt", "config": cfg.to_dict(), "model": sd, "step": 0,
                     "source": {"format": source, "path": os.path.abspath(args.folder)}}, Path(args.out))
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = sum(v.numel() for v in sd.values())
    print(f"wrote {args.out}: {n / 1e9:.2f} B parameters from a {source} checkpoint; patching={cfg.patching} "
          f"threshold={cfg.entropy_threshold} local {cfg.local_dim}x{cfg.encoder_layers}+{cfg.decoder_layers}, "
          f"global {cfg.global_dim}x{cfg.global_layers}, multiple_of={cfg.multiple_of}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

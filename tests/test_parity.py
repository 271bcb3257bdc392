"""Parity with the Hugging Face `transformers` port of Meta's released BLT (transformers.models.blt).

Random tiny configs, several seeds, fp32 on CPU. Skipped when transformers is not installed.
  (a) the same patch lengths give the same logits (atol 1e-4), in both conversion directions, including a
      ragged batch and end-to-end entropy patching;
  (b) our entropy model's entropies equal the port's patcher's, and our patch lengths (with the next-byte
      slot) translate exactly into the port's patch_lengths_from_entropies;
  (c) hash n-gram ids equal the port's byte_group_hash_function bit for bit.
The port's forward crashes with its cache on (transformers 5.24): every call passes use_cache=False.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")
hf_blt = pytest.importorskip("transformers.models.blt.modeling_blt")

from blt import BLT, BLTConfig  # noqa: E402
from tools.convert import (ConversionError, choose_multiple_of, hf_patch_lengths_to_ours, hf_to_ours,  # noqa: E402
                     meta_to_hf, ours_patch_lengths_to_hf, ours_to_hf)
from encoder import HASH_PRIMES, hash_ngram_ids  # noqa: E402
from layers import swiglu_hidden_dim  # noqa: E402
from patching import entropy_patch_starts, lengths_from_starts  # noqa: E402

ATOL = 1e-4
SEEDS = (0, 1, 2)
# Tiny configs that vary what the conversion touches: k, layer counts, widths (global != k * local exercises
# the input projection), hash sizes / buckets / functions, decoder cross-attention in every layer or only
# the first, windows shorter than the sequence, GQA, RoPE thetas, SwiGLU rounding.
CONFIGS = {
    "k2_proj_window": dict(local_dim=32, local_heads=4, encoder_layers=1, decoder_layers=2, global_dim=48,
                           global_heads=4, global_layers=2, cross_attn_k=2, hash_ngram_sizes=(3, 4, 5),
                           hash_buckets=97, hash_functions=1, local_window=8, cross_attn_all_layers_decoder=True,
                           entropy_dim=32, entropy_layers=2, entropy_heads=4, entropy_window=6, multiple_of=16,
                           kv_heads=dict(global_config=2, encoder_config=2)),
    "k3_two_hashes_first_layer_only": dict(
        local_dim=16, local_heads=2, encoder_layers=2, decoder_layers=3, global_dim=48, global_heads=6,
        global_layers=1, cross_attn_k=3, hash_ngram_sizes=(2, 3, 8), hash_buckets=50021, hash_functions=2,
        local_window=None, cross_attn_all_layers_decoder=False, entropy_dim=24, entropy_layers=1,
        entropy_heads=2, entropy_window=None, multiple_of=8, rope_theta=10000.0, entropy_rope_theta=500.0),
    "k1_released_like": dict(local_dim=24, local_heads=2, encoder_layers=1, decoder_layers=3, global_dim=40,
                             global_heads=4, global_layers=3, cross_attn_k=1, hash_ngram_sizes=(3, 4, 5, 6, 7, 8),
                             hash_buckets=30011, hash_functions=1, local_window=16,
                             cross_attn_all_layers_decoder=True, entropy_dim=16, entropy_layers=2, entropy_heads=2,
                             entropy_window=12, multiple_of=32),
}
T = 28  # bytes per row, BOS included
_max_diff = {"logits": 0.0, "cases": 0}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread is ~100x faster than two contending ones on a loaded 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ours(spec: dict, **extra) -> BLTConfig:
    spec = {k: v for k, v in spec.items() if k != "kv_heads"}
    return BLTConfig(patching="entropy", entropy_threshold=2.0, **spec, **extra)


def _hf_config(spec: dict, threshold: float = 2.0, patch_in_forward: bool = True, **top):
    """The port's BltConfig for one of CONFIGS, written by hand (not by ours_to_hf), with GQA if asked."""
    cfg = _ours(spec)
    ffn = lambda d: swiglu_hidden_dim(d, cfg.multiple_of)  # noqa: E731
    kv = spec.get("kv_heads", {})

    def local(layers, all_layers, name):
        return dict(vocab_size=260, hidden_size=cfg.local_dim, num_attention_heads=cfg.local_heads,
                    num_key_value_heads=kv.get(name), num_hidden_layers=layers, intermediate_size=ffn(cfg.local_dim),
                    cross_attn_k=cfg.cross_attn_k, hidden_size_global=cfg.global_dim, cross_attn_all_layers=all_layers,
                    rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    return transformers.BltConfig(
        vocab_size=260, cross_attn_k=cfg.cross_attn_k, local_attention_window_len=cfg.local_window,
        encoder_hash_byte_group_size=list(cfg.hash_ngram_sizes), encoder_hash_byte_group_vocab=cfg.hash_buckets,
        encoder_hash_byte_group_nb_functions=cfg.hash_functions, patch_in_forward=patch_in_forward,
        patching_threshold=threshold,
        patcher_config=dict(vocab_size=260, hidden_size=cfg.entropy_dim, num_hidden_layers=cfg.entropy_layers,
                            num_attention_heads=cfg.entropy_heads, intermediate_size=ffn(cfg.entropy_dim),
                            sliding_window=cfg.entropy_window,
                            rope_parameters={"rope_type": "default", "rope_theta": cfg.entropy_rope_theta}),
        encoder_config=local(cfg.encoder_layers, False, "encoder_config"),
        decoder_config=local(cfg.decoder_layers, cfg.cross_attn_all_layers_decoder, "decoder_config"),
        global_config=dict(hidden_size=cfg.global_dim, num_hidden_layers=cfg.global_layers,
                           num_attention_heads=cfg.global_heads, num_key_value_heads=kv.get("global_config"),
                           intermediate_size=ffn(cfg.global_dim),
                           rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}),
        **top)


def _randomise(model: torch.nn.Module, seed: int):
    """Every weight random, norms included (they start at 1, which would hide a swapped norm)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.5 * (torch.rand(p.shape, generator=g) - 0.5))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)


def _hf_model(spec, seed, **kw):
    torch.manual_seed(seed)
    model = transformers.BltForCausalLM(_hf_config(spec, **kw)).eval()
    _randomise(model, seed)
    return model


def _tokens(seed, B=3):
    g = torch.Generator().manual_seed(100 + seed)
    ids = torch.randint(4, 260, (B, T), generator=g)
    ids[:, 0] = 1  # BOS
    ids[0, 5:12] = ids[0, 12:19]  # some repetition, so the entropy model is sure somewhere
    return ids


def _random_hf_lengths(seed, B=3):
    """HF-convention rows (sum T, BOS patch first), different patch counts per row, padded the way the port's
    patcher pads (a start at T+1); one row ends with a zero-length patch (the slot starts a patch)."""
    g = torch.Generator().manual_seed(200 + seed)
    starts = []
    for b in range(B):
        n = int(torch.randint(2, 9, (1,), generator=g))
        s = sorted(set(torch.randint(2, T, (n,), generator=g).tolist()))
        if b == 1:
            s.append(T)  # trailing zero-length patch
        starts.append(s)
    width = max(map(len, starts))
    rows = []
    for s in starts:
        s = torch.tensor([0, 1] + s + [T + 1] * (width - len(s)))
        rows.append(torch.cat([s[1:] - 1, torch.tensor([T - 1])]) - s + 1)
    return torch.stack(rows)


def _record(diff):
    _max_diff["logits"] = max(_max_diff["logits"], diff)
    _max_diff["cases"] += 1


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_hf_given_patch_lengths(name, seed):
    """(a) HF random weights -> ours: same logits for the same patches, a ragged batch included."""
    hf = _hf_model(CONFIGS[name], seed)
    cfg, sd = hf_to_ours(hf.state_dict(), hf.config)
    ours = BLT(cfg).eval()
    ours.load_state_dict(sd)  # strict: every weight mapped, none left over
    ids, hf_lengths = _tokens(seed), _random_hf_lengths(seed)
    with torch.no_grad():
        want = hf(input_ids=ids, patch_lengths=hf_lengths, use_cache=False).logits
        got = ours(ids, patch_lengths=hf_patch_lengths_to_ours(hf_lengths, T))
    diff = (want - got).abs().max().item()
    _record(diff)
    assert diff < ATOL, f"{name} seed {seed}: max |logit diff| {diff:.2e}"
    # one row alone gives the same logits as inside the ragged batch, in both models
    with torch.no_grad():
        alone = ours(ids[:1], patch_lengths=hf_patch_lengths_to_ours(hf_lengths[:1], T))
    assert (alone - got[:1]).abs().max().item() < ATOL


def _threshold_between(entropies: torch.Tensor, margin: float = 1e-3) -> float:
    """A threshold near the median entropy that no entropy is within `margin` of, so float noise between two
    implementations cannot flip a boundary."""
    values = entropies.flatten().sort().values
    mid = len(values) // 2
    for offset in range(len(values)):
        for i in (mid + offset, mid - offset):
            if 0 < i < len(values) and values[i] - values[i - 1] > 2 * margin:
                return float(values[i - 1] + values[i]) / 2
    raise AssertionError("entropies too crowded for a safe threshold")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", CONFIGS)
def test_entropies_and_patch_lengths_match_hf_patcher(name, seed):
    """(b) entropies match; the same entropies give the same patch starts; end to end, both models patch
    the same way on their own and give the same logits."""
    hf = _hf_model(CONFIGS[name], seed)
    cfg, sd = hf_to_ours(hf.state_dict(), hf.config)
    ours = BLT(cfg).eval()
    ours.load_state_dict(sd)
    ids = _tokens(seed)
    with torch.no_grad():
        hf_entropies, _, _ = hf.model.patcher(ids, patch_size=4, threshold=1.0)
        our_entropies = ours.entropy_model.entropies(ids)
    assert (hf_entropies - our_entropies).abs().max().item() < 1e-4

    # the rule alone, on identical entropies, for several thresholds (ragged rows included)
    for q in (0.2, 0.5, 0.8):
        theta = float(hf_entropies.quantile(q))
        hf_lengths = hf.model.patcher.patch_lengths_from_entropies(hf_entropies, T, patch_size=4, threshold=theta)
        ours_lengths = lengths_from_starts(entropy_patch_starts(hf_entropies, theta))  # sums to T + 1
        assert torch.equal(ours_patch_lengths_to_hf(ours_lengths), hf_lengths)
        assert torch.equal(hf_patch_lengths_to_ours(hf_lengths, T), ours_lengths)

    # end to end: each model patches with its own entropy model
    theta = _threshold_between(torch.cat([hf_entropies, our_entropies]))
    hf.config.patching_threshold = ours.cfg.entropy_threshold = theta
    with torch.no_grad():
        _, hf_lengths, _ = hf.model.patcher(ids, patch_size=4, threshold=theta)
        ours_lengths = ours.patch(ids)
        assert torch.equal(ours_patch_lengths_to_hf(ours_lengths), hf_lengths)
        want = hf(input_ids=ids, use_cache=False).logits  # the port runs its own patcher
        got = ours(ids)  # ours runs its own entropy model
    diff = (want - got).abs().max().item()
    _record(diff)
    assert diff < ATOL, f"{name} seed {seed}: end-to-end max |logit diff| {diff:.2e}"


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", CONFIGS)
def test_round_trip_ours_to_hf_to_ours(name, seed):
    """ours -> HF loads strictly into BltForCausalLM and gives the same logits; HF -> ours gives back the
    same config and bit-identical weights."""
    torch.manual_seed(seed)
    cfg = _ours(CONFIGS[name], max_patch_length=None)
    ours = BLT(cfg).eval()
    _randomise(ours, seed)
    hf_cfg, hf_sd = ours_to_hf(cfg, ours.state_dict())
    hf = transformers.BltForCausalLM(transformers.BltConfig(**hf_cfg)).eval()
    hf.load_state_dict(hf_sd, strict=True)
    ids, hf_lengths = _tokens(seed), _random_hf_lengths(seed)
    with torch.no_grad():
        want = hf(input_ids=ids, patch_lengths=hf_lengths, use_cache=False).logits
        got = ours(ids, patch_lengths=hf_patch_lengths_to_ours(hf_lengths, T))
    diff = (want - got).abs().max().item()
    _record(diff)
    assert diff < ATOL
    back_cfg, back_sd = hf_to_ours(hf.state_dict(), hf.config, multiple_of=cfg.multiple_of)  # BltConfig object
    assert back_cfg == cfg
    assert back_cfg == hf_to_ours(hf_sd, hf_cfg, multiple_of=cfg.multiple_of)[0]  # plain config dict
    guessed = hf_to_ours(hf_sd, hf_cfg)[0]  # several multiple_of give the same sizes: the largest is taken
    assert guessed.multiple_of >= cfg.multiple_of and BLTConfig(**{**guessed.to_dict(), "multiple_of": cfg.multiple_of}) == cfg
    assert back_sd.keys() == ours.state_dict().keys()
    assert all(torch.equal(back_sd[k], v) for k, v in ours.state_dict().items())


def test_port_without_patcher_is_strided_one():
    """A port model without a patcher patches one byte per patch (plus the slot): ours as strided, k = 1."""
    hf = _hf_model(CONFIGS["k2_proj_window"], 0, patch_in_forward=False)
    cfg, sd = hf_to_ours(hf.state_dict(), hf.config)
    assert (cfg.patching, cfg.patch_size) == ("strided", 1.0)
    ours = BLT(cfg).eval()
    ours.load_state_dict(sd)
    ids = _tokens(0)
    with torch.no_grad():
        diff = (hf(input_ids=ids, use_cache=False).logits - ours(ids)).abs().max().item()
    assert diff < ATOL


def test_hash_ids_match_hf_bit_for_bit():
    """(c) every prime (and the wrap-around to the first prime), n = 1..8, small and huge buckets, ids
    beyond the byte range so the int64 products overflow."""
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randint(0, 260, (3, 64), generator=g), torch.randint(0, 2**31, (2, 64), generator=g)])
    ids[:, 0] = 1
    for f in range(len(HASH_PRIMES) + 1):
        for n in range(1, 9):
            for buckets in (97, 500002, 2**31 - 1):
                want = hf_blt.byte_group_hash_function(ids, n, HASH_PRIMES[f % len(HASH_PRIMES)], buckets)
                got = hash_ngram_ids(ids, n, buckets, f)
                assert torch.equal(want, got), (f, n, buckets)


def test_refuses_what_ours_cannot_compute():
    base = CONFIGS["k2_proj_window"]
    cfg = _hf_config(base)
    cfg.encoder_config.num_hidden_layers, cfg.encoder_config.cross_attn_all_layers = 2, True
    with pytest.raises(ConversionError, match="cross_attn_all_layers"):
        hf_to_ours({}, cfg)
    cfg = _hf_config(base)
    cfg.encoder_config.intermediate_size = 85  # the port's int(8 * 32 / 3) default: no multiple_of gives 85 and 64
    with pytest.raises(ConversionError, match="multiple_of"):
        hf_to_ours({}, cfg)
    cfg = _hf_config(base)
    cfg.decoder_config.rope_parameters = {"rope_type": "default", "rope_theta": 1234.0}
    with pytest.raises(ConversionError, match="theta"):
        hf_to_ours({}, cfg)
    assert choose_multiple_of({"enc": (1024, 2816), "glob": (2048, 5632), "ent": (768, 2048)}) == 256


def _meta_args(cfg: BLTConfig) -> tuple[dict, dict]:
    """Meta's config.json "args" and entropy_model/params.json for a config of ours (the fields Meta's code
    and transformers' converter read)."""
    args = dict(dim_local_encoder=cfg.local_dim, dim_local_decoder=cfg.local_dim, dim_global=cfg.global_dim,
                n_heads_local_encoder=cfg.local_heads, n_heads_local_decoder=cfg.local_heads,
                n_heads_global=cfg.global_heads, n_layers_local_encoder=cfg.encoder_layers,
                n_layers_local_decoder=cfg.decoder_layers, n_layers_global=cfg.global_layers,
                cross_attn_k=cfg.cross_attn_k, cross_attn_nheads=cfg.local_heads, cross_attn_encoder=True,
                cross_attn_decoder=True, cross_attn_init_by_pooling=True, downsampling_by_pooling="max",
                cross_attn_all_layers_decoder=cfg.cross_attn_all_layers_decoder, cross_attn_all_layers_encoder=False,
                encoder_hash_byte_group_size=",".join(map(str, cfg.hash_ngram_sizes)) + ",",
                encoder_hash_byte_group_vocab=cfg.hash_buckets, encoder_hash_byte_group_nb_functions=cfg.hash_functions,
                rope_theta=cfg.rope_theta, multiple_of=cfg.multiple_of, norm_eps=cfg.norm_eps, vocab_size=260,
                local_attention_window_len=cfg.local_window, pm_size=0, ffn_dim_multiplier=1.0)
    params = {"entropy_model": dict(dim=cfg.entropy_dim, n_layers=cfg.entropy_layers, n_heads=cfg.entropy_heads,
                                    sliding_window=cfg.entropy_window, vocab_size=260, multiple_of=cfg.multiple_of,
                                    rope_theta=cfg.entropy_rope_theta, norm_eps=cfg.norm_eps),
              "data": {"patcher_args": dict(threshold=cfg.entropy_threshold, patch_size=int(cfg.patch_size),
                                            max_patch_length=cfg.max_patch_length, monotonicity=False,
                                            threshold_add=None)}}
    return args, params


def _to_meta_names(hf_sd: dict, buckets: int) -> tuple[dict, dict]:
    """The port's names back to Meta's (the inverse of meta_to_hf's renaming): (model dict, entropy dict)."""
    renames = [("self_attn.", "attention."), ("mlp.", "feed_forward."), ("input_layernorm", "attention_norm"),
               ("post_attention_layernorm", "ffn_norm"), ("embed_tokens", "tok_embeddings"),
               ("q_norm", "cross_attn_norm_q"), ("k_norm", "cross_attn_norm_kv"), ("gate_proj", "w1"),
               ("down_proj", "w2"), ("up_proj", "w3"), ("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"),
               ("o_proj", "wo"), ("lm_head", "output")]
    main, entropy = {}, {}
    for k, v in hf_sd.items():
        if k == "lm_head.weight":
            main["local_decoder.output.weight"] = v
            continue
        k = k.removeprefix("model.")
        if k == "encoder_hash_tok_embedding.weight":
            main.update({f"encoder_hash_tok_embedding.{i}.weight": c for i, c in enumerate(v.split(buckets))})
            continue
        for a, b in renames:
            k = k.replace(a, b)
        (entropy if k.startswith("patcher.") else main)[k.removeprefix("patcher.")] = v
    return main, entropy


def test_released_sizes_and_meta_format():
    """BLT-1B's sizes in Meta's format (names as in Meta's code, config "args" + entropy params.json) go through
    meta_to_hf and hf_to_ours to blt_1b's config and shapes (on the meta device: no memory)."""
    from blt import blt_1b
    cfg = blt_1b(entropy_threshold=1.335442066192627)
    with torch.device("meta"):
        ours = BLT(cfg)
        main, entropy = _to_meta_names(ours_to_hf(cfg, ours.state_dict())[1], cfg.hash_buckets)
    hf_cfg, hf_sd = meta_to_hf(*_meta_args(cfg), main, entropy)
    back, sd = hf_to_ours(hf_sd, hf_cfg)
    assert back == cfg and back.multiple_of == 256
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in ours.state_dict().items()}
    assert transformers.BltConfig(**hf_cfg).encoder_config.intermediate_size == 2816


def test_cli_converts_transformers_and_meta_folders(tmp_path):
    """python convert.py FOLDER OUT.pt on a saved BltForCausalLM and on a Meta-format folder; sample.py
    loads the result and its logits match the port's."""
    import json

    from safetensors.torch import save_file

    from tools.convert import main
    from sample import load_blt
    hf = _hf_model(CONFIGS["k3_two_hashes_first_layer_only"], 0)  # no GQA: Meta's n_kv_heads covers both local models
    ids, hf_lengths = _tokens(0), _random_hf_lengths(0)
    with torch.no_grad():
        want = hf(input_ids=ids, patch_lengths=hf_lengths, use_cache=False).logits
    hf.save_pretrained(tmp_path / "hf")
    cfg, _ = hf_to_ours(hf.state_dict(), hf.config)
    main_sd, entropy_sd = _to_meta_names(hf.state_dict(), cfg.hash_buckets)
    meta = tmp_path / "meta"
    (meta / "entropy_model").mkdir(parents=True)
    args, params = _meta_args(cfg)
    (meta / "config.json").write_text(json.dumps({"args": args}))
    (meta / "entropy_model" / "params.json").write_text(json.dumps(params))
    save_file({k: v.contiguous() for k, v in main_sd.items()}, meta / "model.safetensors")
    torch.save({"model": entropy_sd}, meta / "entropy_model" / "consolidated.pth")
    for folder in ("hf", "meta"):
        assert main([str(tmp_path / folder), str(tmp_path / f"{folder}.pt")]) == 0
        model = load_blt(str(tmp_path / f"{folder}.pt"))
        assert model.cfg.entropy_threshold == 2.0 and model.cfg.patching == "entropy"
        with torch.no_grad():
            got = model(ids, patch_lengths=hf_patch_lengths_to_ours(hf_lengths, T))
        assert (want - got).abs().max().item() < ATOL, folder


def test_report_largest_difference():
    """Prints the largest logit difference seen by the tests above (run with -s to see it)."""
    if _max_diff["cases"]:
        print(f"\nparity: max |logit diff| {_max_diff['logits']:.2e} over {_max_diff['cases']} comparisons "
              f"({len(CONFIGS)} configs x {len(SEEDS)} seeds)")

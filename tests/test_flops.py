"""FLOPs per byte (paper section 4.5, eqs. 13-17) against a hand computation."""
from blt import BLTConfig, flops_per_byte


def tiny_config():
    # widths chosen so every SwiGLU hidden width is a round number: swiglu(h) = 16 * ceil((8h/3) / 16)
    return BLTConfig(patching="entropy", local_dim=12, local_heads=2, encoder_layers=1, decoder_layers=2,
                     local_window=8, global_dim=24, global_layers=3, global_heads=2, cross_attn_k=2,
                     entropy_dim=6, entropy_layers=1, entropy_heads=1, entropy_window=4, multiple_of=16)


def test_totals_match_hand_computation():
    f = flops_per_byte(tiny_config(), patch_size=4.0, seq_len=64)["forward"]
    # ffn widths: h=12 -> 8*12/3 = 32 -> 32; h=24 -> 64 -> 64
    # global: h=24, l=3, context 64/4 = 16, no head, divided by n_p = 4
    ff, qkvo, att = 2 * 3 * 24 * 64 * 3, 2 * 4 * 24 * 24 * 3, 2 * 2 * 24 * 16 * 3
    assert f["global"] == (ff + qkvo + att) / 4
    # encoder: h=12, l=1, window 8
    assert f["encoder"] == 2 * 3 * 12 * 32 + 2 * 4 * 144 + 2 * 2 * 12 * 8
    # decoder: h=12, l=2, window 8, head to 260 logits
    assert f["decoder"] == 2 * (2 * 3 * 12 * 32 + 2 * 4 * 144 + 2 * 2 * 12 * 8) + 2 * 12 * 260
    # encoder cross-attention, one layer: k/n_p = 0.5 queries per byte (Q, O), 1 key per byte (K, V),
    # each query attends the 4 bytes of its patch
    assert f["encoder_cross_attention"] == 4 * 144 * 0.5 + 4 * 144 * 1 + 4 * 12 * 4 * 0.5
    # decoder cross-attention before both layers: 1 query per byte, k/n_p = 0.5 keys per byte, k = 2 keys
    assert f["decoder_cross_attention"] == 2 * (4 * 144 * 1 + 4 * 144 * 0.5 + 4 * 12 * 2)
    # projections: 12 -> 24 (pool -> k queries), no 24 -> 24 projection (k*h_E == h_G), 24 -> 24 (decoder)
    assert f["projections"] == 2 * (12 * 24 + 24 * 24) / 4


def test_train_is_three_times_forward():
    out = flops_per_byte(tiny_config(), 4.0, 64)
    assert out["train_total"] == 3 * out["forward_total"] == 3 * sum(out["forward"].values())


def test_global_term_falls_as_one_over_patch_size():
    cfg = tiny_config()
    g = {n_p: flops_per_byte(cfg, n_p, seq_len=64)["forward"]["global"] for n_p in (1, 2, 4, 8)}
    # the per-patch cost (matmuls) is fixed and the attention context shrinks too: at least 1/n_p
    for a, b in ((1, 2), (2, 4), (4, 8)):
        assert g[b] <= g[a] * a / b
    # without the attention term, exactly 1/n_p
    no_attention = {n_p: g[n_p] - 2 * 2 * 24 * (64 / n_p) * 3 / n_p for n_p in g}
    assert abs(no_attention[8] * 8 - no_attention[1]) < 1e-6
    # local terms do not depend on the patch size
    assert flops_per_byte(cfg, 2.0, 64)["forward"]["encoder"] == flops_per_byte(cfg, 8.0, 64)["forward"]["encoder"]


def test_blt_training_flops_include_the_entropy_model():
    """A BLT's training compute with its entropy model = 3 x forward per byte + the entropy model's forward over
    every training byte + the entropy model's own training (3 x its forward per byte it trained on)."""
    from blt import blt_training_flops, entropy_training_flops, transformer_flops
    cfg = tiny_config()
    f = flops_per_byte(cfg, 4.0, 64)
    # the entropy model: h=6, 1 layer, window 4, head to 260 logits; swiglu(6) = 16
    entropy = 2 * 3 * 6 * 16 + 2 * 4 * 36 + 2 * 2 * 6 * 4 + 2 * 6 * 260
    assert f["entropy_model_forward"] == entropy == transformer_flops(6, 1, 4, 260, 16)
    assert f["forward_total_with_entropy"] == f["forward_total"] + entropy
    assert f["train_total_with_entropy"] == 3 * f["forward_total"] + entropy
    run = blt_training_flops(cfg, 4.0, 64, bytes_seen=1000, entropy_bytes_seen=300)
    assert run["without_entropy"] == 1000 * f["train_total"]
    assert run["with_entropy"] == 1000 * (3 * f["forward_total"] + entropy) + 300 * 3 * entropy
    assert entropy_training_flops(cfg, 300, 64) == 300 * 3 * entropy
    space = BLTConfig(**{**cfg.to_dict(), "patching": "space"})  # no entropy model, nothing to add
    assert blt_training_flops(space, 4.0, 64, 1000, 300)["entropy"] == 0

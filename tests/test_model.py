"""Invariants of the whole model: causality for every patching scheme, padding, memorisation, bf16. The tests
marked lesson6 grade lesson 6 (exercises.md, `python -m pytest -m lesson6`), with the decoder's tests in
tests/test_decoder.py: they run the whole model, so they need lessons 1-6."""
import pytest
import torch

import blt as blt_module
from blt import BLT, BLTConfig, SCHEMES
from patching import calibrate_threshold, patch_ids_from_lengths, tokenize

TEXT = "The quick brown fox, naïve café — 東京 1999! jumps over   the lazy dog... " * 2


def small_config(scheme: str, **overrides) -> BLTConfig:
    base = dict(patching=scheme, patch_size=3, entropy_dim=32, entropy_layers=1, entropy_heads=2,
                entropy_window=16, local_dim=32, local_heads=2, encoder_layers=1, decoder_layers=2,
                local_window=16, hash_buckets=64, global_dim=48, global_layers=2, global_heads=2,
                multiple_of=16)
    return BLTConfig(**{**base, **overrides})


def make_model(scheme: str, seed: int = 0, **overrides) -> BLT:
    """A random tiny BLT whose entropy model gives varied entropies and a calibrated threshold, so that
    entropy patches differ from byte to byte."""
    torch.manual_seed(seed)
    model = BLT(small_config(scheme, **overrides)).eval()
    if model.entropy_model is not None:
        with torch.no_grad():
            model.entropy_model.output.weight.mul_(100)  # sharper, more varied next-byte distributions
        tokens = torch.randint(4, 260, (4, 128))
        H = model.entropy_model.entropies(tokens)
        model.cfg.entropy_threshold = calibrate_threshold(H, 3.0, monotonic=scheme == "monotonic")
    return model


def causality_leak(model: BLT, tokens: torch.Tensor, seed: int = 0) -> float:
    """Largest change of logits at positions < j when byte j changes, over every j >= 1."""
    g = torch.Generator().manual_seed(seed)
    base = model(tokens)
    leak = 0.0
    for j in range(1, tokens.shape[1]):
        perturbed = tokens.clone()
        perturbed[0, j] = 4 + (tokens[0, j] - 4 + torch.randint(1, 256, (1,), generator=g)) % 256
        logits = model(perturbed)
        leak = max(leak, (logits[:, :j] - base[:, :j]).abs().max().item())
    return leak


@pytest.fixture(scope="module")
def tokens():
    return torch.tensor([tokenize(TEXT.encode())[:72]])


@pytest.mark.lesson6
@pytest.mark.parametrize("scheme", SCHEMES)
@torch.no_grad()
def test_causality(scheme, tokens):
    model = make_model(scheme)
    lengths = model.patch(tokens)
    assert 4 < (lengths > 0).sum() < tokens.shape[1]  # real patching, neither one patch nor one per byte
    assert causality_leak(model, tokens) <= 1e-5


@pytest.mark.lesson6
@pytest.mark.parametrize("scheme", SCHEMES)
@torch.no_grad()
def test_causality_fails_without_decoder_shift(scheme, tokens, monkeypatch):
    """The test above must be able to fail: read the patch holding byte i (no one-patch shift) instead of
    the previous complete one, and future bytes leak through the global model."""
    model = make_model(scheme)
    monkeypatch.setattr(blt_module, "decoder_patch_ids", patch_ids_from_lengths)
    assert causality_leak(model, tokens) > 1e-3


@pytest.mark.lesson6
@torch.no_grad()
def test_perturbation_reaches_later_positions(tokens):
    model = make_model("entropy")
    perturbed = tokens.clone()
    perturbed[0, 30] = 4 + ord("#")
    diff = (model(perturbed) - model(tokens)).abs().amax(-1)[0]
    assert diff[30:].max() > 1e-3  # the byte matters to its own and later predictions


@pytest.mark.lesson6
@torch.no_grad()
def test_padded_rows_do_not_change_other_rows():
    model = make_model("strided")
    torch.manual_seed(1)
    tokens = torch.randint(4, 260, (2, 40))
    many = torch.tensor([[1] + [2] * 20])  # 41 = 40 bytes + slot
    few = torch.tensor([[1, 8, 8, 8, 8, 8]])
    padded_few = torch.cat([few, torch.zeros(1, 15, dtype=torch.long)], dim=1)  # right padding
    batch = model(tokens, patch_lengths=torch.cat([many, padded_few]))
    alone0 = model(tokens[:1], patch_lengths=many)
    alone1 = model(tokens[1:], patch_lengths=few)
    assert torch.allclose(batch[0], alone0[0], atol=1e-5)
    assert torch.allclose(batch[1], alone1[0], atol=1e-5)


@pytest.mark.lesson6
@torch.no_grad()
def test_rows_with_different_patch_counts_from_patcher():
    model = make_model("space")
    rows = [tokenize(b"a b c d e f g h i j k l"), tokenize(b"abcdefghijklmnopqrstuvw")]
    tokens = torch.tensor(rows)
    lengths = model.patch(tokens)
    assert (lengths[1] == 0).any()  # the second row has fewer patches and is padded
    batch = model(tokens)
    for b in range(2):
        assert torch.allclose(batch[b], model(tokens[b:b + 1])[0], atol=1e-5)


def test_memorises_short_text():
    torch.manual_seed(0)
    model = BLT(small_config("space", global_dim=64, local_dim=64, local_heads=4))
    data = torch.tensor([tokenize(b"Byte Latent Transformer: patches scale better than tokens.")])
    x, y = data[:, :-1], data[:, 1:]
    lengths = model.patch(x)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(300):
        _, loss = model(x, y, patch_lengths=lengths)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()


@pytest.mark.parametrize("scheme", ["strided", "entropy"])
def test_bf16_autocast_forward_backward(scheme, tokens):
    model = make_model(scheme)
    x, y = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        _, loss32 = model(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss16 = model(x, y)
    assert logits.dtype == torch.bfloat16
    loss16.backward()
    assert abs(loss16.item() - loss32.item()) < 0.05
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads if g is not None)
    assert all(p.grad is None for p in (model.entropy_model.parameters() if model.entropy_model else []))


def test_config_round_trip_and_errors():
    cfg = small_config("monotonic", entropy_threshold=0.5)
    assert BLTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown patching scheme"):
        BLTConfig(patching="bpe")
    with pytest.raises(ValueError, match="unknown fields"):
        BLTConfig.from_dict({**cfg.to_dict(), "attention_bias": True})


def test_dropout_acts_in_training_only():
    """dropout > 0 perturbs a training forward; in eval mode the model equals the same weights without
    dropout (so generation, parity and the released weights are unaffected)."""
    torch.manual_seed(0)
    with_dropout = BLT(small_config("strided", dropout=0.3))
    plain = BLT(small_config("strided"))
    plain.load_state_dict(with_dropout.state_dict())  # dropout adds no weights
    tokens = torch.randint(4, 260, (2, 40))
    lengths = with_dropout.patch(tokens)
    with_dropout.train()
    a, b = with_dropout(tokens, patch_lengths=lengths), with_dropout(tokens, patch_lengths=lengths)
    assert (a - b).abs().max() > 1e-3
    with_dropout.eval()
    plain.eval()
    torch.testing.assert_close(with_dropout(tokens, patch_lengths=lengths), plain(tokens, patch_lengths=lengths))

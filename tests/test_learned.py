"""Learned boundaries (dynamic_chunking.py, learned.py): the smoothing against its loop definition, the ratio
loss on hand cases, the straight-through gradient, causality at every position (and that the check catches a
byte reading a later chunk), incremental generation against naive recomputation, FLOPs, and train.py ->
sample.py end to end."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dynamic_chunking
from blt import BLTConfig, build_model, flops_per_byte
from dynamic_chunking import (chunk_ids, ratio_loss, select, smooth, smooth_loop, straight_through_ones,
                              upsample)
from learned import IncrementalLearnedBLT, LearnedBLT
from patching import tokenize
from sample import generate

REPO = Path(__file__).resolve().parent.parent
TEXT = ("To be, or not to be, that is the question: naïve café — 東京 1999! "
        "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune...").encode()


def make_model(seed: int = 0, **overrides) -> LearnedBLT:
    """A random tiny model whose router cuts neither every byte nor none (random W_q, W_k instead of the
    identity, so that neighbouring states compare in varied directions)."""
    base = dict(patching="learned", patch_size=3, local_dim=32, local_heads=2, encoder_layers=1, decoder_layers=2,
                local_window=16, hash_buckets=64, global_dim=48, global_layers=2, global_heads=2, multiple_of=16)
    torch.manual_seed(seed)
    model = build_model(BLTConfig(**{**base, **overrides}))
    with torch.no_grad():
        for w in (model.chunking.router.wq.weight, model.chunking.router.wk.weight):
            w.normal_(0, 0.2)
        model.chunking.residual.weight.normal_(0, 0.02)  # zero at initialisation: give the byte path a value
    return model.eval()


# ---- the mechanism ----

def test_select_and_chunk_ids_worked_example():
    b = torch.tensor([[1, 0, 0, 1, 0, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    assert chunk_ids(b).tolist() == [[0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 1, 1]]
    x = torch.arange(12.0).view(2, 6, 1)
    chunks, starts, real = select(x, b, pad_to=4)
    assert starts.tolist() == [[0, 3, 5, 0], [0, 1, 0, 0]]
    assert chunks[..., 0].tolist() == [[0, 3, 5, 0], [6, 7, 6, 6]]
    assert real.tolist() == [[True, True, True, False], [True, True, False, False]]


@pytest.mark.parametrize("extreme", [False, True])
def test_smoothing_equals_its_loop_definition(extreme):
    torch.manual_seed(0)
    z = torch.randn(3, 40, 8)
    P = torch.rand(3, 40)
    if extreme:  # long runs of the clamp's ends: products of many (1 - P) near 1 or near 0
        P = torch.where(P > 0.5, 1 - 1e-4, 1e-4)
    assert torch.allclose(smooth(z, P), smooth_loop(z, P), atol=1e-5, rtol=1e-4)
    # zbar_0 = P_0 z_0, and a confident boundary (P = 1 - eps) keeps almost only its own output
    assert torch.allclose(smooth(z, P)[:, 0], P[:, :1] * z[:, 0], atol=1e-6)


def test_ratio_loss_hand_cases():
    def loss(F, G, N):  # F, G in [0, 1] with 100 bytes; p constant = G
        b = torch.arange(100) < round(F * 100)
        return float(ratio_loss(b[None], torch.full((1, 100), G), N))
    assert loss(0.5, 0.5, 2) == pytest.approx(1.0)  # 2 * (1 * .25 + .25)
    assert loss(1.0, 1.0, 2) == pytest.approx(2.0)  # every byte a boundary: 2 * (1 + 0)
    assert loss(0.0, 0.0, 2) == pytest.approx(2.0)  # none: 2 * (0 + 1)
    assert loss(0.25, 0.25, 4) == pytest.approx(1.0)  # F = G = 1/N gives 1 ...
    for x in (0.1, 0.2, 0.3, 0.5, 0.9):  # ... the minimum along F = G
        assert loss(x, x, 4) > 1.0
    # with F fixed, G's gradient pushes the rate toward 1/N: none at F = 1/N, down above it, up below it
    for F, sign in ((0.25, 0), (0.5, 1), (0.1, -1)):
        b = (torch.arange(100) < round(F * 100))[None]
        p = torch.full((1, 100), 0.3, requires_grad=True)
        ratio_loss(b, p, 4).backward()
        g = float(p.grad.sum())
        assert (abs(g) < 1e-6) if sign == 0 else (g * sign > 0)


def test_ratio_loss_ignores_padding():
    b = torch.tensor([[1, 0, 0, 0, 1, 1]], dtype=torch.bool)
    p = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.9, 0.9]])
    real = torch.tensor([[1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    assert float(ratio_loss(b, p, 4, real)) == pytest.approx(1.0)  # on the real bytes F = G = 1/4


def test_straight_through_confidence_reaches_the_router():
    """The value is exactly the gathered chunk output; p gets a gradient at every byte, also at bytes that are
    not boundaries (whose p enters nowhere else: not the selection, not the smoothing)."""
    torch.manual_seed(0)
    p = torch.rand(2, 10, requires_grad=True)
    b = torch.zeros(2, 10, dtype=torch.bool)
    b[:, [0, 4, 7]] = True
    zbar = torch.randn(2, 3, 5)
    out = upsample(zbar, b, p)
    assert torch.equal(out, zbar.gather(1, chunk_ids(b)[..., None].expand(2, 10, 5)))  # forward value 1
    assert torch.equal(straight_through_ones(torch.rand(7)), torch.ones(7))
    (out * torch.randn_like(out)).sum().backward()
    assert (p.grad.abs() > 0).all()


def test_router_learns_from_the_next_byte_loss_alone():
    """With alpha = 0 only the next-byte loss trains the router: through the smoothing and the STE."""
    model = make_model(ratio_loss_weight=0.0).train()
    tokens = torch.tensor([tokenize(TEXT)[:64]])
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    assert model.chunking.router.wq.weight.grad.abs().sum() > 0
    assert model.chunking.router.wk.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_loss_value_is_next_byte_loss_gradient_includes_ratio(alpha):
    """The logged loss is the next-byte loss alone; the ratio loss adds alpha times its gradient."""
    model = make_model(ratio_loss_weight=alpha).train()
    tokens = torch.tensor([tokenize(TEXT)[:64]])
    logits, loss = model(tokens[:, :-1], tokens[:, 1:])
    ce = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), tokens[0, 1:])
    assert loss.item() == pytest.approx(ce.item(), abs=1e-6)
    wq = model.chunking.router.wq.weight
    total, = torch.autograd.grad(loss, wq, retain_graph=True)
    next_byte, = torch.autograd.grad(ce, wq)
    differs = (total - next_byte).abs().max() > 1e-6
    assert differs == (alpha > 0)


# ---- causality ----

def leaks(model: LearnedBLT, tokens: torch.Tensor) -> tuple[float, int, int]:
    """Change byte j, for every j >= 1, all in one batch. Returns (largest change of logits at positions < j,
    how many changes moved a boundary at or after j, how many moved a boundary before j)."""
    T = tokens.shape[1]
    rows = tokens.repeat(T, 1)  # row j perturbs byte j (row 0 is the original)
    for j in range(1, T):
        rows[j, j] = 4 + (int(rows[j, j]) - 4 + 101) % 256
    logits = model(rows)
    b = model.boundaries(rows)
    leak, moved, moved_before = 0.0, 0, 0
    for j in range(1, T):
        leak = max(leak, float((logits[j, :j] - logits[0, :j]).abs().max()))
        moved += bool((b[j, j:] != b[0, j:]).any())
        moved_before += bool((b[j, :j] != b[0, :j]).any())
    return leak, moved, moved_before


@torch.no_grad()
def test_causality_at_every_position():
    model = make_model()
    tokens = torch.tensor([tokenize(TEXT)[:72]])
    b = model.boundaries(tokens)
    assert 6 < int(b.sum()) < tokens.shape[1] - 6  # real chunking: neither one chunk nor one per byte
    leak, moved, moved_before = leaks(model, tokens)
    assert leak <= 1e-5
    assert moved > 10  # perturbing a byte often moves boundaries (its own and the next) ...
    assert moved_before == 0  # ... but never one before it


@torch.no_grad()
def test_causality_check_fails_when_a_byte_reads_a_later_chunk(monkeypatch):
    """The test above must be able to fail: let byte t read the chunk of byte t+1 (when t+1 starts a chunk,
    that chunk's vector is the encoder state of the very byte being predicted)."""
    def upsample_reading_next_chunk(zbar, b, p):
        ids = chunk_ids(b)
        ids = torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)  # the chunk of byte t+1
        out = zbar.gather(1, ids[..., None].expand(*ids.shape, zbar.shape[-1]))
        return out * straight_through_ones(torch.maximum(p, 1 - p))[..., None]
    monkeypatch.setattr(dynamic_chunking, "upsample", upsample_reading_next_chunk)
    leak, _, _ = leaks(make_model(), torch.tensor([tokenize(TEXT)[:72]]))
    assert leak > 1e-3


@torch.no_grad()
def test_rows_with_different_chunk_counts_match_alone():
    model = make_model()
    a = torch.tensor([tokenize(TEXT)[:50]])
    b = torch.tensor([tokenize(TEXT[60:])[:50]])
    batch = model(torch.cat([a, b]))
    assert model.boundaries(a).sum() != model.boundaries(b).sum()  # padded chunks in the batch
    assert torch.allclose(batch[0], model(a)[0], atol=1e-5)
    assert torch.allclose(batch[1], model(b)[0], atol=1e-5)


# ---- generation ----

@torch.no_grad()
def test_incremental_equals_naive():
    model = make_model(local_window=8)  # a window smaller than the text: the ring buffers wrap
    tokens = torch.tensor([tokenize(TEXT)] * 2)
    tokens[1, 40] = 4 + ord("X")  # rows differ, so their boundaries differ
    T = tokens.shape[1]
    state = IncrementalLearnedBLT(model, batch_size=2, capacity=16)  # small: the buffers double on the way
    incremental = torch.stack([state.step(tokens[:, t]) for t in range(T)], dim=1)  # (B, T, V)
    full = model(tokens)
    assert (incremental - full).abs().max() < 1e-4
    assert torch.equal(state.is_start[:, :T], model.boundaries(tokens))  # each boundary decided as its byte came
    assert not torch.equal(state.is_start[0, :T], state.is_start[1, :T])
    for t in range(0, T, 37):  # and the naive per-prefix recomputation itself
        assert (incremental[:, t] - model(tokens[:, :t + 1])[:, -1]).abs().max() < 1e-4
    assert state.global_steps == int(model.boundaries(tokens).sum())  # one global step per chunk


@torch.no_grad()
def test_generate_incremental_equals_naive():
    model = make_model()
    fast, state = generate(model, b"To be", 40, batch_size=2, temperature=1.0, seed=3, stop_at_eos=False)
    slow, _ = generate(model, b"To be", 40, batch_size=2, temperature=1.0, seed=3, stop_at_eos=False, naive=True)
    assert isinstance(state, IncrementalLearnedBLT)
    assert torch.equal(fast, slow)


# ---- FLOPs, and train.py -> sample.py ----

def test_flops_per_byte_from_the_realised_chunk_size():
    cfg = make_model().cfg
    f2, f8 = flops_per_byte(cfg, 2.0, 64)["forward"], flops_per_byte(cfg, 8.0, 64)["forward"]
    assert "decoder_cross_attention" not in f2 and f2["router"] > 0
    assert f2["global"] > 4 * f8["global"]  # 1/n_p per byte, and a shorter context of chunks
    assert f2["encoder"] == f8["encoder"] and f2["decoder"] == f8["decoder"]


def test_train_resume_and_sample(tmp_path):
    corpus = tmp_path / "text.txt"
    corpus.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(200)))
    out = tmp_path / "run"
    tiny = ["--data", str(corpus), "--out", str(out), "--patching", "learned", "--patch-size", "4", "--seq-len", "32",
            "--batch-size", "4", "--eval-interval", "3", "--eval-bytes", "256", "--final-eval-bytes", "512",
            "--log-interval", "1", "--config", "local_dim=32", "--config", "local_heads=2", "--config",
            "decoder_layers=1", "--config", "global_dim=64", "--config", "global_layers=1", "--config",
            "global_heads=2", "--config", "hash_buckets=64", "--config", "multiple_of=16", "--preset", "smoke"]
    def run(*flags):
        return subprocess.run([sys.executable, str(REPO / "train.py"), *tiny, *flags], capture_output=True,
                              text=True, cwd=REPO, timeout=120)
    stopped = run("--steps", "6", "--stop-at", "3")
    assert "continue with --resume" in stopped.stderr, stopped.stderr
    done = run("--steps", "6", "--resume")
    assert done.returncode == 0, done.stderr
    assert "bytes per chunk (learned)" in done.stderr + done.stdout
    log = [json.loads(line) for line in (out / "blt_learned.jsonl").read_text().splitlines()]
    train_records = [r for r in log if r["type"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5, 6]
    assert all(r["bytes_per_chunk"] >= 1 and r["ratio_loss"] > 0 for r in train_records)
    final = [r for r in log if r["type"] == "eval"][-1]
    assert final["patch_size"] >= 1 and final["train_flops_per_byte"] > 0
    sample = subprocess.run([sys.executable, str(REPO / "sample.py"), "--checkpoint", str(out / "blt_learned.pt"),
                             "--prompt", "Line", "--max-bytes", "20", "--show-patches", "--temperature", "0"],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.replace("|", "").startswith("Line")  # the prompt, with the chunk starts marked
    assert "global steps per byte" in sample.stderr


def test_outer_lr_multiplier_scales_the_outer_stage_step():
    """AdamW's first step moves every weight by about lr (m / sqrt(v) = +-1): the outer stage's by lr x 3."""
    from train import TrainConfig, make_optimizer
    model = make_model().train()
    tc = TrainConfig(lr=1e-3, weight_decay=0.0, outer_lr_multiplier=3.0)
    optimizer = make_optimizer(model, tc, torch.device("cpu"))
    tokens = torch.tensor([tokenize(TEXT)[:64]])
    model(tokens[:, :-1], tokens[:, 1:])[1].backward()
    outer, inner = model.decoder.output.weight, model.global_transformer.layers[0].attention.wq.weight
    before = outer.detach().clone(), inner.detach().clone()
    for group in optimizer.param_groups:
        group["lr"] = tc.lr  # as train_loop sets it every step
    optimizer.step()
    assert float((outer.detach() - before[0]).abs().max()) == pytest.approx(3e-3, rel=1e-3)
    assert float((inner.detach() - before[1]).abs().max()) == pytest.approx(1e-3, rel=1e-3)

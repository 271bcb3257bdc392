"""Incremental generation equals naive recomputation, for every patching scheme, for the byte-level model and for
the BPE token model."""
import pytest
import torch

from entropy_model import ByteLMConfig
from patching import tokenize
from sample import IncrementalBLT, IncrementalByteLM, generate, generate_tokens, naive_logits
from test_model import make_model
from tokens import TokenLMConfig, TokenSetup, train_bpe

TEXT = ("To be, or not to be, that is the question: naïve café — 東京 1999! "
        "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune, "
        "or to take arms against a sea of troubles...") .encode()


@pytest.mark.parametrize("scheme,max_len", [("strided", None), ("space", None), ("entropy", None),
                                            ("monotonic", None), ("entropy", 5)])
@torch.no_grad()
def test_incremental_equals_naive(scheme, max_len):
    model = make_model(scheme, max_patch_length=max_len)
    tokens = torch.tensor([tokenize(TEXT)] * 2)
    tokens[1, 100] = 4 + ord("X")  # rows differ, so their patch boundaries differ
    T = tokens.shape[1]
    assert T > 200
    state = IncrementalBLT(model, batch_size=2)
    incremental = torch.stack([state.step(tokens[:, t]) for t in range(T)], dim=1)  # (B, T, V)
    full = model(tokens)  # one full forward: logits at t equal the naive prefix forward (causality)
    assert (incremental - full).abs().max() < 1e-4
    for t in range(0, T, 23):  # and the naive per-prefix recomputation itself
        assert (incremental[:, t] - naive_logits(model, tokens[:, :t + 1])).abs().max() < 1e-4
    # the global model ran once per complete patch, per row: every patch but the last (it holds the slot)
    assert state.n_patches == [int((model.patch(tokens[b:b + 1]) > 0).sum()) - 1 for b in range(2)]
    assert state.global_steps == sum(state.n_patches)


@pytest.mark.parametrize("scheme", ["entropy", "space"])
@torch.no_grad()
def test_rows_that_complete_patches_together_and_growing_buffers(scheme):
    """Three different rows (their patches close at the same byte or not, so the global model runs for any
    subset of them at once), and buffers allocated for 8 positions that have to grow."""
    model = make_model(scheme, max_patch_length=4 if scheme == "entropy" else None)
    g = torch.Generator().manual_seed(0)
    tokens = torch.tensor([tokenize(TEXT[:120])] * 3)
    tokens[1, 40:] = torch.randint(4, 260, (tokens.shape[1] - 40,), generator=g)
    tokens[2, 1:] = torch.randint(4, 260, (tokens.shape[1] - 1,), generator=g)
    state = IncrementalBLT(model, batch_size=3, capacity=8)
    incremental = torch.stack([state.step(tokens[:, t]) for t in range(tokens.shape[1])], dim=1)
    assert (incremental - model(tokens)).abs().max() < 1e-4
    lengths = model.patch(tokens)
    assert state.n_patches == [int((lengths[b] > 0).sum()) - 1 for b in range(3)]
    starts = torch.stack(state.starts, dim=1)  # (B, T): does t+1 start a patch
    assert [int(s.sum()) + 1 for s in starts] == [int((row > 0).sum()) for row in lengths]


@pytest.mark.parametrize("one_table", [True, False])
@torch.no_grad()
def test_newest_byte_embedding_equals_the_encoders(one_table, monkeypatch):
    """One hash_ngram_ids call per hash function, n-grams padded with zeros, equals encoder.embed at the last
    position; with the tables copied end to end into one, or looked up one by one (large tables)."""
    from incremental import NewestByteEmbedding
    if not one_table:
        monkeypatch.setattr(NewestByteEmbedding, "ONE_TABLE", 0)
    model = make_model("space", hash_functions=2, hash_ngram_sizes=(2, 3, 5))
    embed = NewestByteEmbedding(model.encoder)
    assert (embed.table is not None) == one_table
    tokens = torch.randint(0, 260, (3, 12), generator=torch.Generator().manual_seed(0))
    want = model.encoder.embed(tokens)  # (B, T, D)
    for t in range(12):
        window = torch.nn.functional.pad(tokens[:, max(0, t - 4):t + 1], (max(0, 4 - t), 0))  # last 5 ids
        assert (embed(window) - want[:, t]).abs().max() < 1e-5


@pytest.mark.parametrize("window", [None, 7])
@torch.no_grad()
def test_byte_model_incremental_equals_naive(window):
    """The byte-level baseline (train.py --model byte) with KV caches: the same logits as recomputing."""
    torch.manual_seed(0)
    model = ByteLMConfig(dim=32, layers=2, heads=2, window=window, multiple_of=16).build().eval()
    tokens = torch.tensor([tokenize(TEXT[:100])] * 2)
    tokens[1, 30] = 4 + ord("X")
    state = IncrementalByteLM(model, batch_size=2, capacity=8)
    incremental = torch.stack([state.step(tokens[:, t]) for t in range(tokens.shape[1])], dim=1)
    assert (incremental - model(tokens)).abs().max() < 1e-4
    for t in range(0, tokens.shape[1], 17):
        assert (incremental[:, t] - naive_logits(model, tokens[:, :t + 1])).abs().max() < 1e-4
    a, _ = generate(model, b"Hello", 30, temperature=0)
    b, _ = generate(model, b"Hello", 30, temperature=0, naive=True)
    assert torch.equal(a, b) and a.shape == (1, 6 + 30)


def bpe_model(window=None):
    """A random tiny BPE token model with a tokenizer trained on TEXT (model.tokens, as load_checkpoint sets)."""
    torch.manual_seed(0)
    tok = train_bpe(TEXT * 4, 300)
    model = TokenLMConfig(vocab_size=tok.vocab_size, dim=32, layers=2, heads=2, window=window, multiple_of=16).build()
    model.tokens = TokenSetup(tok, 16, 2.0)
    return model.eval()


@pytest.mark.parametrize("window", [None, 5])
@torch.no_grad()
def test_bpe_model_incremental_equals_naive(window):
    """The token model one cached step per token: the logits of a full forward, and the same samples."""
    model = bpe_model(window)
    ids = torch.tensor([[0, *model.tokens.tokenizer.encode(TEXT[:120]).tolist()]] * 2)
    state = IncrementalByteLM(model, batch_size=2, capacity=8)
    incremental = torch.stack([state.step(ids[:, t]) for t in range(ids.shape[1])], dim=1)
    assert (incremental - model(ids)).abs().max() < 1e-4
    for kwargs in (dict(temperature=0), dict(temperature=1.0, top_k=50, seed=3, batch_size=3)):
        a, state = generate_tokens(model, b"To be", 60, **kwargs)
        b, none = generate_tokens(model, b"To be", 60, naive=True, **kwargs)
        assert torch.equal(a, b) and state is not None and none is None
        tok = model.tokens.tokenizer
        assert a[0, 0] == tok.bos_id and (a[:, 1:] != tok.bos_id).all()  # BOS is never sampled
        rows = a.tolist()  # every row spells at least 60 bytes after the prompt; one token less, some row would not
        assert all(tok.decode(row).startswith(b"To be") and len(tok.decode(row)) >= 5 + 60 for row in rows)
        assert min(len(tok.decode(row[:-1])) for row in rows) < 5 + 60


def test_greedy_is_deterministic_and_matches_naive():
    model = make_model("entropy")
    a, _ = generate(model, b"Hello", 40, temperature=0)
    b, _ = generate(model, b"Hello", 40, temperature=0)
    c, _ = generate(model, b"Hello", 40, temperature=0, naive=True)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_seeded_sampling_and_batch():
    model = make_model("space")
    a, _ = generate(model, b"Hi", 30, batch_size=3, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    b, _ = generate(model, b"Hi", 30, batch_size=3, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    assert torch.equal(a, b) and a.shape == (3, 3 + 30)
    assert not torch.equal(a[0], a[1])  # rows are independent samples


def test_invalid_utf8_prompt():
    model = make_model("space")
    prompt = b"caf\xc3\xa9 \xff\xfe broken \xe6\x9d"  # valid multi-byte, invalid bytes, truncated character
    out, _ = generate(model, prompt, 10, temperature=0)
    assert out[0, 1:1 + len(prompt)].tolist() == [b + 4 for b in prompt]


def run_cli(*args, stdin=None):
    import subprocess
    import sys
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, os.path.join(root, "sample.py"), *args], input=stdin,
                          capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = make_model("entropy")
    path = tmp_path_factory.mktemp("ckpt") / "blt.pt"
    torch.save({"format": 1, "kind": "blt", "config": model.cfg.to_dict(), "model": model.state_dict(), "step": 0}, path)
    return path


def test_cli_generates_from_prompt_file_with_invalid_utf8(checkpoint, tmp_path):
    prompt = tmp_path / "prompt.bin"
    prompt.write_bytes(b"na\xc3\xafve \xff\xfe \xe6\x9d")
    r = run_cli("--checkpoint", str(checkpoint), "--prompt-file", str(prompt), "--max-bytes", "20",
                "--temperature", "0", "--plot", str(tmp_path / "entropy.png"))
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode("utf-8").startswith("naïve \ufffd\ufffd")
    assert (tmp_path / "entropy.png").stat().st_size > 1000


def test_cli_generates_from_a_byte_model(tmp_path):
    torch.manual_seed(0)
    cfg = ByteLMConfig(dim=32, layers=2, heads=2, multiple_of=16)
    path = tmp_path / "byte.pt"
    torch.save({"format": 1, "kind": "byte", "config": vars(cfg), "model": cfg.build().state_dict()}, path)
    r = run_cli("--checkpoint", str(path), "--prompt", "Hi", "--max-bytes", "12", "--temperature", "0")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.startswith(b"Hi") and b"12 bytes x 1" in r.stderr and b"global steps" not in r.stderr
    r = run_cli("--checkpoint", str(path), "--prompt", "Hi", "--show-patches")
    assert r.returncode == 1
    assert r.stderr.decode().strip() == (f"error: --show-patches needs a BLT (or a BPE model, for its tokens); {path} "
                                         f"holds a byte-level model (one byte per step)")


def test_cli_missing_and_mismatched_checkpoint(checkpoint, tmp_path):
    r = run_cli("--checkpoint", str(tmp_path / "nope.pt"), "--prompt", "hi")
    assert r.returncode != 0 and r.stderr.decode().strip() == f"error: no checkpoint at {tmp_path / 'nope.pt'}"
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["config"]["local_dim"] = 64  # weights from another config
    torch.save(ckpt, tmp_path / "other.pt")
    r = run_cli("--checkpoint", str(tmp_path / "other.pt"), "--prompt", "hi")
    err = r.stderr.decode().strip()
    assert r.returncode != 0 and "weights do not fit the config" in err and len(err.splitlines()) == 1
    assert "Traceback" not in err


def test_show_patches_marks_every_patch_start():
    from sample import show_patches
    ids = tokenize("to be or".encode())
    starts = [True, True, False, False, True, False, False, True, False]  # BOS | "to " | "be " | "or"
    assert show_patches(ids, starts, colour=False) == "to |be |or"
    coloured = show_patches(ids, starts, colour=True)
    assert coloured.count("\033[0m") == 3 and "to " in coloured and "or" in coloured

"""The BPE baseline (tokens.py): lossless byte-level BPE, token LM, bits per byte and FLOPs per byte."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import tokens
from tokens import (ByteBPE, TokenLMConfig, TokenSplit, bytes_per_token, cached_bpe, eval_token_windows,
                    evaluate_bpb, get_token_batch, token_flops_per_byte, tokenize_split, train_bpe)

from test_train import TINY_TRAINING, records
from test_train import corpus_file  # noqa: F401  (a pytest fixture)

WORDS = ("the", "king", "queen", "shall", "not", "thou", "art", "my", "lord", "what", "is", "love", "'s",
         "and", "to", "be", "or", "it", "that", "in", "O", ",", ".", "!", "?", ";", "1599")
SEPARATORS = (" ", " ", " ", " ", "  ", "\n", "\n\n", " \n", ".\n")


def small_text(n_words: int = 3000, seed: int = 0) -> bytes:
    """A few kB of Shakespeare-flavoured text with newlines, double spaces and punctuation."""
    rng = np.random.default_rng(seed)
    words, seps = rng.choice(len(WORDS), size=n_words), rng.choice(len(SEPARATORS), size=n_words)
    return "".join(WORDS[i] + SEPARATORS[j] for i, j in zip(words, seps)).encode()


@pytest.fixture(scope="module")
def tok() -> ByteBPE:
    return train_bpe(small_text(), 320)


# ---- lossless, deterministic tokenizer ----

@pytest.mark.parametrize("seed", range(4))
def test_round_trip_random_bytes(tok, seed):
    rng = np.random.default_rng(seed)
    for n in (0, 1, 2, 3, 17, 255, 256, 1000, int(rng.integers(0, 2001)), 2000):
        data = rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()
        ids = tok.encode(data)
        assert ids.dtype == np.int32 and tok.decode(ids) == data
        assert tok.bos_id not in ids


def test_round_trip_invalid_utf8_and_text_spelling_bos(tok):
    for data in (b"\xff\xfe\xc3\x28\xa0\xa1\xe2\x28\xa1\xf0\x28\x8c\xbc\x80", b"\x00\x00\n\r\n\t \x85\xa0",
                 b"<bos>", b"the <bos> king\xff<bos>", "caf\u00e9 \u2603 na\u00efve".encode()):
        ids = tok.encode(data)
        assert tok.decode(ids) == data
        assert tok.bos_id not in ids  # text that spells "<bos>" is text, not the BOS token


def test_every_single_byte_is_one_token(tok):
    assert tok.bos_id == 0 and tok.token_bytes[0] == b""
    for b in range(256):
        ids = tok.encode(bytes([b]))
        assert list(ids) == [b + 1] and tok.token_bytes[b + 1] == bytes([b])  # the documented id layout


def test_merges_are_learned_and_shorten_text(tok):
    text = small_text(seed=1)
    assert tok.vocab_size == 320
    assert all(len(tok.token_bytes[i]) >= 2 for i in range(257, tok.vocab_size))
    assert bytes_per_token(tok, text) > 1.5


def test_chunked_encoding_equals_whole_text(tok, monkeypatch):
    text = small_text(seed=2) + b"\n \nx \n\ny\n's\n\n\nz" + bytes(range(256))
    whole = tok.encode(text)  # CHUNK_BYTES is far larger than the text: one chunk
    monkeypatch.setattr(tokens, "CHUNK_BYTES", 16)
    assert len(tokens._text_chunks(text, 16)) > 100
    assert np.array_equal(tok.encode(text), whole)
    # training on many chunks learns the same merges as training on one
    assert train_bpe(small_text(), 320).to_str() == tok.to_str()


def test_training_is_deterministic(tok):
    again = train_bpe(small_text(), 320)
    assert again.to_str() == tok.to_str()
    data = small_text(seed=3)
    assert np.array_equal(again.encode(data), tok.encode(data))


def test_save_load(tok, tmp_path):
    tok.save(tmp_path / "bpe.json")
    loaded = ByteBPE.load(tmp_path / "bpe.json")
    assert loaded.to_str() == tok.to_str() and loaded.token_bytes == tok.token_bytes
    data = small_text(seed=4) + b"<bos>\xff"
    assert np.array_equal(loaded.encode(data), tok.encode(data))
    assert tok.bos_id not in loaded.encode(b"<bos>")


def test_cache_is_reused_and_keyed(tmp_path, monkeypatch):
    train = np.frombuffer(small_text(), dtype=np.uint8)  # a split as data.load_corpus gives it
    first = cached_bpe(train, 300, tmp_path)
    assert len(list(tmp_path.glob("bpe-300-*.json"))) == 1

    def no_training(*args):
        raise AssertionError("trained again despite a cached tokenizer")
    monkeypatch.setattr(tokens, "train_bpe", no_training)
    assert cached_bpe(train.tobytes(), 300, tmp_path).to_str() == first.to_str()
    with pytest.raises(AssertionError):  # other bytes or another vocabulary size: a new tokenizer
        cached_bpe(small_text(seed=5), 300, tmp_path)
    with pytest.raises(AssertionError):
        cached_bpe(train, 301, tmp_path)


def test_vocab_size_is_validated(tmp_path):
    for bad in (0, 100, 256, 300.0):
        with pytest.raises(ValueError, match="257"):
            train_bpe(small_text(), bad)
        with pytest.raises(ValueError, match="257"):
            cached_bpe(small_text(), bad, tmp_path)
    bytes_only = train_bpe(small_text(), 257)  # no merges: one token per byte
    assert bytes_only.vocab_size == 257 and bytes_per_token(bytes_only, small_text()) == 1.0


# ---- bits per byte: every token, hence every byte, paid for exactly once ----

class Uniform(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, inputs):
        return torch.zeros(*inputs.shape, self.vocab_size)


def test_uniform_model_costs_log2_vocab_per_token(tok):
    split = tokenize_split(tok, small_text(seed=6))
    for seq_len, batch_size in ((64, 4), (7, 3), (10_000, 1)):
        out = evaluate_bpb(Uniform(tok.vocab_size), split, seq_len, batch_size)
        assert out["tokens"] == split.n_tokens and out["bytes"] == split.n_bytes == len(small_text(seed=6))
        expected = math.log2(tok.vocab_size) * split.n_tokens / split.n_bytes
        assert out["bpb"] == pytest.approx(expected, rel=1e-6)  # float32 logits


def predicted_stream_positions(windows) -> list[int]:
    """With a stream whose id at position i is i, the targets name the positions they predict."""
    return sorted(int(t) for _, targets in windows for t in targets.flatten())


def hand_over_ok(windows) -> bool:
    """Each window's first input is BOS (position 0) or the token just before its first target."""
    return all(bool((inputs[:, 0] == targets[:, 0] - 1).all()) for inputs, targets in windows)


def overlapping_windows(split, seq_len, batch_size):  # mutation: windows advance by T - 1, not T
    s = torch.from_numpy(split.ids.astype(np.int64))
    for a in range(0, split.n_tokens, seq_len - 1):
        w = s[a : a + seq_len + 1][None]
        yield w[:, :-1], w[:, 1:]


def disjoint_windows(split, seq_len, batch_size):  # mutation: disjoint windows of T + 1 ids drop a target each
    s = torch.from_numpy(split.ids.astype(np.int64))
    for a in range(0, len(s) - 1, seq_len + 1):
        w = s[a : a + seq_len + 1][None]
        yield w[:, :-1], w[:, 1:]


@pytest.mark.parametrize("n_tokens", [1, 5, 64, 100, 101])
def test_eval_windows_predict_every_token_exactly_once(n_tokens):
    split = TokenSplit(np.arange(n_tokens + 1, dtype=np.int32), n_bytes=3 * n_tokens)  # BOS = 0 at position 0
    everything = list(range(1, n_tokens + 1))
    for seq_len in (1, 3, 10, 64, 200):
        for batch_size in (1, 4):
            windows = list(eval_token_windows(split, seq_len, batch_size))
            assert predicted_stream_positions(windows) == everything
            assert hand_over_ok(windows) and int(windows[0][0][0, 0]) == 0  # the first window starts at BOS
            assert all(t.shape[1] <= seq_len and t.shape[0] <= batch_size for _, t in windows)
    # the check has teeth: the usual off-by-one variants fail it
    long = TokenSplit(np.arange(101, dtype=np.int32), n_bytes=300)
    assert predicted_stream_positions(overlapping_windows(long, 10, 1)) != list(range(1, 101))
    assert predicted_stream_positions(disjoint_windows(long, 10, 1)) != list(range(1, 101))


def test_windowed_evaluation_equals_one_full_pass(tok):
    # window=1: each position attends only to itself (RoPE cancels), so the model is a bigram model and the
    # windowed evaluation must give exactly the loss of one pass over the whole stream
    torch.manual_seed(0)
    model = TokenLMConfig(vocab_size=tok.vocab_size, dim=16, layers=1, heads=2, window=1, multiple_of=16).build()
    split = tokenize_split(tok, small_text(n_words=400, seed=7))
    s = torch.from_numpy(split.ids.astype(np.int64))[None]
    with torch.no_grad():
        full = nn.functional.cross_entropy(model(s[:, :-1])[0], s[0, 1:], reduction="sum").item()
    for seq_len, batch_size in ((16, 4), (33, 2), (len(split.ids), 1)):
        out = evaluate_bpb(model, split, seq_len, batch_size)
        assert out["tokens"] == split.n_tokens
        assert out["nats"] == pytest.approx(full, rel=1e-5)
        assert out["bpb"] == pytest.approx(full / (math.log(2) * split.n_bytes), rel=1e-5)


def test_training_batches(tok):
    split = tokenize_split(tok, small_text(seed=8))
    x, y = get_token_batch(split, 5, 12, seed=1, index=3)
    assert x.shape == y.shape == (5, 12) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, y2 = get_token_batch(split, 5, 12, seed=1, index=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, get_token_batch(split, 5, 12, seed=1, index=4)[0])
    assert torch.equal(get_token_batch(split, 5, 12, seed=1, index=3, rows=slice(2, 4))[0], x[2:4])
    with pytest.raises(ValueError):
        get_token_batch(tokenize_split(tok, b"ab"), 1, 12, 0, 0)


# ---- the model ----

def test_token_lm_is_causal_and_has_a_loss():
    torch.manual_seed(0)
    model = TokenLMConfig(vocab_size=300, dim=32, layers=2, heads=2, multiple_of=16).build().eval()
    x = torch.randint(0, 300, (2, 20))
    j = 11
    x2 = x.clone()
    x2[:, j] = (x2[:, j] + 1) % 300
    with torch.no_grad():
        a, b = model(x), model(x2)
    assert a.shape == (2, 20, 300)
    assert torch.allclose(a[:, :j], b[:, :j], atol=1e-6)
    assert not torch.allclose(a[:, j], b[:, j])
    targets = torch.randint(0, 300, (2, 20))
    targets[:, :5] = -1  # ignored
    _, loss = model(x, targets)
    expected = nn.functional.cross_entropy(a[:, 5:].reshape(-1, 300), targets[:, 5:].reshape(-1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_config_round_trip():
    cfg = TokenLMConfig(vocab_size=512, dim=64, window=32)
    assert TokenLMConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        TokenLMConfig.from_dict({**cfg.to_dict(), "patching": "entropy"})


# ---- FLOPs per byte (paper section 4.5) ----

def test_flops_per_byte_against_hand_computation():
    # dim 24 -> SwiGLU width 8*24/3 = 64 (multiple_of 16); 3 layers; 1000 logits; context 50 tokens
    cfg = TokenLMConfig(vocab_size=1000, dim=24, layers=3, heads=2, multiple_of=16)
    per_token = 2 * 3 * 24 * 64 * 3 + 2 * 4 * 24 * 24 * 3 + 2 * 2 * 24 * 50 * 3 + 2 * 24 * 1000
    out = token_flops_per_byte(cfg, bytes_per_token=4.0, seq_len=50)
    assert out["forward_per_token"] == per_token
    assert out["forward_total"] == per_token / 4.0 and out["train_total"] == 3 * per_token / 4.0
    # a sliding window caps the attention context
    windowed = token_flops_per_byte(TokenLMConfig(**{**cfg.to_dict(), "window": 10}), 4.0, 50)
    assert per_token - windowed["forward_per_token"] == 2 * 2 * 24 * (50 - 10) * 3


# ---- train.py --model bpe: the same recipe, checkpoints, resume and evaluation as the byte models ----

def test_train_py_bpe_trains_resumes_exactly_and_evaluates_like_the_others(corpus_file, tmp_path, monkeypatch):
    import train
    from checkpoint import load_checkpoint
    from data import load_corpus
    from evaluation import evaluate

    monkeypatch.setattr(tokens, "TOKENIZER_DIR", tmp_path / "tokenizers")
    bpe = ["--data", str(corpus_file), *TINY_TRAINING, "--model", "bpe", "--vocab-size", "300", "--steps", "6",
           "--config", "dim=32", "--config", "heads=2", "--config", "multiple_of=16"]
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    assert train.main([*bpe, "--out", str(whole)]) == 0
    assert train.main([*bpe, "--out", str(pieces), "--stop-at", "4"]) == 0
    assert torch.load(pieces / "bpe.pt", weights_only=True)["step"] == 4
    assert train.main([*bpe, "--out", str(pieces), "--resume"]) == 0
    a, b = records(whole / "bpe.jsonl", "train"), records(pieces / "bpe.jsonl", "train")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    final = records(whole / "bpe.jsonl", "eval")[-1]
    assert final["val_bpb"] == records(pieces / "bpe.jsonl", "eval")[-1]["val_bpb"]

    # the checkpoint alone rebuilds model and tokenizer, and evaluating it reproduces the logged number
    kind, cfg, model = load_checkpoint(whole / "bpe.pt")
    assert kind == "bpe" and isinstance(cfg, TokenLMConfig) and cfg.vocab_size == model.tokens.tokenizer.vocab_size == 300
    corpus = load_corpus(str(corpus_file))
    setup = model.tokens
    assert setup.seq_len == round(32 / setup.train_bytes_per_token)  # --seq-len 32 bytes -> T_tok tokens
    assert setup.tokenizer.decode(setup.tokenizer.encode(corpus.val)) == corpus.val.tobytes()
    dtype = torch.load(whole / "bpe.pt", weights_only=True)["train"]["dtype"]  # the machine's default dtype
    again = evaluate(model, kind, cfg, corpus.val, 32, 4, dtype, torch.device("cpu"), 512, tokens=setup)
    assert again["val_bpb"] == final["val_bpb"] and again["bytes_per_token"] == final["bytes_per_token"]
    # logged like the other models: bits per byte (not per token), bytes seen, FLOPs per byte
    step6 = a[-1]
    assert step6["bpb"] == pytest.approx(step6["loss"] / math.log(2) / setup.train_bytes_per_token)
    assert step6["bytes"] == 6 * round(4 * setup.seq_len * setup.train_bytes_per_token)
    f = token_flops_per_byte(cfg, final["bytes_per_token"], setup.seq_len)
    assert final["train_flops_per_byte"] == f["train_total"] and final["forward_flops_per_byte"] == f["forward_total"]

    # the same validation bytes as a byte model
    assert train.main(["--data", str(corpus_file), *TINY_TRAINING, "--model", "byte", "--steps", "2", "--out", str(whole),
                       "--config", "dim=32", "--config", "heads=2"]) == 0
    assert records(whole / "byte.jsonl", "eval")[-1]["val_bytes"] == final["val_bytes"] == 512
    # another vocabulary is another model: resuming refuses, the checkpoint stays
    bad = [*bpe[:bpe.index("--vocab-size")], "--vocab-size", "290", *bpe[bpe.index("--vocab-size") + 2:]]
    assert train.main([*bad, "--out", str(whole), "--resume"]) == 1
    assert torch.load(whole / "bpe.pt", weights_only=True)["config"]["vocab_size"] == 300

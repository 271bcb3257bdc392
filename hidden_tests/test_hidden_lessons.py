"""Hidden tests for the course (exercises.md): randomised and property-based cases for every lesson, run by the
grader (tools/grade.py) on a student's files and left out of the student version. Each test carries its
lesson's mark and, like the visible tests, uses only the code of its lesson and earlier ones. The visible
tests' references (naive patching, the big-integer hash, the one-patch-at-a-time pool, the recipe) are
imported from tests/."""
import math
import random

import pytest
import torch

import train
from blt import bits_per_byte, cpu_tiny
from checkpoint import read_checkpoint
from compare import assert_close
from data import load_corpus
from decoder import decoder_patch_ids
from encoder import HASH_PRIMES, LocalEncoder, hash_ngram_ids
from entropy_model import EntropyModel, entropy_from_logits
from global_transformer import GlobalTransformer
from patching import (entropy_patch_starts, is_space_like, lengths_from_starts, limit_patch_length,
                      patch_ids_from_lengths, space_patch_starts)
from test_decoder import complete_patch_reference
from test_encoder import naive_pool, reference_ids
from test_model import causality_leak, make_model
from test_patching import naive_entropy_starts, naive_lengths, naive_limit, naive_space_starts
from test_training_loop import CORPUS, records, reference_recipe

SEEDS = [11, 12, 13]


# ---- lesson 1 ----

@pytest.mark.lesson1
@pytest.mark.parametrize("seed", SEEDS)
def test_entropies_random_logits_masks_and_dtypes(seed):
    g = torch.Generator().manual_seed(seed)
    V = int(torch.randint(2, 300, (1,), generator=g))
    logits = torch.randn(3, 7, V, generator=g) * float(torch.rand(1, generator=g) * 20)
    logits[torch.rand(3, 7, V, generator=g) < 0.3] = float("-inf")  # impossible ids
    logits[..., 0] = 0.0  # at least one possible id per row
    for x in (logits, logits.bfloat16(), logits.half()):
        logp = torch.log_softmax(x.double(), -1)
        want = -torch.where(logp.isfinite(), logp.exp() * logp, torch.zeros_like(logp)).sum(-1)
        got = entropy_from_logits(x)
        assert got.dtype == torch.float32, f"{x.dtype} logits gave {got.dtype} entropies"
        assert_close(got.double(), want, atol=2e-5, rtol=0, what=f"entropies of {x.dtype} logits")
        assert (got >= -1e-6).all() and (got <= math.log(V) + 1e-4).all()


@pytest.mark.lesson1
@pytest.mark.parametrize("seed", SEEDS)
@torch.no_grad()
def test_entropy_model_window_reaches_exactly_the_window(seed):
    rng = random.Random(seed)
    window, T = rng.randint(1, 6), rng.randint(12, 20)
    torch.manual_seed(seed)
    model = EntropyModel(dim=16, n_layers=1, n_heads=2, window=window, multiple_of=16).eval()
    model.output.weight.mul_(20)
    tokens = torch.randint(4, 260, (1, T))
    base = model(tokens)
    for j in rng.sample(range(T), 5):
        moved = tokens.clone()
        moved[0, j] = 4 + (tokens[0, j] - 4 + 101) % 256
        changed = ((model(moved) - base).abs()[0].amax(-1) > 1e-5).nonzero().flatten().tolist()
        assert changed == list(range(j, min(j + window, T))), f"window {window}, byte {j} moved {changed}"


# ---- lesson 2 ----

@pytest.mark.lesson2
@pytest.mark.parametrize("seed", SEEDS)
def test_entropy_rules_random_with_ties_at_the_threshold(seed):
    rng = random.Random(seed)
    for _ in range(20):
        T = rng.randint(1, 25)
        H = [rng.choice([0.0, 0.5, 1.0, 1.5, 2.0, 3.0]) for _ in range(T)]  # exact in float32: ties happen
        theta = rng.choice([0.5, 1.0, 1.5])
        for monotonic in (False, True):
            got = entropy_patch_starts(torch.tensor([H]), theta, monotonic)[0].tolist()
            assert got == naive_entropy_starts(H, theta, monotonic), (H, theta, monotonic)


@pytest.mark.lesson2
@pytest.mark.parametrize("seed", SEEDS)
def test_space_rule_random_bytes_and_text(seed):
    rng = random.Random(seed)
    alphabet = list(b"ab .,!\n\t-'") + [0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xFF, 0x00]
    for _ in range(20):
        row = [4 + rng.choice(alphabet) for _ in range(rng.randint(1, 30))]
        got = space_patch_starts(torch.tensor([row]))[0].tolist()
        assert got == naive_space_starts(row), bytes(i - 4 for i in row)


@pytest.mark.lesson2
@pytest.mark.parametrize("seed", SEEDS)
def test_limit_and_lengths_random(seed):
    rng = random.Random(seed)
    for _ in range(20):
        N = rng.randint(2, 40)
        starts = [True, True] + [rng.random() < 0.2 for _ in range(N - 2)]
        m = rng.randint(1, 7)
        limited = limit_patch_length(torch.tensor([starts]), m)[0].tolist()
        assert limited == naive_limit(starts, m), (starts, m)
        assert limit_patch_length(torch.tensor([starts]), None)[0].tolist() == starts
        lengths = lengths_from_starts(torch.tensor([limited]))[0].tolist()
        assert [n for n in lengths if n] == naive_lengths(limited) and sum(lengths) == N
    # a ragged batch: rows right-padded with 0
    rows = [[True, True, False, True], [True, True, True, True]]
    assert lengths_from_starts(torch.tensor(rows)).tolist() == [[1, 2, 1, 0], [1, 1, 1, 1]]


@pytest.mark.lesson2
def test_entropy_patching_is_incremental_random():
    rng = random.Random(5)
    H = [rng.choice([0.0, 1.0, 2.0, 2.5]) for _ in range(30)]
    for monotonic in (False, True):
        full = limit_patch_length(entropy_patch_starts(torch.tensor([H]), 1.0, monotonic), 4)[0].tolist()
        for i in range(1, 30):
            prefix = limit_patch_length(entropy_patch_starts(torch.tensor([H[:i]]), 1.0, monotonic), 4)[0]
            assert prefix.tolist() == full[:i + 1], (i, monotonic)


# ---- lesson 3 ----

@pytest.mark.lesson3
@pytest.mark.parametrize("seed", SEEDS)
def test_hash_ids_random_sizes(seed):
    rng = random.Random(seed)
    for _ in range(6):
        n, buckets, f = rng.randint(1, 8), rng.choice([2, 97, 1000, 500002]), rng.randrange(len(HASH_PRIMES))
        T = rng.randint(1, 20)
        tokens = torch.tensor([[rng.randrange(260) for _ in range(T)] for _ in range(2)])
        got = hash_ngram_ids(tokens, n, buckets, hash_function=f)
        for b in range(2):
            assert got[b].tolist() == reference_ids(tokens[b].tolist(), n, HASH_PRIMES[f], buckets), (n, buckets, f)


@pytest.mark.lesson3
@torch.no_grad()
def test_embedding_random_config():
    torch.manual_seed(3)
    cfg = cpu_tiny(local_dim=8, local_heads=2, hash_ngram_sizes=(2, 5), hash_buckets=31, hash_functions=3,
                   multiple_of=16)
    enc = LocalEncoder(cfg)
    for table in enc.hash_embeddings:
        torch.nn.init.normal_(table.weight)
    tokens = torch.randint(0, 260, (1, 9))
    want = enc.tok_embeddings.weight[tokens[0]].clone()
    t = 0
    for f in range(3):
        for n in (2, 5):
            want += enc.hash_embeddings[t].weight[reference_ids(tokens[0].tolist(), n, HASH_PRIMES[f], 31)]
            t += 1
    assert_close(enc.embed(tokens)[0], want, what="embedding")


# ---- lesson 4 ----

@pytest.mark.lesson4
@pytest.mark.parametrize("seed", SEEDS)
@torch.no_grad()
def test_pool_random_patchings(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    k = rng.randint(1, 3)
    enc = LocalEncoder(cpu_tiny(local_dim=16, local_heads=2, hash_buckets=64, multiple_of=16, cross_attn_k=k)).eval()
    T = rng.randint(3, 14)
    rows = []
    for _ in range(2):
        cuts = sorted(rng.sample(range(2, T + 1), rng.randint(0, T - 1)))
        starts = [0, 1, *cuts, T + 1]
        rows.append([b - a for a, b in zip(starts, starts[1:])])
    P = max(map(len, rows)) + rng.randint(0, 2)  # padding patches too
    lengths = torch.tensor([r + [0] * (P - len(r)) for r in rows])
    h = torch.randn(2, T, 16)
    got = enc.pool(h, patch_ids_from_lengths(lengths, T), P)
    for b in range(2):
        assert_close(got[b], naive_pool(enc, h[b], lengths[b].tolist()), what=f"pooled patches of row {b}")


# ---- lesson 5 ----

@pytest.mark.lesson5
@pytest.mark.parametrize("seed", SEEDS)
@torch.no_grad()
def test_global_model_random_prefixes(seed):
    torch.manual_seed(seed)
    model = GlobalTransformer(cpu_tiny(local_dim=8, cross_attn_k=2, global_dim=32, global_layers=1,
                                       global_heads=2, multiple_of=16)).eval()
    P = random.Random(seed).randint(2, 12)
    patches = torch.randn(1, P, 16)
    out = model(patches)
    j = random.Random(seed + 1).randrange(P)
    assert_close(model(patches[:, :j + 1]), out[:, :j + 1], what=f"outputs of the first {j + 1} of {P} patches")
    moved = patches.clone()
    moved[:, 0] += 1.0
    assert (model(moved) - out).abs().amax(-1).min() > 1e-5, "patch 0 must reach every output"


# ---- lesson 6 ----

@pytest.mark.lesson6
@pytest.mark.parametrize("seed", SEEDS)
def test_decoder_patch_ids_random(seed):
    rng = random.Random(seed)
    for _ in range(20):
        T = rng.randint(1, 20)
        cuts = sorted(rng.sample(range(2, T + 1), rng.randint(0, T - 1)))
        starts = [0, 1, *cuts, T + 1]
        lengths = [b - a for a, b in zip(starts, starts[1:])]
        got = decoder_patch_ids(torch.tensor([lengths + [0, 0]]), T)[0].tolist()
        assert got == complete_patch_reference(lengths, T), lengths


@pytest.mark.lesson6
@pytest.mark.parametrize("scheme", ["space", "entropy"])
@torch.no_grad()
def test_whole_model_causal_on_random_text(scheme):
    model = make_model(scheme, seed=7)
    tokens = torch.tensor([[4 + b for b in b"ab cd, efg hi. jk lmn!"]])
    assert causality_leak(model, tokens, seed=3) < 1e-5


# ---- lesson 7 ----

@pytest.mark.lesson7
@pytest.mark.parametrize("seed", SEEDS)
def test_bits_per_byte_random(seed):
    rng = random.Random(seed)
    for _ in range(10):
        nats, n = rng.uniform(0, 1e6), rng.randint(1, 10**6)
        assert bits_per_byte(nats, n) == pytest.approx(nats / n / math.log(2), rel=1e-12)


# ---- lesson 8 ----

@pytest.mark.lesson8
def test_recipe_with_four_micro_batches(tmp_path, monkeypatch):
    """The recipe test again, with 4 micro-batches of one row each and another seed and clipping."""
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS)
    monkeypatch.setitem(train.PRESETS["cpu"]["train"], "grad_clip", 0.3)
    args = ["--model", "byte", "--preset", "cpu", "--device", "cpu", "--dtype", "fp32", "--steps", "3",
            "--seq-len", "16", "--batch-size", "4", "--micro-batch-size", "1", "--lr", "2e-3", "--warmup-steps", "2",
            "--seed", "5", "--log-interval", "1", "--eval-interval", "1000", "--final-eval-bytes", "128",
            "--config", "dim=32", "--config", "layers=1", "--config", "heads=2", "--config", "multiple_of=16"]
    assert train.main(["--data", str(path), "--out", str(tmp_path / "out"), *args]) == 0
    ckpt = read_checkpoint(tmp_path / "out" / "byte.pt")
    tc = train.TrainConfig(**ckpt["train"])
    losses, lrs, _, weights = reference_recipe(load_corpus(str(path)).train, tc, 3)
    logged = records(tmp_path / "out" / "byte.jsonl", "train")
    assert [r["lr"] for r in logged] == pytest.approx(lrs, rel=1e-12)
    assert [r["loss"] for r in logged] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    for name, want in weights.items():
        assert_close(ckpt["model"][name], want, atol=1e-6, rtol=1e-4, what=name)

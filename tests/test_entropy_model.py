"""The entropy model (paper §2.3): next-byte entropies (eq. 3) and its causal sliding-window mask. Every test
here grades lesson 1 (exercises.md, `python -m pytest -m lesson1`) and uses nothing from later lessons."""
import math

import pytest
import torch

from entropy_model import EntropyModel, entropy_from_logits

pytestmark = pytest.mark.lesson1


def naive_entropy(logits: list[float]) -> float:
    """H = -sum_v p_v ln p_v with p = softmax(logits), in Python floats."""
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    total = sum(weights)
    return -sum(w / total * math.log(w / total) for w in weights if w > 0)


def test_entropy_hand_values():
    # uniform over the 260 ids: ln 260 = 5.5607 nats (8.02 bits), the most a next-byte distribution can have
    assert entropy_from_logits(torch.zeros(260)).item() == pytest.approx(math.log(260), abs=1e-5)
    # two ids with p = (1/4, 3/4): -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.5623 nats
    quarter = torch.tensor([0.0, math.log(3.0)])
    assert entropy_from_logits(quarter).item() == pytest.approx(0.5623351446, abs=1e-6)
    # a certain next byte has entropy 0; the other probabilities underflow to exactly 0 here, and 0 * log 0
    # must count as 0, not NaN
    certain = torch.full((260,), -100.0)
    certain[7] = 100.0
    assert entropy_from_logits(certain).item() == pytest.approx(0.0, abs=1e-6)
    # impossible ids (logit -inf) count 0 too: two equally likely ids and two impossible ones give ln 2, not NaN
    two = torch.tensor([0.0, 0.0, float("-inf"), float("-inf")])
    assert entropy_from_logits(two).item() == pytest.approx(math.log(2), abs=1e-6)


def test_entropy_matches_naive_on_batches():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 260, generator=g) * 3
    H = entropy_from_logits(logits)
    assert H.shape == (2, 5)  # (..., V) -> (...)
    for b in range(2):
        for t in range(5):
            assert H[b, t].item() == pytest.approx(naive_entropy(logits[b, t].tolist()), abs=1e-4)
    # softmax ignores a constant shift, so the entropy does too, even where exp() would overflow
    assert torch.allclose(entropy_from_logits(logits + 1000.0), H, atol=1e-3)
    # entropies are compared with a threshold: compute them in float32 even for bf16 logits
    assert entropy_from_logits(logits.bfloat16()).dtype == torch.float32


def test_bf16_logits_give_the_float32_entropies_of_the_same_logits():
    """bf16 logits (autocast) are upcast first: computing softmax and the sum in bf16 and casting the result
    to float32 at the end is off by up to ~0.02 nats, enough to move a patch boundary at the threshold."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(4, 16, 260, generator=g) * 2).bfloat16()
    got = entropy_from_logits(logits)
    logp = torch.log_softmax(logits.double(), dim=-1)  # the same numbers, in float64
    want = -(logp.exp() * logp).sum(-1)
    worst = (got.double() - want).abs().max().item()
    assert got.dtype == torch.float32 and worst <= 1e-5, (
        f"entropies of bf16 logits differ from float32 by up to {worst:.3g} nats: upcast the logits before "
        "the softmax, not the entropy after it")


def tiny_entropy_model(window=None, layers=2) -> EntropyModel:
    torch.manual_seed(0)
    model = EntropyModel(dim=32, n_layers=layers, n_heads=2, window=window, multiple_of=16).eval()
    with torch.no_grad():
        model.output.weight.mul_(20)  # more varied entropies than at initialisation (all near ln 260)
    return model


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(4, 260, (1, 24), generator=g)


def perturb(tokens: torch.Tensor, j: int) -> torch.Tensor:
    out = tokens.clone()
    out[0, j] = 4 + (tokens[0, j] - 4 + 97) % 256  # another byte
    return out


@torch.no_grad()
def test_entropies_are_causal(tokens):
    """Entry j is the uncertainty about byte j+1 given bytes <= j (the released index convention): changing
    byte j moves no entropy before j. Patch boundaries come from these numbers, so a leak here would let
    future bytes decide the patches (paper §2.4)."""
    model = tiny_entropy_model()
    H, logits = model.entropies(tokens), model(tokens)
    assert H.shape == tokens.shape and (H >= 0).all() and (H <= math.log(260) + 1e-4).all()
    assert H.std() > 0.1  # varied entropies, so that the checks below mean something
    for j in range(1, tokens.shape[1]):
        moved = (model.entropies(perturb(tokens, j)) - H).abs()[0]
        assert moved[:j].max() <= 1e-5, f"byte {j} changed the entropy at an earlier position"
        assert (model(perturb(tokens, j)) - logits).abs()[0, j].max() > 1e-3  # ... and it does reach its own
    # earlier bytes do reach later positions (the mask is not the identity)
    assert (model(perturb(tokens, 0)) - logits).abs()[0, 1:].amax(-1).min() > 1e-3


@torch.no_grad()
def test_entropies_of_a_prefix_are_a_prefix(tokens):
    model = tiny_entropy_model()
    H = model.entropies(tokens)
    for j in (0, 1, 5, 23):
        assert torch.allclose(model.entropies(tokens[:, :j + 1]), H[:, :j + 1], atol=1e-5)


@torch.no_grad()
def test_sliding_window(tokens):
    """One layer with a window of 4 bytes: position t sees bytes t-3..t, so byte j moves the predictions
    (and entropies) at positions j..j+3 and no others."""
    model = tiny_entropy_model(window=4, layers=1)
    logits = model(tokens)
    for j in range(tokens.shape[1] - 4):
        moved = (model(perturb(tokens, j)) - logits).abs()[0].amax(-1) > 1e-4  # (T,) positions that moved
        assert moved.nonzero().flatten().tolist() == [j, j + 1, j + 2, j + 3], f"byte {j}"

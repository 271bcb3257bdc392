"""Held-out bits per byte (paper §4): the summed next-byte cross-entropy in nats / (ln 2 * bytes), over every
byte of the validation split once. Every test here grades lesson 7 (exercises.md,
`python -m pytest -m lesson7`); the model is a byte-level transformer (lesson 1), and nothing is trained."""
import math

import numpy as np
import pytest
import torch

from blt import bits_per_byte
from entropy_model import ByteLMConfig
from evaluation import evaluate

pytestmark = pytest.mark.lesson7


def test_bits_per_byte_hand_values():
    assert bits_per_byte(100 * math.log(2), 100) == pytest.approx(1.0)  # 1 bit per byte
    assert bits_per_byte(0.0, 7) == 0.0
    # a uniform guess over the 260 ids costs ln 260 nats = log2 260 = 8.02 bits on every byte
    assert bits_per_byte(50 * math.log(260), 50) == pytest.approx(math.log2(260))
    assert bits_per_byte(3.0, 4) == pytest.approx(3.0 / 4 / math.log(2))


@torch.no_grad()
def test_a_uniform_model_costs_log2_260_bits_on_every_validation_byte():
    """evaluate() predicts every validation byte once, in windows of any length (the last one shorter), and
    reports bits per byte: a model whose logits are all 0 guesses uniformly, log2 260 = 8.02 bits per byte."""
    cfg = ByteLMConfig(dim=16, layers=1, heads=2, multiple_of=16)
    torch.manual_seed(0)
    model = cfg.build()
    model.output.weight.zero_()
    val = np.frombuffer(b"To be, or not to be, that is the question.\n" * 7, dtype=np.uint8)  # 301 bytes
    for seq_len, max_bytes in [(16, None), (64, None), (32, 100)]:
        m = evaluate(model, "byte", cfg, val, seq_len, 4, "fp32", torch.device("cpu"), max_bytes)
        assert m["val_bytes"] == (len(val) if max_bytes is None else max_bytes)
        assert m["val_bpb"] == pytest.approx(math.log2(260), rel=1e-5)

"""CUDA: the model computes on the GPU what it computes on the CPU, BLT's compiled bf16 training step compiles
once there, and train.py runs its three stages there. `python -m pytest -m cuda`; skipped without CUDA.
tools/gpu_check.py runs these first."""
import pytest
import torch
import torch._dynamo

import train
from blt import BLT, cpu_tiny
from runtime import compiled_graphs
from test_compile import TEXTS, TINY, window
from test_model import TEXT, make_model
from patching import tokenize

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 matmuls in full precision (train.py turns TF32 on for its runs)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("scheme", ["strided", "space", "entropy", "monotonic"])
def test_forward_on_cuda_matches_cpu(scheme):
    model = make_model(scheme)
    tokens = torch.tensor([tokenize(TEXT.encode())[:96]] * 2)
    lengths = model.patch(tokens)
    expected = model(tokens, patch_lengths=lengths)
    model.cuda()
    got = model(tokens.cuda(), patch_lengths=lengths.cuda())
    assert torch.allclose(got.cpu(), expected, atol=1e-4), (got.cpu() - expected).abs().max()
    if scheme in ("strided", "space"):  # entropy boundaries may flip where H is within rounding of theta
        assert torch.equal(model.patch(tokens.cuda()).cpu(), lengths)


def test_compiled_bf16_step_on_cuda_compiles_once():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = BLT(cpu_tiny(**TINY))
    device = torch.device("cuda")
    task = train.Task("blt", model, model.cfg, train.TrainConfig(seq_len=64, batch_size=2, dtype="bf16"), device,
                      compile_model=True)
    task.prepare()  # inductor, as train.py
    start, graphs = compiled_graphs(), []
    for text in TEXTS:
        loss = task.loss(window(text), window(text))
        loss.backward()
        assert torch.isfinite(loss)
        graphs.append(compiled_graphs() - start)
    assert graphs[-1] == graphs[0] <= 2, graphs


def test_train_py_three_stages_on_cuda(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400)))
    assert train.main(["--data", str(corpus), "--device", "cuda", "--preset", "smoke", "--compile",
                       "--entropy-steps", "4", "--steps", "4", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "blt_entropy.pt").exists()

"""CUDA: the model computes on the GPU what it computes on the CPU, BLT's compiled bf16 training step compiles
once there, and train.py runs its three stages there. `python -m pytest -m cuda`; skipped without CUDA.
tools/gpu_check.py runs these first."""
import pytest
import torch
import torch._dynamo

import train
from blt import BLT, cpu_tiny
from runtime import compiled_graphs, native_bf16
from sample import generate
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


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_compiled_step_on_cuda_compiles_once(dtype):
    if dtype == "bf16" and not native_bf16(torch.device("cuda")):
        pytest.skip("this GPU has no native bf16 (train.py refuses it; fp16 is checked)")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = BLT(cpu_tiny(**TINY))
    device = torch.device("cuda")
    task = train.Task("blt", model, model.cfg, train.TrainConfig(seq_len=64, batch_size=2, dtype=dtype), device,
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


@pytest.mark.parametrize("scheme", ["strided", "space"])
@pytest.mark.parametrize("naive", [False, True])
def test_generation_on_cuda_samples_the_bytes_of_the_cpu(scheme, naive):
    """sample.generate on the GPU (incremental caches, naive path): the noise comes from the host, so a seed
    gives the CPU's bytes (schemes without a threshold, where rounding could move a boundary)."""
    model = make_model(scheme)
    kwargs = dict(batch_size=2, temperature=1.0, seed=3, naive=naive, stop_at_eos=False)
    on_cpu, _ = generate(model, b"ROMEO:", 40, **kwargs)
    on_gpu, _ = generate(model.cuda(), b"ROMEO:", 40, **kwargs)
    assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), on_cpu)

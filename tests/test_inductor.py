"""torch.compile with inductor, the backend train.py uses on a GPU, on the CPU: a stand-in for the GPU path.

The ops that lower differently from eager (scatter_reduce amax with include_self=False in the encoder's
pooling, index_add in the cross-attention, searchsorted in the patch ids, attention over a symbolic patch
count P) go through inductor's code generation here, in fp32, and must give eager's outputs and gradients.
One compiled BLT serves every patching scheme (the scheme only decides the patch lengths, an input) and two
patch counts for each, without a recompile.

The slowest test of the suite: inductor compiles forward and backward into C++ kernels, minutes on 2 CPU
cores. It runs with the rest (the GPU path is worth those minutes); to skip it while iterating:

    python -m pytest -q --deselect tests/test_inductor.py::test_inductor_matches_eager_for_every_scheme_and_compiles_once

tests/test_compile.py checks the no-recompile property in seconds with aot_eager, which traces as inductor
does without generating code.
"""
import pytest
import torch
import torch._dynamo

import train
from blt import BLT, cpu_tiny
from patching import calibrate_threshold, patch_lengths
from runtime import compiled_graphs
from test_compile import TEXTS, TINY, window

SCHEMES = ["strided", "space", "entropy", "monotonic"]


def eager_and_grads(model, x, lengths):
    model.zero_grad(set_to_none=True)
    loss = model(x, x, patch_lengths=lengths)[1]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_inductor_matches_eager_for_every_scheme_and_compiles_once():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = BLT(cpu_tiny(**{**TINY, "patching": "entropy"}, entropy_dim=16, entropy_layers=1, entropy_heads=2,
                         entropy_window=16))
    model.cfg.entropy_threshold = calibrate_threshold(model.entropy_model.entropies(window(TEXTS[0])), 4.0)
    task = train.Task("blt", model, model.cfg, train.TrainConfig(seq_len=64, batch_size=2, dtype="fp32"),
                      torch.device("cpu"), compile_model=True)
    task.prepare(backend="inductor")
    start, graphs, counts = compiled_graphs(), [], set()
    for scheme in SCHEMES:
        for text in TEXTS[:2]:  # 33 and 2 patches with space patching; others differ per scheme
            x = window(text)
            entropies = model.entropy_model.entropies(x) if scheme in ("entropy", "monotonic") else None
            threshold = None if entropies is None else model.cfg.entropy_threshold
            lengths = patch_lengths(x, scheme, patch_size=4, entropies=entropies, threshold=threshold)
            counts.add((scheme, lengths.shape[1]))
            expected_loss, expected = eager_and_grads(model, x, lengths)
            padded = torch.nn.functional.pad(lengths, (0, -lengths.shape[1] % 16))  # as Task.patch
            torch._dynamo.mark_dynamic(padded, 1)
            model.zero_grad(set_to_none=True)
            loss = task.forward(x, x, patch_lengths=padded)[1]
            loss.backward()
            got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            assert torch.allclose(loss, expected_loss, rtol=1e-5, atol=1e-5), (scheme, loss, expected_loss)
            assert got.keys() == expected.keys()
            for name, g in got.items():
                assert torch.allclose(g, expected[name], rtol=1e-4, atol=1e-5), (scheme, name, (g - expected[name]).abs().max())
            graphs.append(compiled_graphs() - start)
    assert len({p for _, p in counts}) >= 4, counts  # several patch counts, among them 2 (P - 1 = 1)
    assert graphs[0] <= 2 and graphs[-1] == graphs[0], f"recompiled: graphs {graphs} for patch counts {sorted(counts)}"

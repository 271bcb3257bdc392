"""torch.compile compiles BLT's training step once: the patch count P changes from batch to batch, and a
recompile per new P would cost minutes each on a CPU (train.Task.patch makes P one dynamic dimension).

The 'aot_eager' backend traces forward and backward as inductor does, without generating code, so the test
takes seconds; which sizes are specialized (and so recompiled) is decided before the backend runs."""
import torch
import torch._dynamo

import train
from blt import BLT, cpu_tiny
from patching import tokenize
from runtime import compiled_graphs

TINY = dict(patching="space", local_dim=32, local_heads=2, decoder_layers=1, local_window=16,
            hash_ngram_sizes=(3,), hash_buckets=64, global_dim=64, global_layers=1, global_heads=2, multiple_of=16)
T = 64
# Windows of 33, 2, 12 and 19 patches (space patching: a patch ends after a space); padded: 48, 16, 16, 32.
TEXTS = [b"a b c d e f g h i j k l m n o p q r s t u v w x y z a b c d e f g h", b"abcdefghijklmnopqrstuvwxyz" * 3,
         b"to be, or not to be, that is the question", b"I am, as I am; so we go on, to and fro, by day and by night"]


def window(text: bytes) -> torch.Tensor:
    ids = tokenize(text)[:T]
    return torch.tensor([ids + [4 + 32] * (T - len(ids))] * 2)  # (2, T), padded with spaces


def test_changing_patch_counts_compile_once():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = BLT(cpu_tiny(**TINY))
    task = train.Task("blt", model, model.cfg, train.TrainConfig(seq_len=T, batch_size=2, dtype="fp32"),
                      torch.device("cpu"), compile_model=True)
    task.prepare(backend="aot_eager")
    graphs, patch_counts = [], set()
    start = compiled_graphs()
    for text in TEXTS:
        x = window(text)
        patch_counts.add(model.patch(x).shape[1])
        loss = task.loss(x, x)
        loss.backward()
        graphs.append(compiled_graphs() - start)
        assert torch.allclose(loss, model(x, x)[1], atol=1e-5)  # the padding patches change nothing
    assert len(patch_counts) == len(TEXTS) and 2 in patch_counts  # P = 2: P - 1 = 1, a size torch specializes
    assert graphs[0] <= 2, f"{graphs[0]} graphs for one step: graph breaks"
    assert graphs[-1] == graphs[0], f"recompiled for new patch counts {sorted(patch_counts)}: graphs {graphs}"

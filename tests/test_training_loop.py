"""The training loop (paper §4, the recipe): train.py's train_loop against the recipe written out plainly here,
and a tiny end-to-end run (entropy model -> threshold -> BLT with entropy patching -> held-out bits per byte)
through train.py as a user runs it. Every test here grades lesson 8 (exercises.md,
`python -m pytest -m lesson8`); they need lessons 1-7."""
import json
from contextlib import contextmanager, nullcontext

import numpy as np
import pytest
import torch

import runtime
import tokens
import train
from checkpoint import read_checkpoint
from data import get_batch, load_corpus
from entropy_model import ByteLMConfig
from train import TrainConfig, lr_at

pytestmark = pytest.mark.lesson8

CORPUS = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog, {i * 7 % 13} times.\n" for i in range(300))


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS)
    return path


def records(path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["type"] == kind]


# ---- one step of the recipe, exactly ----

STEPS = 6
GRAD_CLIP = 0.25  # below every gradient norm of this run (0.85 to 0.98): clipping acts on every step
BYTE_MODEL = ByteLMConfig(dim=32, layers=1, heads=2, window=None, multiple_of=16)
RECIPE = ["--model", "byte", "--preset", "cpu", "--device", "cpu", "--dtype", "fp32", "--steps", str(STEPS),
          "--seq-len", "32", "--batch-size", "4", "--micro-batch-size", "2", "--lr", "3e-3", "--warmup-steps", "3",
          "--log-interval", "1", "--eval-interval", "1000", "--final-eval-bytes", "256",
          "--config", "dim=32", "--config", "layers=1", "--config", "heads=2", "--config", "multiple_of=16"]


def reference_recipe(train_split: np.ndarray, tc: TrainConfig, steps: int):
    """The recipe, written out: AdamW (weight decay on matrices only); on each step the learning rate of the
    schedule lr_at, the step's batch, zero the gradients, forward, backward, clip the gradient norm, step.
    Returns the losses, the learning rates, the gradient norms before clipping, and the final weights."""
    torch.manual_seed(tc.seed)
    model = BYTE_MODEL.build().train()
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    gains = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": tc.weight_decay},
                                   {"params": gains, "weight_decay": 0.0}],
                                  lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.adam_eps)
    losses, lrs, norms = [], [], []
    for step in range(steps):
        lr = lr_at(step, tc, step / steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(train_split, tc.batch_size, tc.seq_len, tc.seed, step)
        optimizer.zero_grad()
        _, loss = model(x, y)  # the whole batch at once: the loop under test splits it into 2 micro-batches
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)))
        optimizer.step()
        losses.append(loss.item())
        lrs.append(lr)
    return losses, lrs, norms, model.state_dict()


def test_train_loop_follows_the_recipe(corpus_file, tmp_path, monkeypatch):
    """train.py's loop (here on a byte-level model, in 2 micro-batches per step) takes exactly the steps of the
    recipe above: the same logged losses and learning rates, and the same weights at the end, up to float
    rounding. A loop that forgets to zero the gradients, to clip them, to set the learning rate, or to divide
    the loss among the micro-batches, ends elsewhere."""
    monkeypatch.setitem(train.PRESETS["cpu"]["train"], "grad_clip", GRAD_CLIP)  # no flag sets it
    assert train.main(["--data", str(corpus_file), "--out", str(tmp_path), *RECIPE]) == 0
    ckpt = read_checkpoint(tmp_path / "byte.pt")
    tc = TrainConfig(**ckpt["train"])
    assert tc.grad_clip == GRAD_CLIP and tc.dtype == "fp32" and tc.batch_size == 4 and tc.weight_decay > 0
    assert ckpt["config"] == BYTE_MODEL.to_dict() and ckpt["step"] == STEPS

    losses, lrs, norms, weights = reference_recipe(load_corpus(str(corpus_file)).train, tc, STEPS)
    assert min(norms) > 2 * GRAD_CLIP, norms  # clipping changed every step
    assert len(set(lrs)) == STEPS  # warmup, then cosine: a new learning rate on every step

    logged = records(tmp_path / "byte.jsonl", "train")
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1))
    assert [r["lr"] for r in logged] == pytest.approx(lrs, rel=1e-12)
    assert [r["loss"] for r in logged] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    assert weights.keys() == ckpt["model"].keys()
    for name, want in weights.items():
        torch.testing.assert_close(ckpt["model"][name], want, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


# ---- the batch of each step, and gradient averaging under DDP ----

class RecordingDDP(torch.nn.Module):
    """A stand-in for DistributedDataParallel in one process, for the one rule of DDP the loop must follow:
    DDP decides during the forward whether the next backward averages gradients across processes, and
    `no_sync()` turns that off. It records, for every forward, its input and whether it would average."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module, self.averaging, self.forwards = module, True, []

    @contextmanager
    def no_sync(self):
        self.averaging = False
        try:
            yield
        finally:
            self.averaging = True

    def forward(self, x, *args, **kwargs):
        self.forwards.append((x.detach().clone(), self.averaging))
        return self.module(x, *args, **kwargs)


def test_micro_batches_come_from_the_task_batch_and_only_the_last_forward_averages(corpus_file, tmp_path,
                                                                                     monkeypatch):
    """The BPE baseline, 2 steps of 2 micro-batches, under the DDP stand-in above (one process, so one
    stand-in for torchrun's two). Each step's micro-batches are the rows of task.batch(corpus.train, step):
    token windows for this model, where data.get_batch would give byte windows. The forwards of all micro-batches
    but the last run inside task.sync_gradients(now=False), that is under no_sync: a forward outside it
    would average gradients on every micro-batch, whatever the backward does."""
    monkeypatch.setattr(tokens, "TOKENIZER_DIR", tmp_path / "tokenizers")
    wrappers, batches = [], []
    monkeypatch.setattr(runtime.DIST, "wrap", lambda model: wrappers.append(RecordingDDP(model)) or wrappers[-1])
    monkeypatch.setattr(runtime.DIST, "no_sync", lambda ddp, now: nullcontext() if now else ddp.no_sync())
    task_batch = train.Task.batch

    def batch(task, split, step):
        x, y = task_batch(task, split, step)
        batches.append((step, x.clone()))
        return x, y
    monkeypatch.setattr(train.Task, "batch", batch)
    code = train.main(["--data", str(corpus_file), "--out", str(tmp_path / "out"), "--model", "bpe",
                       "--vocab-size", "300", "--steps", "2", "--micro-batch-size", "2", "--preset", "cpu",
                       "--device", "cpu",
                       "--dtype", "fp32", "--seq-len", "32", "--batch-size", "4", "--log-interval", "1",
                       "--eval-interval", "1000", "--final-eval-bytes", "256",
                       "--config", "dim=32", "--config", "heads=2", "--config", "multiple_of=16"])
    assert [step for step, _ in batches] == [0, 1], "call task.batch(corpus.train, step) once per step"
    [ddp] = wrappers
    assert len(ddp.forwards) == 4, f"{len(ddp.forwards)} forwards in 2 steps of 2 micro-batches"
    for i, (x, averaging) in enumerate(ddp.forwards):
        step, part = divmod(i, 2)
        want = batches[step][1][2 * part:2 * part + 2]
        assert x.shape == want.shape and torch.equal(x, want), (
            f"step {step}, micro-batch {part} is not rows {2 * part}..{2 * part + 1} of task.batch(corpus.train, "
            f"step): the loop must train on the task's batch (the BPE baseline reads token windows, not bytes)")
        last = part == 1
        assert averaging == last, (
            f"step {step}, micro-batch {part}: the forward ran {'under' if averaging is False else 'outside'} "
            f"no_sync; run forward and backward inside task.sync_gradients(now=...), now true for the last "
            f"micro-batch only")
    assert code == 0


# ---- the whole pipeline learns ----

TINY = ["--seq-len", "64", "--batch-size", "8", "--steps", "60", "--entropy-steps", "30", "--lr", "1e-2",
        "--entropy-lr", "1e-2", "--warmup-steps", "10", "--eval-interval", "1000", "--final-eval-bytes", "2048",
        "--log-interval", "1000", "--patch-size", "3", "--calibration-windows", "8",
        "--config", "entropy_dim=16", "--config", "entropy_layers=1", "--config", "entropy_heads=2",
        "--config", "local_dim=32", "--config", "local_heads=2", "--config", "decoder_layers=1",
        "--config", "global_dim=64", "--config", "global_layers=1", "--config", "global_heads=2",
        "--config", "hash_buckets=64", "--config", "multiple_of=16"]


def test_tiny_end_to_end_run_learns(corpus_file, tmp_path):
    """60 steps on a repetitive 19 kB corpus: from 8 bits per byte (a uniform guess) to well under 1."""
    assert train.main(["--data", str(corpus_file), "--out", str(tmp_path / "out"), *TINY]) == 0
    final = records(tmp_path / "out" / "blt_entropy.jsonl", "eval")[-1]
    assert final["val_bytes"] > 1000 and 2.0 < final["patch_size"] < 4.5
    assert final["val_bpb"] < 1.0, final

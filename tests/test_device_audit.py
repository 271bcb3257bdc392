"""The GPU paths, audited on the CPU (tests/device_audit.py): one training step of every model kind, the
evaluation, and generation (incremental and naive, sampled, a row ending in EOS) never mix host and device
memory, never hand a host generator device tensors, and wait for the device only where stated:

    training step    one sync per micro-batch (the patch count P of BLT's entropy or space patching, which
                     sizes the patch tensors); none for byte and bpe
    evaluation       the sums stay on the device until the end (bits, positions, patches); BLT's patch count
                     once per batch; a BPE model's summed loss once per batch (tokens.evaluate_bpb)
    generation       per byte: the sampled ids (EOS; streaming is the caller's), and the patch decision (entropy
                     patching: one; the other rules: patching.py's rule and its rows, two) or, naive, the patch
                     count; a BPE model one per token (the bytes spelled so far)
    learned boundaries one per forward (the chunk count); generating, two per step for the boundary decision
"""
import numpy as np
import pytest
import torch

import train
from blt import BLT, cpu_tiny
from device_audit import DeviceAudit
from entropy_model import ByteLMConfig
from patching import EOS_ID, calibrate_threshold
from sample import generate, generate_tokens, never_sampled
from tokens import TokenLMConfig, TokenSetup, tokenize_split, train_bpe

CPU = torch.device("cpu")
TINY = dict(local_dim=32, local_heads=2, decoder_layers=1, local_window=16, hash_ngram_sizes=(3, 4), hash_buckets=64,
            global_dim=64, global_layers=1, global_heads=2, multiple_of=16, entropy_dim=16, entropy_layers=1,
            entropy_heads=2, entropy_window=16)
TEXT = b"".join(b"Line %d: the quick brown fox jumps over the lazy dog.\n" % i for i in range(60))


def tiny_blt(patching: str) -> BLT:
    torch.manual_seed(0)
    model = BLT(cpu_tiny(patching=patching, **TINY))
    if model.entropy_model is not None:
        x = torch.randint(4, 260, (4, 64))
        model.cfg.entropy_threshold = calibrate_threshold(model.entropy_model.entropies(x), model.cfg.patch_size)
    return model


def token_setup() -> TokenSetup:
    tok = train_bpe(TEXT, 300)
    split = tokenize_split(tok, np.frombuffer(TEXT, dtype=np.uint8))
    return TokenSetup(tok, 16, len(TEXT) / split.n_tokens, split)


def make_task(kind: str):
    if kind in ("entropy", "space"):
        model = tiny_blt(kind)
        return train.Task("blt", model, model.cfg, train.TrainConfig(seq_len=32, batch_size=4, dtype="fp32"), CPU,
                          compile_model=False)
    if kind == "byte":
        torch.manual_seed(0)
        cfg = ByteLMConfig(dim=32, layers=1, heads=2, window=None, multiple_of=16)
        return train.Task("byte", cfg.build(), cfg, train.TrainConfig(seq_len=32, batch_size=4, dtype="fp32"), CPU,
                          compile_model=False)
    tokens = token_setup()
    torch.manual_seed(0)
    cfg = TokenLMConfig(vocab_size=tokens.tokenizer.vocab_size, dim=32, layers=1, heads=2, multiple_of=16)
    return train.Task("bpe", cfg.build(), cfg, train.TrainConfig(seq_len=32, batch_size=4, dtype="fp32"), CPU,
                      compile_model=False, tokens=tokens)


def audited_step(task, micro_batches: int) -> DeviceAudit:
    """train.train_loop's step, under the audit: lr, batch, zero_grad, forward/backward per micro-batch, clip,
    AdamW step, the loss kept on the device."""
    data = np.frombuffer(TEXT, dtype=np.uint8)
    optimizer = train.make_optimizer(task.model, task.tc, task.device)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    task.prepare()
    parts = [slice(i, i + 4 // micro_batches) for i in range(0, 4, 4 // micro_batches)]
    with DeviceAudit(task.model) as audit:
        for group in optimizer.param_groups:
            group["lr"] = train.lr_at(0, task.tc, 0.0)
        x, y = task.batch(data, 0)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for part in parts:
            loss = task.loss(x[part], y[part]) / len(parts)
            loss.backward()
            loss_sum = loss_sum + loss.detach()
        torch.nn.utils.clip_grad_norm_(trainable, task.tc.grad_clip)
        optimizer.step()
    assert torch.isfinite(loss_sum)
    return audit


@pytest.mark.parametrize("kind", ["entropy", "space", "byte", "bpe"])
def test_training_step_keeps_to_the_device(kind):
    task = make_task(kind)
    audit = audited_step(task, micro_batches=2)
    assert not audit.report(), audit.report()
    expected = 2 if kind in ("entropy", "space") else 0  # one per micro-batch: BLT's patch count
    assert audit.sync_count() == expected, dict(audit.syncs)


@pytest.mark.parametrize("kind", ["entropy", "byte", "bpe"])
def test_evaluation_keeps_to_the_device(kind):
    task = make_task(kind)
    val = np.frombuffer(TEXT[:1024], dtype=np.uint8)
    with DeviceAudit(task.model) as audit:
        m = task.evaluate(val, None)
    assert np.isfinite(m["val_bpb"])
    assert not audit.report(), audit.report()
    # the sums, once at the end (and BLT's patch count once per batch of 4 windows of 32 bytes)
    batches = -(-(len(val) - 1) // (32 * 4))
    expected = {"entropy": 3 + batches, "byte": 1, "bpe": batches + 1}[kind]  # bpe: tokens.evaluate_bpb's sum per batch
    assert audit.sync_count() <= expected, dict(audit.syncs)


def seed_ending_one_row_in_eos(model, n: int) -> int:
    """A seed with which row 0 of 2 emits EOS before n bytes and row 1 does not (found, not assumed)."""
    for seed in range(200):
        tokens, _ = generate(model, b"The", n, batch_size=2, temperature=1.5, seed=seed, stop_at_eos=False)
        rows = [(r == EOS_ID).nonzero() for r in tokens[:, 4:]]
        if len(rows[0]) and not len(rows[1]):
            return seed
    raise AssertionError("no seed in 200 ends one row in EOS")


@pytest.mark.parametrize("patching", ["entropy", "space"])
@pytest.mark.parametrize("naive", [False, True])
def test_generation_keeps_to_the_device(patching, naive):
    model = tiny_blt(patching)
    n = 24
    seed = seed_ending_one_row_in_eos(model, n)
    seen = []
    never_sampled.cache_clear()  # its (V,) bias is made once per device: inside the audit, to be seen
    with DeviceAudit(model) as audit:
        tokens, _ = generate(model, b"The", n, batch_size=2, temperature=1.5, seed=seed, naive=naive,
                             on_byte=lambda ids: seen.append(ids.tolist()))
    assert not audit.report(), audit.report()
    assert EOS_ID in tokens[0, 4:].tolist() and tokens.shape[1] == 4 + n  # row 0 ended, row 1 went on
    # per generated byte: its ids for the finished rows (generate) and for on_byte (the caller's, as sample.py's
    # streaming); naive: the patch count of each recomputation; incremental: the patch decision of every step
    # (BOS, the prompt and the generated bytes), one sync for the entropy rule, two for the others
    steps = 1 + 3 + n
    budget = 2 * n + (n if naive else steps * (1 if patching == "entropy" else 2))
    assert audit.sync_count() <= budget, dict(audit.syncs)


@pytest.mark.parametrize("naive", [False, True])
def test_byte_and_bpe_generation_keep_to_the_device(naive):
    task = make_task("byte")
    never_sampled.cache_clear()
    with DeviceAudit(task.model) as audit:
        generate(task.model, b"The", 16, batch_size=2, temperature=1.0, seed=1, naive=naive, stop_at_eos=False)
    assert not audit.report(), audit.report()
    assert audit.sync_count() <= 16, dict(audit.syncs)  # the sampled ids, once per byte
    task = make_task("bpe")
    task.model.tokens = task.tokens
    with DeviceAudit(task.model) as audit:
        ids, _ = generate_tokens(task.model, b"The", 16, batch_size=2, temperature=1.0, seed=1, naive=naive)
    assert not audit.report(), audit.report()
    assert audit.sync_count() <= ids.shape[1], dict(audit.syncs)  # once per token (and the prompt's encoding)


@pytest.mark.parametrize("naive", [False, True])
def test_learned_boundaries_keep_to_the_device(naive):
    """BLT with learned boundaries (learned.py): a forward and backward, and generation. Its chunk count is one
    sync per forward; its incremental step decides a boundary with two per byte."""
    from test_learned import make_model
    model = make_model()
    x = torch.randint(4, 260, (2, 32), generator=torch.Generator().manual_seed(0))
    with DeviceAudit(model) as audit:
        audit.mark(x)  # a batch train.py has moved to the device
        model.train()
        model(x, x)[1].backward()
    assert not audit.report(), audit.report()
    assert audit.sync_count() == 1, dict(audit.syncs)
    never_sampled.cache_clear()
    with DeviceAudit(model) as audit:
        generate(model, b"The", 16, batch_size=2, temperature=1.0, seed=1, naive=naive, stop_at_eos=False)
    assert not audit.report(), audit.report()
    assert audit.sync_count() <= 16 + (16 if naive else 2 * (4 + 16)), dict(audit.syncs)

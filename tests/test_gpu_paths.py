"""What a first run on one GPU meets, checked on the CPU: sample.py's --device and its seeds, the default run's
corpus and passes, fp16 with a gradient scaler (and bf16 refused where a GPU only emulates it), the entropy
model's patching pass without TF32, the random states a checkpoint carries, and compile time on the clock."""
import json
from types import SimpleNamespace

import pytest
import torch

import checkpoint
import runtime
import sample
import train
from sample import sample_next
from test_train import TINY_TRAINING, corpus_file, records  # noqa: F401  (a pytest fixture)

BYTE = ["--model", "byte", "--config", "dim=32", "--config", "heads=2", "--config", "layers=1",
        "--config", "multiple_of=16"]


def old_sample_next(logits, temperature, top_k, top_p, generator, banned):
    """sample.py's draw before it took a --device: the same filtering, then the noise drawn with
    torch.empty_like(probs) on the logits' device. sample_next must give the same ids on the CPU."""
    logits = logits.float() + banned
    if temperature != 1:
        logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax(-1)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, None), (0.8, 20, None), (1.3, None, 0.9)])
def test_host_drawn_noise_gives_the_ids_of_before(temperature, top_k, top_p):
    banned = torch.zeros(260)
    banned[:2] = float("-inf")
    new, old = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    logits = torch.randn(200, 3, 260, generator=torch.Generator().manual_seed(0)) * 3
    got = torch.stack([sample_next(l, temperature, top_k, top_p, new, banned) for l in logits])
    want = torch.stack([old_sample_next(l, temperature, top_k, top_p, old, banned) for l in logits])
    assert torch.equal(got, want)
    assert len(set(got.flatten().tolist())) > 20  # sampled, not greedy


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_sample_py_on_cuda_without_cuda_is_one_line(capsys):
    assert sample.main(["--device", "cuda", "--checkpoint", "does-not-matter.pt", "--prompt", "x"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == "error: --device cuda: CUDA is not available here\n", err


# ---- the default run ----

def args_of(*flags):
    return train.parse_args(list(flags), train.PRESETS)


def test_default_preset_and_corpus_follow_the_device():
    assert train.default_preset(args_of(), torch.device("cuda")) == ("gpu", "enwik8")
    assert train.default_preset(args_of(), torch.device("cpu")) == ("cpu", "shakespeare")
    assert train.default_preset(args_of("--data", "x.txt"), torch.device("cuda")) == ("gpu", "x.txt")
    assert train.default_preset(args_of("--preset", "cpu"), torch.device("cuda")) == ("cpu", "shakespeare")


def planned_passes(preset: str, train_bytes: int, *flags) -> str:
    args = args_of("--preset", preset, *flags)
    _, _, _, tc, entropy_tc, opts, stages = train.settings(args, preset, torch.device("cpu"))
    return train.passes_line(stages, opts, tc, entropy_tc, train_bytes, args.time_budget)


ENWIK8_TRAIN, SHAKESPEARE_TRAIN = 90_000_000, 4_538_523


def passes_in(line: str) -> list[float]:
    return [float(part.split(" (")[0].rsplit(" ", 1)[1]) for part in line.split(": ", 1)[1].split("; ")[0].split(", ")]


def test_the_gpu_default_reads_enwik8_a_few_times_and_warns_on_a_small_corpus():
    line = planned_passes("gpu", ENWIK8_TRAIN)
    passes = passes_in(line)
    assert len(passes) == 2 and all(1 <= p <= train.MAX_PASSES for p in passes), line  # entropy model, BLT
    assert "warning" not in line
    small = planned_passes("gpu", SHAKESPEARE_TRAIN)  # the gpu preset on the cpu default's corpus
    assert "warning: the entropy model and BLT will read the training split more than" in small, small
    assert max(passes_in(small)) > 50
    # the cpu default: about one pass over its corpus, no warning; a budget: decided by the clock
    assert "warning" not in planned_passes("cpu", SHAKESPEARE_TRAIN) and max(passes_in(planned_passes("cpu", SHAKESPEARE_TRAIN))) < 2
    assert "as many as --time-budget allows" in planned_passes("cpu", SHAKESPEARE_TRAIN, "--time-budget", "60")
    assert passes_in(planned_passes("cpu", SHAKESPEARE_TRAIN, "--model", "byte")) == pytest.approx(
        [600 * 32 * 256 / SHAKESPEARE_TRAIN], abs=0.01)


def test_train_py_says_its_passes_at_start(corpus_file, tmp_path, capsys):  # noqa: F811
    assert train.main(["--data", str(corpus_file), *TINY_TRAINING, *BYTE, "--dtype", "fp32", "--steps", "3",
                       "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    size = checkpoint.read_checkpoint(tmp_path / "byte.pt")["corpus"]["train_bytes"]
    assert f"passes over the training split ({size:,} bytes): the byte model {3 * 4 * 32 / size:.3g} (3 steps)" in out


# ---- dtypes ----

def gpu_settings(monkeypatch, native: bool, *flags):
    monkeypatch.setattr(runtime, "native_bf16", lambda device, *a: native if device.type == "cuda" else False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    return train.settings(args_of(*flags), "gpu", torch.device("cuda"))


def test_bf16_where_native_fp16_where_not_and_emulated_bf16_refused(monkeypatch):
    assert gpu_settings(monkeypatch, True)[3].dtype == "bf16"
    assert gpu_settings(monkeypatch, False)[3].dtype == "fp16"
    with pytest.raises(runtime.UsageError, match=r"^--dtype bf16: Tesla T4 has no native bf16; use --dtype fp16"):
        gpu_settings(monkeypatch, False, "--dtype", "bf16")
    assert gpu_settings(monkeypatch, False, "--dtype", "fp32")[3].dtype == "fp32"


def test_fp16_trains_with_a_scaler_and_resumes_exactly(corpus_file, tmp_path):  # noqa: F811
    """fp16 autocast and torch.amp.GradScaler on the CPU: the scaler's state is in the checkpoint, and a run
    stopped and resumed takes the uninterrupted run's steps."""
    common = ["--data", str(corpus_file), *TINY_TRAINING, *BYTE, "--dtype", "fp16", "--steps", "8",
              "--warmup-steps", "2", "--lr", "1e-2"]
    assert train.main([*common, "--out", str(tmp_path / "one")]) == 0
    assert train.main([*common, "--out", str(tmp_path / "two"), "--stop-at", "4"]) == 0
    stopped = checkpoint.read_checkpoint(tmp_path / "two" / "byte.pt")
    assert stopped["step"] == 4 and stopped["train"]["dtype"] == "fp16"
    assert stopped["scaler"]["scale"] > 0 and stopped["scaler"]["_growth_tracker"] >= 1
    assert train.main([*common, "--out", str(tmp_path / "two"), "--resume"]) == 0
    a = [r["loss"] for r in records(tmp_path / "one" / "byte.jsonl", "train")]
    b = [r["loss"] for r in records(tmp_path / "two" / "byte.jsonl", "train")]
    assert len(a) == 8 and a == b
    assert a[-1] < a[0] - 0.5, "fp16 trains"
    final = checkpoint.read_checkpoint(tmp_path / "one" / "byte.pt")
    assert final["scaler"] == checkpoint.read_checkpoint(tmp_path / "two" / "byte.pt")["scaler"]


# ---- reproducible patching and resume ----

def test_full_fp32_turns_tf32_off_inside_only():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with runtime.full_fp32():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_patching_passes_run_without_tf32(monkeypatch):
    """Training's, calibration's and evaluation's patching passes run inside full_fp32."""
    seen = []
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    model = SimpleNamespace(patch=lambda x: seen.append(torch.backends.cuda.matmul.allow_tf32) or torch.ones(1, 1))
    task = train.Task.__new__(train.Task)
    task.model, task.compile_model = model, False
    task.patch(torch.zeros(1, 4))
    assert seen == [False] and torch.backends.cuda.matmul.allow_tf32


def test_checkpoint_random_state_round_trips_without_cuda():
    state = checkpoint.rng_state()
    assert ("cuda" in state) == (torch.cuda.is_available() and torch.cuda.is_initialized())
    a = torch.rand(3)
    checkpoint.set_rng_state(state)
    assert torch.equal(torch.rand(3), a)
    checkpoint.set_rng_state({**state, "cuda": torch.zeros(16, dtype=torch.uint8)})  # a GPU checkpoint on a CPU


# ---- compile time and the clock ----

def test_compile_time_is_reported_and_left_out_of_the_clock(corpus_file, tmp_path, capsys, monkeypatch):  # noqa: F811
    prepare = train.Task.prepare
    # dynamo's own "eager" backend: graphs are captured (and counted) without compiling them, to keep this short
    monkeypatch.setattr(train.Task, "prepare", lambda self, backend="eager": prepare(self, "eager"))
    before = runtime.Clock.excluded
    assert train.main(["--data", str(corpus_file), *TINY_TRAINING, *BYTE, "--dtype", "fp32", "--time-budget", "6",
                       "--compile", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    [line] = [l for l in out.splitlines() if "compiling took" in l]
    seconds = float(line.split("compiling took ")[1].split(" s")[0])
    assert line.startswith("byte: compiling took") and "left out of the clock and of --time-budget" in line
    assert runtime.Clock.excluded - before >= seconds - 0.5
    logged = records(tmp_path / "byte.jsonl", "train")
    assert logged[0]["graphs"] >= 1 and logged[-1]["graphs"] == logged[0]["graphs"]
    assert json.loads((tmp_path / "byte.jsonl").read_text().splitlines()[-1])["type"] == "eval"

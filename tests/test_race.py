"""BLT on the clock: the defaults every time-budgeted run shares (the dtype this machine runs fastest, no
evaluation along the way), tools/race.py end to end on a tiny corpus, and bench_train's BPE trainer."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from runtime import default_dtype, native_bf16

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import race  # noqa: E402


@pytest.mark.parametrize("flags, native", [
    ("fpu vme sse sse2 avx avx2 fma", False),  # AVX2 only: bf16 would be emulated
    ("fpu sse2 avx2 avx512f avx512bw avx512vl", False),  # AVX-512 without its BF16 extension
    ("fpu avx2 avx512f avx512_bf16", True),
    ("fpu avx2 avx512f amx_bf16 amx_tile", True),
])
def test_native_bf16_reads_the_cpu_flags(tmp_path, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert native_bf16(torch.device("cpu"), str(cpuinfo)) is native


def test_native_bf16_on_arm(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm aes sve bf16 i8mm\n")
    assert native_bf16(torch.device("cpu"), str(cpuinfo))
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm aes\n")
    assert not native_bf16(torch.device("cpu"), str(cpuinfo))


def settings(*flags: str):
    args = train.parse_args(["--data", "tinyshakespeare", *flags], train.PRESETS)
    return train.settings(args, "cpu", torch.device("cpu"))


def test_dtype_defaults_to_the_fast_one_here_and_the_flag_wins():
    _, _, _, tc, entropy_tc, _, _ = settings()
    assert tc.dtype == entropy_tc.dtype == default_dtype(torch.device("cpu"))
    for dtype in ("bf16", "fp32"):
        _, _, _, tc, entropy_tc, _, _ = settings("--dtype", dtype)
        assert tc.dtype == entropy_tc.dtype == dtype


@pytest.mark.parametrize("model", ["blt", "bpe", "byte"])
def test_no_periodic_evaluation_under_a_time_budget_for_every_model(model):
    opts = settings("--model", model, "--time-budget", "300")[5]
    assert opts.eval_interval == opts.checkpoint_interval == train.NEVER  # every second trains, for every model
    assert settings("--model", model, "--time-budget", "300", "--eval-interval", "7")[5].eval_interval == 7
    assert settings("--model", model)[5].eval_interval == train.PRESETS["cpu"]["eval_interval"]  # steps: as before


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("race") / "text.txt"
    path.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog, {i * 7 % 13} times.\n"
                            for i in range(400)))
    return path


def test_race_runs_each_plain_command_reuses_finished_runs_and_publishes_only_when_asked(small_text, tmp_path,
                                                                                         monkeypatch, capsys):
    out = tmp_path / "race"
    argv = ["--data", str(small_text), "--time-budget", "12", "--out", str(out), "--only", "blt,bpe",
            "--extra", "--preset smoke --seq-len 32"]
    commands = []
    real_run = race.run_one
    monkeypatch.setattr(race, "run_one", lambda *a: (commands.append(a), real_run(*a)))
    pages = [tmp_path / "README.md", tmp_path / "training.md"]
    start, end = race.markers(str(small_text), 12)
    pages[0].write_text(f"intro\n{start}\nold table\n{end}\nrest\n")
    pages[1].write_text("no markers here\n")
    monkeypatch.setattr(race, "PUBLISHED", tuple(pages))
    assert race.main(argv) == 0
    assert [c[1][:2] for c in commands] == [["--preset", "smoke"], ["--model", "bpe"]]  # the plain commands
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert len(table) == 3 and table[0].startswith("| command (`--time-budget 12`) | steps | bytes seen")
    assert pages[0].read_text() == f"intro\n{start}\nold table\n{end}\nrest\n"  # nothing published unasked
    for line in table[1:]:
        steps, seen, mflop, gflops, bpb = (cell.strip().strip("*") for cell in line.split("|")[2:7])
        assert int(steps.replace(",", "")) >= 1 and float(mflop) > 0 and float(gflops) > 0 and 0 < float(bpb) < 9
    # Again, with --publish: both runs are reused (no train.py), the table lands between the markers only.
    commands.clear()
    assert race.main([*argv, "--publish"]) == 0
    captured = capsys.readouterr()
    assert commands == [] and "reused" in captured.out and "rewrote README.md" not in captured.out
    body = pages[0].read_text()
    assert body.startswith(f"intro\n{start}\n`python tools/race.py") and body.endswith(f"{end}\nrest\n")
    assert "old table" not in body and all(line in body for line in table)
    assert pages[1].read_text() == "no markers here\n" and "no <!-- race" in captured.err
    # A table it cannot write ends in one line naming the path.
    (out / "race.md").unlink()
    (out / "race.md").mkdir()
    with pytest.raises(SystemExit) as e:
        race.main(argv)
    assert str(e.value).startswith(f"error: cannot write {out / 'race.md'}")


def test_race_counts_a_bpe_models_flops_on_the_bytes_it_trained_on(tmp_path):
    """A BPE model's FLOPs go per token; its final record gives FLOPs per held-out byte (2.90 bytes per token),
    but it trained on bytes its tokenizer packs tighter (3.26): achieved FLOP/s counts those. Logs without the
    training figure take it from the run's checkpoint."""
    final = {"steps": 10, "bytes": 1e6, "stage_seconds": 100.0, "train_flops_per_byte": 9e6, "val_bpb": 2.4,
             "val_bytes": 1000, "bytes_per_token": 2.90, "train_bytes_per_token": 3.26}
    records = [{"type": "train", "time": 100.0}]
    assert race.row("bpe", final, records, None)["gflop_per_s"] == pytest.approx(9e6 * 1e6 * 2.90 / 3.26 / 100 / 1e9)
    byte_final = {k: v for k, v in final.items() if "per_token" not in k}
    assert race.row("byte", byte_final, records, None)["gflop_per_s"] == pytest.approx(90.0)  # no tokens: as is
    older = {k: v for k, v in final.items() if k != "train_bytes_per_token"}
    torch.save({"tokens": {"seq_len": 39, "train_bytes_per_token": 3.0}}, tmp_path / "bpe.pt")
    assert race.row("bpe", older, records, None, tmp_path)["gflop_per_s"] == pytest.approx(90.0 * 2.90 / 3.0)


def test_race_refuses_unknown_runs_and_bad_budgets(capsys):
    for argv in (["--only", "blt,gpt"], ["--time-budget", "0"]):
        with pytest.raises(SystemExit) as e:
            race.main(argv)
        assert e.value.code == 2
    assert "unknown run(s) gpt" in capsys.readouterr().err


def test_bench_trains_the_bpe_model_on_real_text():
    import bench_train
    trainer = bench_train.Trainer("smoke", "bpe", "fp32")
    assert trainer.kind == "bpe" and 1.5 < trainer.tokens.train_bytes_per_token < 8  # text, not random bytes
    assert trainer.step(0) > 0 and set(trainer.split) == {"forward", "backward", "clip + AdamW"}
    assert trainer.bytes_per_step == pytest.approx(trainer.tc.batch_size * trainer.tokens.bytes_per_window)
    assert trainer.flops_per_byte() > 0


def test_bench_counts_flops_at_the_average_patch_size_of_its_batches():
    """The global transformer's FLOPs per byte go as 1 / patch size: the benchmark takes the bytes per patch
    over every batch it patched, not the first batch's."""
    import bench_train
    trainer = bench_train.Trainer("smoke", "blt", "fp32")
    lengths = [trainer.task.patch(trainer.task.batch(trainer.corpus, i)[0]) for i in range(3)]
    want = sum(float(x.sum()) for x in lengths) / sum(float((x > 0).sum()) for x in lengths)
    assert trainer.patch_size == pytest.approx(want)
    sizes = [float(x.sum()) / float((x > 0).sum()) for x in lengths]
    assert min(sizes) <= trainer.patch_size <= max(sizes)


def test_bench_reads_the_race_corpus_where_it_is_prepared(tmp_path, monkeypatch):
    import bench_train
    import data
    monkeypatch.setattr(data, "DATA_DIR", tmp_path)
    assert bench_train.bench_text_source() == "this repository's files"
    own = bench_train.bench_text()
    (tmp_path / "tinyshakespeare").mkdir()
    text = b"First Citizen: speak, speak. " * 30000  # 870 KB, as the real split (1.0 MB) under 1 MiB
    (tmp_path / "tinyshakespeare" / "train.bin").write_bytes(text)
    assert bench_train.bench_text_source().endswith("train.bin")
    got = bench_train.bench_text()
    assert len(got) == len(own) == 1 << 20 and got.tobytes() == (text * 2)[:1 << 20]


def test_bench_skip_costs_keep_the_global_backward_and_undo_their_stand_ins(monkeypatch):
    """bench_train --race's cost of BLT's own parts: the stand-ins are undone afterwards, and the cross-attention's
    stand-in still reads the global transformer, so that its backward (not the part's) stays in the step."""
    import bench_train
    import layers
    original = layers.CrossAttention.forward
    r = bench_train.skip_costs("smoke", "fp32", steps=1)
    assert layers.CrossAttention.forward is original
    assert set(r["parts"]) == set(bench_train.SKIPS) and all(-1 < share < 1 for share in r["parts"].values())
    trainer = bench_train.Trainer("smoke", "blt", "fp32")
    owner, method, stand_in = next(v for k, v in bench_train.SKIPS.items() if k.startswith("cross-attentions"))
    monkeypatch.setattr(owner, method, stand_in)
    trainer.step(0)
    model = trainer.task.model
    assert all(p.grad is not None for p in model.global_transformer.parameters())
    assert all(p.grad is None for p in model.decoder.cross_attn.parameters())  # the part itself is gone


def test_small_preset_patches_by_spaces_only_where_spaces_cut_words(tmp_path, capsys):
    """Space patching cuts Cyrillic (or Chinese) text into a patch per character: there the small preset
    patches with a stride instead, and says so; on English it keeps space patching."""
    english = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog, {i * 7 % 13} times.\n" for i in range(400))
    latin, cyrillic = "abcdefghijklmnopqrstuvwxyz", "абцдефгхийклмнопярстуввхыз"
    russian_like = english.translate(str.maketrans(latin + latin.upper(), cyrillic + cyrillic.upper()))
    assert train.space_patch_size(np.frombuffer(english.encode(), dtype=np.uint8)) > train.MIN_SPACE_PATCH
    assert train.space_patch_size(np.frombuffer(russian_like.encode(), dtype=np.uint8)) < 2.5
    for text, scheme in ((english, "space"), (russian_like, "strided")):
        path = tmp_path / f"{scheme}.txt"
        path.write_text(text)
        out = tmp_path / f"out-{scheme}"
        assert train.main(["--data", str(path), "--time-budget", "600", "--stop-at", "1", "--out", str(out)]) == 0
        first = capsys.readouterr().out.splitlines()[0]
        assert ("strided patching: space patching cuts this text into" in first) == (scheme == "strided"), first
        ckpt = torch.load(out / f"blt_{scheme}.pt", weights_only=True)
        assert ckpt["config"]["patching"] == scheme and ckpt["step"] == 1
    # Asked for by name, space patching is kept.
    assert train.main(["--data", str(tmp_path / "strided.txt"), "--time-budget", "600", "--stop-at", "1",
                       "--patching", "space", "--out", str(tmp_path / "asked")]) == 0
    assert (tmp_path / "asked" / "blt_space.pt").exists()

"""Every bad input gets one line (issue: bad input and interrupts). A table of wrong or unusual inputs to train.py
and sample.py, each run as `python SCRIPT ARGS` would run (tests/clirunner.py forks them from a server that
has already imported torch). For each: a non-zero exit, exactly one line on stderr that starts with "error: "
and names the problem, no traceback, and every checkpoint that was there before has the same bytes after.

Permission and full-disk cases are simulated in the child (tests run as root, whom chmod does not stop):
clirunner's `eacces` makes opening a path for reading fail, `enospc` makes writes under a path fail."""
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import clirunner
from test_train import TINY

T, S = "train.py", "sample.py"


@dataclass
class Case:
    id: str
    script: str
    args: list
    expect: str  # in the one stderr line
    trained: bool = False  # add TINY's model flags (the cases that load or continue base's checkpoints)
    setup: object = None  # setup(out, tmp) before the run: damage a file, make a folder
    faults: dict = field(default_factory=dict)  # clirunner faults; "{out}"-style placeholders allowed
    fresh: bool = False  # a real new interpreter (slow: torch's imports), to check the true entry too


# ---- damaged files (setup functions) ----

def edit_checkpoint(name: str, change):
    def setup(out: Path, tmp: Path):
        ckpt = torch.load(out / name, weights_only=True)
        change(ckpt)
        torch.save(ckpt, out / name)
    return setup


def wrong_shape_weights(ckpt):
    key = next(iter(ckpt["model"]))
    ckpt["model"][key] = torch.zeros(3)


def wrong_shape_optimizer(ckpt):
    state = next(iter(ckpt["optimizer"]["state"].values()))
    state["exp_avg"] = torch.zeros(5, 5)


def write(name: str, text: str):
    def setup(out: Path, tmp: Path):
        (out / name).write_text(text)
    return setup


def truncate(name: str):
    def setup(out: Path, tmp: Path):
        (out / name).write_bytes((out / name).read_bytes()[:2000])
    return setup


def bad_blt_config(out: Path, tmp: Path):
    ckpt = torch.load(out / "blt_entropy.pt", weights_only=True)
    ckpt["config"]["local_heads"] = 3
    torch.save(ckpt, out / "bad_config.pt")


def uncalibrated(out: Path, tmp: Path):
    ckpt = torch.load(out / "blt_entropy.pt", weights_only=True)
    ckpt["config"]["entropy_threshold"] = None
    torch.save(ckpt, out / "uncalibrated.pt")


def empty_folder(out: Path, tmp: Path):
    (tmp / "empty").mkdir()


STRIDED = ["--patching", "strided", "--steps", "6", "--resume"]  # continues base's blt_strided.pt (step 3 of 6)

CASES = [
    # ---- train.py: flags ----
    Case("steps-negative", T, ["--steps", "-1"], "argument --steps: '-1': must be a whole number >= 1", fresh=True),
    Case("steps-zero", T, ["--steps", "0"], "argument --steps: '0': must be a whole number >= 1"),
    Case("steps-text", T, ["--steps", "many"], "argument --steps: 'many'"),
    Case("entropy-steps-negative", T, ["--entropy-steps", "-5"], "argument --entropy-steps: '-5'"),
    Case("patch-size-zero", T, ["--patch-size", "0"], "argument --patch-size: '0': must be a finite number >= 1"),
    Case("patch-size-nan", T, ["--patch-size", "nan"], "argument --patch-size: 'nan'"),
    Case("strided-fractional-stride", T, ["--patching", "strided", "--patch-size", "2.5"],
         "--patch-size 2.5: strided patching needs a whole stride"),
    Case("strided-negative-stride", T, ["--patching", "strided", "--patch-size", "-2"], "argument --patch-size: '-2'"),
    Case("patching-flag-vs-config", T, ["--patching", "entropy", "--config", "patching=space"],
         "--patching entropy and --config patching=space disagree"),
    Case("patch-size-flag-vs-config", T, ["--patch-size", "3", "--config", "patch_size=4"],
         "--patch-size 3 and --config patch_size=4 disagree"),
    Case("config-unknown-scheme", T, ["--config", "patching=bpe"], "--config patching='bpe': unknown patching scheme"),
    Case("config-max-patch-length-negative", T, ["--config", "max_patch_length=-3"],
         "--config max_patch_length=-3: must be null (no limit) or a whole number >= 1"),
    Case("config-max-patch-length-zero", T, ["--config", "max_patch_length=0"], "--config max_patch_length=0"),
    Case("config-max-patch-length-below-target", T, ["--config", "max_patch_length=2"],
         "max_patch_length=2: must be at least patch_size 4"),
    Case("config-local-dim-text", T, ["--config", "local_dim=abc"], "--config local_dim='abc': must be a whole number"),
    Case("config-local-dim-100", T, ["--config", "local_dim=100"], "--config local_dim=100, local_heads=4: each head's width"),
    Case("config-local-heads-3", T, ["--config", "local_heads=3"], "--config local_dim=128, local_heads=3"),
    Case("config-global-heads-bool", T, ["--config", "global_heads=true"], "--config global_heads=True: must be a whole"),
    Case("config-hash-ngrams-int", T, ["--config", "hash_ngram_sizes=5"], "--config hash_ngram_sizes=5: must be a list"),
    Case("config-hash-ngrams-zero", T, ["--config", "hash_ngram_sizes=[0,3]"], "--config hash_ngram_sizes=[0, 3]"),
    Case("config-dropout-one", T, ["--config", "dropout=1"], "--config dropout=1: must be a number in [0, 1)"),
    Case("config-norm-eps-zero", T, ["--config", "norm_eps=0"], "--config norm_eps=0: must be a number > 0"),
    Case("config-window-zero", T, ["--config", "local_window=0"], "--config local_window=0"),
    Case("config-unknown-key", T, ["--config", "nosuch=1"], "--config 'nosuch=1': expected KEY=VALUE"),
    Case("config-no-value", T, ["--config", "local_dim"], "--config 'local_dim': expected KEY=VALUE"),
    Case("config-threshold-by-hand", T, ["--config", "entropy_threshold=1.5"], "--config entropy_threshold: the threshold"),
    Case("byte-model-odd-heads", T, ["--model", "byte", "--config", "dim=100"], "--config dim=100, heads=4"),
    Case("byte-model-with-patching", T, ["--model", "byte", "--patching", "space"], "--patching sets BLT's patches"),
    Case("byte-model-with-stage", T, ["--model", "byte", "--stage", "entropy"], "--stage entropy is a stage of BLT"),
    Case("hash-ngrams-on-blt", T, ["--hash-ngrams"], "--hash-ngrams adds BLT's hash n-grams to --model byte"),
    Case("no-hash-on-byte", T, ["--model", "byte", "--no-hash"], "--no-hash turns off BLT's hash n-grams"),
    Case("seq-len-zero", T, ["--seq-len", "0"], "argument --seq-len: '0'"),
    Case("entropy-seq-len-negative", T, ["--entropy-seq-len", "-64"], "argument --entropy-seq-len: '-64'"),
    Case("batch-size-zero", T, ["--batch-size", "0"], "argument --batch-size: '0'"),
    Case("micro-batch-uneven", T, ["--batch-size", "4", "--micro-batch-size", "3"],
         "--batch-size 4 must split evenly into 1 processes x micro-batches of 3"),
    Case("lr-negative", T, ["--lr", "-1"], "argument --lr: '-1': must be a finite number > 0"),
    Case("lr-inf", T, ["--lr", "inf"], "argument --lr: 'inf'"),
    Case("entropy-lr-zero", T, ["--entropy-lr", "0"], "argument --entropy-lr: '0'"),
    Case("weight-decay-negative", T, ["--weight-decay", "-0.1"], "argument --weight-decay: '-0.1': must be a finite number >= 0"),
    Case("warmup-negative", T, ["--warmup-steps", "-1"], "argument --warmup-steps: '-1': must be a whole number >= 0"),
    Case("device-tpu", T, ["--device", "tpu"], "argument --device: 'tpu': must be cpu, cuda, cuda:N or mps"),
    Case("device-no-such-gpu", T, ["--device", "cuda:99"], "--device cuda:99: "),
    Case("threads-zero", T, ["--threads", "0"], "argument --threads: '0'"),
    Case("time-budget-negative", T, ["--time-budget", "-5"], "argument --time-budget: '-5'"),
    Case("time-budget-and-steps", T, ["--time-budget", "60", "--steps", "10"], "--time-budget and --steps both set"),
    Case("eval-interval-zero", T, ["--eval-interval", "0"], "argument --eval-interval: '0'"),
    Case("eval-bytes-negative", T, ["--eval-bytes", "-1"], "argument --eval-bytes: '-1'"),
    Case("final-eval-bytes-negative", T, ["--final-eval-bytes", "-1"], "argument --final-eval-bytes: '-1'"),
    Case("log-interval-zero", T, ["--log-interval", "0"], "argument --log-interval: '0'"),
    Case("checkpoint-interval-zero", T, ["--checkpoint-interval", "0"], "argument --checkpoint-interval: '0'"),
    Case("calibration-windows-zero", T, ["--calibration-windows", "0"], "argument --calibration-windows: '0'"),
    Case("stop-at-zero", T, ["--stop-at", "0"], "argument --stop-at: '0'"),
    Case("stop-at-past-the-end", T, ["--steps", "6", "--entropy-steps", "4", "--stop-at", "6"],
         "--stop-at 6 is not before the last step (6)"),
    Case("seed-negative", T, ["--seed", "-1"], "argument --seed: '-1': must be a whole number >= 0"),
    Case("resume-and-overwrite", T, ["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
    Case("calibrate-without-entropy", T, ["--stage", "calibrate", "--patching", "strided"],
         "--stage calibrate needs entropy or monotonic patching"),
    Case("misspelt-flag", T, ["--stpes", "5"], "unrecognized arguments: --stpes 5"),
    Case("unknown-preset", T, ["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    Case("existing-run-without-resume", T, ["--patching", "strided", "--steps", "6"], "already exists: pass --resume",
         trained=True),
    # ---- train.py: data and output folder ----
    Case("data-empty-name", T, ["--data", ""], "argument --data: must not be empty"),
    Case("data-missing", T, ["--data", "{tmp}/missing.txt"], "no such file or directory: {tmp}/missing.txt"),
    Case("data-unreadable", T, [], "cannot read --data {corpus}: Permission denied", faults={"eacces": "{corpus}"}),
    Case("data-device-file", T, ["--data", "/dev/null"], "/dev/null is not a regular file or a directory"),
    Case("data-empty-folder", T, ["--data", "{tmp}/empty"], "{tmp}/empty holds no files", setup=empty_folder),
    Case("out-empty-name", T, ["--out", ""], "argument --out: must not be empty"),
    Case("out-is-a-file", T, ["--out", "{corpus}"], "cannot use {corpus} as the output folder: it is a file"),
    Case("out-under-a-file", T, ["--out", "{corpus}/run"], "cannot write in the output folder {corpus}/run: Not a directory"),
    Case("out-in-proc", T, ["--out", "/proc/blt-out"], "cannot write in the output folder /proc/blt-out"),
    Case("out-in-sys", T, ["--out", "/sys/blt-out"], "cannot write in the output folder /sys/blt-out"),
    Case("full-disk-metrics-log", T, STRIDED, "cannot write {out}/blt_strided.jsonl: No space left on device",
         trained=True, faults={"enospc": "{out}/"}),
    Case("full-disk-checkpoint", T, STRIDED,
         "cannot write {out}/blt_strided.pt: No space left on device; the previous version is unchanged",
         trained=True, faults={"enospc": "{out}/.blt_strided.pt.tmp"}),
    Case("full-disk-calibration", T, ["--stage", "calibrate"],
         "cannot write {out}/calibration.json: No space left on device; the previous version is unchanged",
         trained=True, faults={"enospc": "{out}/.calibration.json.tmp"}),
    # ---- train.py: checkpoints and calibration from earlier runs ----
    Case("checkpoint-unreadable", T, STRIDED, "cannot read {out}/blt_strided.pt: Permission denied", trained=True,
         faults={"eacces": "{out}/blt_strided.pt"}),
    Case("checkpoint-truncated", T, STRIDED, "not a readable checkpoint", trained=True, setup=truncate("blt_strided.pt")),
    Case("checkpoint-without-optimizer", T, STRIDED, "its 'optimizer' entry is missing", trained=True,
         setup=edit_checkpoint("blt_strided.pt", lambda c: c.pop("optimizer"))),
    Case("checkpoint-rng-a-list", T, STRIDED, "its 'rng' entry is a list", trained=True,
         setup=edit_checkpoint("blt_strided.pt", lambda c: c.update(rng=[1, 2]))),
    Case("checkpoint-weights-a-list", T, STRIDED, "its 'model' entry is a list", trained=True,
         setup=edit_checkpoint("blt_strided.pt", lambda c: c.update(model=[]))),
    Case("checkpoint-step-text", T, STRIDED, "its 'step' entry is a str", trained=True,
         setup=edit_checkpoint("blt_strided.pt", lambda c: c.update(step="3"))),
    Case("checkpoint-weights-wrong-shape", T, STRIDED, "weights do not fit the model: Error(s) in loading state_dict for "
         "BLT: size mismatch", trained=True,
         setup=edit_checkpoint("blt_strided.pt", wrong_shape_weights)),
    Case("checkpoint-optimizer-wrong-shape", T, STRIDED, "its optimizer state does not fit the model", trained=True,
         setup=edit_checkpoint("blt_strided.pt", wrong_shape_optimizer)),
    Case("checkpoint-rng-damaged", T, STRIDED, "its random state is unusable", trained=True,
         setup=edit_checkpoint("blt_strided.pt", lambda c: c["rng"].update(torch=torch.zeros(3)))),
    Case("checkpoint-other-step-count", T, ["--patching", "strided", "--steps", "8", "--resume"],
         "another config (steps: 6 in the checkpoint, 8 now)", trained=True),
    Case("checkpoint-other-config", T, [*STRIDED, "--config", "global_dim=96"],
         "another config (global_dim: 64 in the checkpoint, 96 now)", trained=True),
    Case("calibration-not-json", T, ["--stage", "blt", "--resume"], "{out}/calibration.json is damaged", trained=True,
         setup=write("calibration.json", "{not json")),
    Case("calibration-without-threshold", T, ["--stage", "blt", "--resume"], "no valid 'threshold' entry", trained=True,
         setup=write("calibration.json", json.dumps({"scheme": "entropy", "target_patch_size": 3}))),
    # ---- sample.py ----
    Case("temperature-negative", S, ["--temperature", "-1"], "argument --temperature: '-1': must be a finite number >= 0",
         fresh=True),
    Case("temperature-nan", S, ["--temperature", "nan"], "argument --temperature: 'nan'"),
    Case("temperature-inf", S, ["--temperature", "inf"], "argument --temperature: 'inf'"),
    Case("temperature-tiny", S, ["--temperature", "1e-9"], "must be 0 (greedy) or at least 0.001"),
    Case("top-k-zero", S, ["--top-k", "0"], "argument --top-k: '0': must be a whole number >= 1"),
    Case("top-k-negative", S, ["--top-k", "-3"], "argument --top-k: '-3'"),
    Case("top-p-negative", S, ["--top-p", "-0.5"], "argument --top-p: '-0.5': must be a finite number > 0 and <= 1"),
    Case("top-p-above-one", S, ["--top-p", "1.5"], "argument --top-p: '1.5'"),
    Case("num-samples-zero", S, ["--num-samples", "0"], "argument --num-samples: '0'"),
    Case("max-bytes-negative", S, ["--max-bytes", "-5"], "argument --max-bytes: '-5': must be a whole number >= 0"),
    Case("sample-threads-zero", S, ["--threads", "0"], "argument --threads: '0'"),
    Case("sample-seed-negative", S, ["--seed", "-1"], "argument --seed: '-1'"),
    Case("sample-misspelt-flag", S, ["--tempreature", "1"], "unrecognized arguments: --tempreature 1"),
    Case("sample-checkpoint-missing", S, ["--checkpoint", "{tmp}/nope.pt"], "no checkpoint at {tmp}/nope.pt"),
    Case("sample-checkpoint-folder", S, ["--checkpoint", "{tmp}"], "{tmp} is a folder, not a checkpoint"),
    Case("sample-checkpoint-unreadable", S, [], "cannot read {out}/blt_entropy.pt: Permission denied",
         faults={"eacces": "{out}/blt_entropy.pt"}),
    # the entropy model samples as a byte LM; what it cannot do is show patches or plot a BLT's entropies
    Case("sample-entropy-show-patches", S, ["--checkpoint", "{out}/entropy.pt", "--show-patches"],
         "--show-patches needs a BLT (or a BPE model, for its tokens); {out}/entropy.pt holds a byte-level model"),
    Case("sample-entropy-plot", S, ["--checkpoint", "{out}/entropy.pt", "--plot", "{tmp}/e.png"],
         "--plot draws a BLT's entropies; {out}/entropy.pt holds a byte-level model"),
    Case("sample-checkpoint-bad-config", S, ["--checkpoint", "{out}/bad_config.pt"],
         "its config is not usable: local_dim=32, local_heads=3", setup=bad_blt_config),
    Case("sample-checkpoint-uncalibrated", S, ["--checkpoint", "{out}/uncalibrated.pt"],
         "uses entropy patching but holds no threshold", setup=uncalibrated),
    Case("sample-checkpoint-truncated", S, [], "not a readable checkpoint", setup=truncate("blt_entropy.pt")),
    Case("prompt-file-missing", S, ["--prompt-file", "{tmp}/none.txt"],
         "cannot read --prompt-file {tmp}/none.txt: No such file or directory"),
    Case("prompt-file-folder", S, ["--prompt-file", "{tmp}"], "cannot read --prompt-file {tmp}: Is a directory"),
    Case("prompt-file-unreadable", S, ["--prompt-file", "{corpus}"], "cannot read --prompt-file {corpus}: Permission denied",
         faults={"eacces": "{corpus}"}),
    Case("prompt-and-prompt-file", S, ["--prompt", "a", "--prompt-file", "{corpus}"],
         "--prompt and --prompt-file both give the prompt"),
    Case("plot-no-folder", S, ["--plot", "{tmp}/no/such/x.png"], "--plot {tmp}/no/such/x.png: there is no folder"),
    Case("plot-with-naive", S, ["--plot", "{tmp}/x.png", "--naive"], "--plot needs the incremental sampler"),
    Case("show-patches-with-naive", S, ["--show-patches", "--naive"], "--show-patches needs the incremental sampler"),
    Case("plot-strided-checkpoint", S, ["--checkpoint", "{out}/blt_strided.pt", "--plot", "{tmp}/x.png"],
         "--plot draws the entropy model's entropies"),
    Case("plot-unwritable", S, ["--plot", "/proc/entropy.png"], "cannot write --plot /proc/entropy.png"),
    Case("plot-full-disk", S, ["--plot", "{tmp}/entropy.png"], "cannot write --plot {tmp}/entropy.png: No space left",
         faults={"enospc": "{tmp}/"}),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog, {i * 7 % 13} times.\n"
                            for i in range(300)))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus) -> Path:
    """An output folder as a user's would be: a finished entropy model, its calibration and a finished BLT,
    and a strided BLT stopped at step 3 of 6."""
    out = tmp_path_factory.mktemp("base")
    common = ["--data", corpus, *TINY, "--threads", "1", "--out", out]
    for args in (["--steps", "4", "--entropy-steps", "4"], ["--patching", "strided", "--steps", "6", "--stop-at", "3"]):
        r = clirunner.run(T, *common, *args)
        assert r.returncode == 0, r.stderr
    return out


def checkpoints(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.suffix == ".pt" or p.name == "calibration.json"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_one_line(case: Case, base: Path, corpus: Path, tmp_path: Path):
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    shutil.copytree(base, out)
    tmp.mkdir()
    if case.setup:
        case.setup(out, tmp)
    fill = lambda s: str(s).format(out=out, tmp=tmp, corpus=corpus)  # noqa: E731
    if case.script == T:
        common = ["--data", corpus, "--out", out, "--threads", "1", *(TINY if case.trained else [])]
    else:
        common = ["--checkpoint", out / "blt_entropy.pt", "--max-bytes", "4", "--threads", "1"]
    before = checkpoints(out)
    r = clirunner.run(case.script, *map(fill, common + case.args), fresh=case.fresh,
                      **{k: fill(v) for k, v in case.faults.items()})
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert fill(case.expect) in lines[0], lines[0]
    assert checkpoints(out) == before  # every earlier checkpoint has the same bytes
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]  # no temporary file left behind


def test_table_is_large_enough():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


def test_config_flag_is_honoured(corpus, tmp_path):
    """--config patching=space alone is honoured, not overridden by --patching's default."""
    r = clirunner.run(T, "--data", corpus, *TINY, "--threads", "1", "--out", tmp_path, "--steps", "2",
                      "--config", "patching=space")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "blt_space.pt").exists() and not (tmp_path / "entropy.pt").exists()

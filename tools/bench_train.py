"""Training speed of each train.py preset: bytes/s, achieved FLOP/s against a matmul peak measured here, and
peak memory.

    python tools/bench_train.py                  # the cpu preset (and the gpu preset when CUDA is available)
    python tools/bench_train.py --preset cpu --steps 8
    python tools/bench_train.py --race --steps 8  # the models of tools/race.py taking turns, then BLT by part

For every preset it times a few training steps (after warm-up) of the three models train.py trains: the
entropy model, BLT with entropy patching (patched on the fly by the entropy model, as in training) and the
plain byte-level transformer, in bf16 autocast and in fp32. Achieved FLOP/s counts the model FLOPs of paper
section 4.5 (blt.flops_per_byte; for BLT plus the entropy model's forward pass), so it is comparable across
models; the peak is the best square-matmul rate measured on the same device and dtype. Each measurement runs
in a fresh process so that its peak memory (resident set on CPU, allocator peak on GPU) is its own.

The last lines give the ratios to quote: BLT's bf16 speed over its fp32 speed, and "achieved FLOP/s, blt /
byte transformer", how much of its FLOP saving per byte BLT turns into wall-clock saving. A shared machine's
load comes and goes, which skews the ratio of two runs made one after the other, so they are measured again
in one more process where BLT and the byte transformer, in bf16 and in fp32, take turns step by step; the
ratios of the separate rows follow, for comparison. `--parts` adds BLT's forward pass timed part by part
(patching, embeddings, encoder, pooling, global, decoder cross-attention, decoder) with each part's FLOPs.

One more row times BLT in bf16 with torch.compile switched from the preset's choice (compiled on CPU, eager
on GPU), and a last line gives compiled against eager step time, the first step (mostly compilation) and
how many graphs were compiled for the patch counts seen: one, since the patch dimension is dynamic
(train.Task.patch). `--no-compile` skips it.

`--race` times the models tools/race.py trains, as their plain commands configure them on a small corpus
(the small preset for BLT and the BPE and byte transformers; BLT with the cpu preset), in one process taking
turns step by step in the machine's default dtype, with each step split into forward, backward, and clipping +
AdamW, and the achieved FLOP/s of BLT over the BPE transformer's and the byte transformer's. Then BLT's forward
part by part, and what BLT's own parts (its cross-attentions, its hash n-gram embeddings) cost in whole steps,
backward included: the step taken in turns with and without the part (skip_costs).

The byte models read random bytes, except where the patching depends on the text (space patching): they and
the BPE model read real text (bench_text): tiny Shakespeare's training split where a race or a run has prepared
it, else this repository's own files. Nothing is downloaded. BLT's FLOPs per byte are taken at the average
patch size of all the batches it patched.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere: the paper modules live at the top of the repository

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train.py: robust on a shared small machine

import numpy as np  # noqa: E402
import torch  # noqa: E402

from blt import BLTConfig, byte_transformer_flops_per_byte, flops_per_byte  # noqa: E402
from encoder import LocalEncoder  # noqa: E402
from entropy_model import ByteLMConfig  # noqa: E402
from layers import CrossAttention  # noqa: E402
from runtime import compiled_graphs  # noqa: E402


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Best FLOP/s of square matmuls (n = 512 ... 4096) on this device and dtype."""
    best = 0.0
    for n in (512, 1024, 2048) + ((4096, 8192) if device.type == "cuda" else ()):
        if best and 2 * n ** 3 / best > seconds / 4:  # one product would take too long (emulated bf16 on a CPU)
            break
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up
        reps, t0 = 0, time.perf_counter()
        while True:
            a @ b
            reps += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            if time.perf_counter() - t0 > seconds / 4:
                break
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0))
    return best


def bench_text_source() -> str:
    """Which text bench_text reads: the race's corpus where this machine has it prepared (a run of
    tools/race.py or train.py --data tinyshakespeare made it), else this repository's own files."""
    from data import DATA_DIR
    prepared = DATA_DIR / "tinyshakespeare" / "train.bin"
    return str(prepared) if prepared.is_file() and prepared.stat().st_size >= 1 << 16 else "this repository's files"


def bench_text() -> np.ndarray:
    """Real text where the speed depends on the text (a BPE model's bytes per token, space patching's patch
    sizes), 1 MB: tiny Shakespeare's training split (1.0 MB) where it is prepared, so that the benchmark times
    the race's own text; else this repository's own Markdown and Python files (they change from commit to
    commit, and with them the patch sizes). Repeated to 1 MB. Nothing is downloaded."""
    source = bench_text_source()
    if source != "this repository's files":
        text = Path(source).read_bytes()
    else:
        text = b"\n".join(p.read_bytes() for p in sorted(ROOT.glob("*.md")) + sorted(ROOT.glob("*.py")))
    return np.frombuffer((text * (1 + (1 << 20) // len(text)))[:1 << 20], dtype=np.uint8)


class Trainer:
    """One model of one preset set up for timing: step(i) runs training step i on random bytes (batch, forward,
    backward, clipping, AdamW) and returns its seconds. compiled: torch.compile the model with `backend`
    (default: as the preset does, on CUDA only); device: default cuda for the gpu preset, else cpu."""

    def __init__(self, preset_name: str, model_kind: str, dtype: str, compiled: bool | None = None,
                 device: str | None = None, backend: str = "inductor"):
        import train
        from blt import BLT
        from data import get_batch
        from patching import calibrate_threshold

        self.device = device = torch.device(device or ("cuda" if preset_name == "gpu" else "cpu"))
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        preset = train.PRESETS[preset_name]
        self.tc = tc = train.TrainConfig(**{**preset["entropy_train" if model_kind == "entropy" else "train"],
                                            "dtype": dtype})
        torch.manual_seed(0)
        blt_cfg = BLTConfig.from_dict(preset["blt"].to_dict())
        self.corpus = np.random.default_rng(0).integers(0, 256, size=1 << 22, dtype=np.uint8)
        if model_kind == "blt" and blt_cfg.patching == "space":  # random bytes hold almost no spaces
            self.corpus = bench_text()
        self.tokens = None
        if model_kind == "entropy":
            config = ByteLMConfig.of_blt(blt_cfg)
            model, kind = config.build(), "entropy"
        elif model_kind == "byte":
            config, kind = preset["byte"], "byte"
            model = config.build()
        elif model_kind == "bpe":  # tokens of real text: bytes per token, hence bytes/s, depend on the text
            from tokens import TokenLMConfig, prepare_tokens
            self.tokens = prepare_tokens(bench_text(), preset["bpe"].vocab_size, tc.seq_len)
            config, kind = TokenLMConfig.from_dict({**preset["bpe"].to_dict(),
                                                    "vocab_size": self.tokens.tokenizer.vocab_size}), "bpe"
            model = config.build()
        else:
            config, kind = blt_cfg, "blt"
            model = BLT(config)
        self.kind, self.config, self.get_batch = kind, config, get_batch
        model.to(device)
        if kind == "blt" and model.entropy_model is not None:  # untrained, calibrated to the preset's patch size
            x, _ = get_batch(self.corpus, tc.batch_size, tc.seq_len, 0, 10 ** 6)
            config.entropy_threshold = calibrate_threshold(model.entropy_model.entropies(x.to(device)).cpu(),
                                                           config.patch_size)
        self.compiled = preset["compile"] and device.type == "cuda" if compiled is None else compiled
        self.task = task = train.Task(kind, model, config, tc, device, compile_model=self.compiled, tokens=self.tokens)
        task.prepare(backend)
        self.optimizer = train.make_optimizer(model, tc, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")  # as train.train_loop
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.patch_counts, self.patched = set(), [0, 0]  # patch counts seen; bytes and patches over all batches
        self.split = {}  # seconds spent in forward, backward, and clipping + the optimizer, summed over steps
        patch = task.patch

        def recorded_patch(x):  # the patch counts the model sees (padded when compiled), and the patch sizes
            lengths = patch(x)
            self.patch_counts.add(lengths.shape[1])
            self.patched[0] += float(lengths.sum())
            self.patched[1] += float((lengths > 0).sum())
            return lengths
        task.patch = recorded_patch

    @property
    def patch_size(self) -> float | None:
        """Average bytes per patch over every batch patched so far (the global transformer's FLOPs per byte go
        as 1 / patch size, so the average over the timed steps is what they computed; one batch can be off by
        several percent)."""
        return self.patched[0] / self.patched[1] if self.patched[1] else None

    def step(self, i: int) -> float:
        tc = self.tc
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        marks = [time.perf_counter()]
        x, y = self.task.batch(self.corpus, i)
        loss = self.task.loss(x, y)  # patching and forward
        sync()
        marks.append(time.perf_counter())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        sync()
        marks.append(time.perf_counter())
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, tc.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        loss.item()  # waits for the device
        marks.append(time.perf_counter())
        for part, t0, t1 in zip(("forward", "backward", "clip + AdamW"), marks, marks[1:]):
            self.split[part] = self.split.get(part, 0.0) + t1 - t0
        return marks[-1] - marks[0]

    @property
    def bytes_per_step(self) -> float:
        return self.tc.batch_size * (self.tokens.bytes_per_window if self.tokens else self.tc.seq_len)

    def flops_per_byte(self) -> float:
        """Training FLOPs per byte (paper section 4.5); BLT's include the entropy model's patching forward."""
        config, seq_len = self.config, self.tc.seq_len
        if self.kind == "blt":
            f = flops_per_byte(config, self.patch_size, seq_len)
            return f["train_total"] + f["entropy_model_forward"]
        if self.kind == "bpe":
            from tokens import token_flops_per_byte
            return token_flops_per_byte(config, self.tokens.train_bytes_per_token, self.tokens.seq_len)["train_total"]
        return byte_transformer_flops_per_byte(config.dim, config.layers, min(config.window or seq_len, seq_len),
                                               config.multiple_of)["train_total"]


def measure(preset_name: str, model_kind: str, dtype: str, steps: int, compiled: bool | None = None,
            device: str | None = None, backend: str = "inductor", max_seconds: float | None = None) -> dict:
    """Time `steps` training steps of one model of one preset (in this process), after two warm-up steps
    (allocations, compilation), or fewer if they take over max_seconds. compiled, device, backend: as Trainer."""
    graphs_before = compiled_graphs()
    trainer = Trainer(preset_name, model_kind, dtype, compiled, device, backend)
    times = []
    for i in range(steps + 2):
        if i >= 3 and max_seconds is not None and sum(times) > max_seconds:
            break
        seconds = trainer.step(i)
        if i == 0:
            first_step, graphs_first_step = seconds, compiled_graphs() - graphs_before
        if i >= 2:
            times.append(seconds)
    step_time = float(np.median(times))
    bytes_per_s = trainer.bytes_per_step / step_time
    flops = trainer.flops_per_byte()
    if trainer.device.type == "cuda":
        peak_memory = torch.cuda.max_memory_allocated()
    else:
        import resource
        peak_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"preset": preset_name, "model": model_kind, "dtype": dtype, "bytes_per_s": bytes_per_s,
            "flops_per_s": flops * bytes_per_s, "mflop_per_byte": flops / 1e6,
            "step_s": step_time, "peak_memory": peak_memory, "threads": torch.get_num_threads(),
            "batch": f"{trainer.tc.batch_size}x{trainer.tc.seq_len}",
            "patch_size": trainer.patch_size,
            "compiled": trainer.compiled, "first_step_s": first_step, "timed_steps": len(times),
            "graphs": compiled_graphs() - graphs_before, "graphs_first_step": graphs_first_step,
            "patch_counts": sorted(trainer.patch_counts)}


def alternate(preset_name: str, specs: list[str], steps: int, compiled: bool | None = None) -> dict:
    """Several models in one process, step for step in turn (for "blt:bf16", "byte:bf16": BLT, byte, BLT,
    byte, ...), so that all see the same load on a shared machine. specs: "MODEL:DTYPE" each. Returns per
    spec the median step time and the achieved FLOP/s."""
    trainers = {spec: Trainer(preset_name, *spec.split(":"), compiled) for spec in specs}
    times = {spec: [] for spec in specs}
    for i in range(steps + 2):
        for spec, trainer in trainers.items():
            seconds = trainer.step(i)
            if i >= 2:  # two warm-up steps each
                times[spec].append(seconds)
    step_s = {spec: float(np.median(t)) for spec, t in times.items()}
    return {spec: {"step_s": step_s[spec], "flops_per_s": t.flops_per_byte() * t.bytes_per_step / step_s[spec]}
            for spec, t in trainers.items()}


RACE = [("small", "blt"), ("cpu", "blt"), ("small", "bpe"), ("small", "byte")]  # tools/race.py's plain commands


def race_turns(steps: int, dtype: str, compiled: bool | None = None) -> dict:
    """The models of tools/race.py, as its plain commands configure them on CPU and a small corpus (the small
    preset; BLT also with the cpu preset), in one process taking turns step by step in `dtype`.
    Returns per model the median step time, bytes/s, training FLOPs per byte (BLT: with its entropy model's
    patching forward), achieved FLOP/s, and where its steps went (forward, backward, clipping + AdamW)."""
    trainers = {f"{preset}:{model}": Trainer(preset, model, dtype, compiled) for preset, model in RACE}
    times = {name: [] for name in trainers}
    for i in range(steps + 2):
        if i == 2:
            for t in trainers.values():
                t.split.clear()
        for name, trainer in trainers.items():
            seconds = trainer.step(i)
            if i >= 2:  # two warm-up steps each
                times[name].append(seconds)
    out = {}
    for name, t in trainers.items():
        step_s = float(np.median(times[name]))
        out[name] = {"step_s": step_s, "bytes_per_s": t.bytes_per_step / step_s, "mflop_per_byte": t.flops_per_byte() / 1e6,
                     "flops_per_s": t.flops_per_byte() * t.bytes_per_step / step_s, "batch": t.bytes_per_step,
                     "split": {part: seconds / steps for part, seconds in t.split.items()}}
    return out


def print_race(r: dict, dtype: str, steps: int):
    print(f"\nthe race's models on cpu, {dtype}, taking turns step by step ({steps} timed steps each; text where "
          f"it matters: {bench_text_source()}):")
    print(f"{'model':10s} {'bytes/step':>10s} {'s/step':>7s} {'bytes/s':>9s} {'MFLOP/byte':>10s} {'GFLOP/s':>8s} "
          f"{'forward':>8s} {'backward':>8s} {'clip+AdamW':>10s}")
    for name, x in r.items():
        split = x["split"]
        print(f"{name:10s} {x['batch']:>10,.0f} {x['step_s']:>7.3f} {x['bytes_per_s']:>9,.0f} {x['mflop_per_byte']:>10.2f} "
              f"{x['flops_per_s'] / 1e9:>8.1f} " + " ".join(f"{split.get(k, 0) / sum(split.values()):>{w}.0%}" for k, w in
                                                           (("forward", 8), ("backward", 8), ("clip + AdamW", 10))))
    for blt in ("small:blt", "cpu:blt"):
        print(f"achieved FLOP/s, {blt.split(':')[0]}-preset BLT / BPE transformer: "
              f"{r[blt]['flops_per_s'] / r['small:bpe']['flops_per_s']:.2f}; / byte transformer: "
              f"{r[blt]['flops_per_s'] / r['small:byte']['flops_per_s']:.2f}")


def breakdown(preset_name: str, dtype: str, steps: int) -> dict:
    """Where BLT's forward pass spends its time: each part's milliseconds per training step (forward only,
    under the training autocast, measured around the modules' calls during full training steps) with its
    forward FLOPs per byte (blt.flops_per_byte), hence each part's achieved FLOP/s."""
    trainer = Trainer(preset_name, "blt", dtype, compiled=False)
    model, spent = trainer.task.model, {}
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)  # time the work, not launches

    def timed(obj, method: str, part: str):
        call = getattr(obj, method)

        def wrapper(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            out = call(*args, **kwargs)
            sync()
            spent[part] = spent.get(part, 0.0) + time.perf_counter() - t0
            return out
        setattr(obj, method, wrapper)
    enc, dec = model.encoder, model.decoder
    timed(model, "patch", "patching (entropy model, fp32)")
    timed(enc, "embed", "byte + hash n-gram embeddings")
    timed(enc, "byte_layers", "encoder layers")
    timed(enc, "pool", "encoder cross-attention (pooling)")
    timed(model.global_transformer, "forward", "global transformer")
    for module in dec.cross_attn:
        timed(module, "forward", "decoder cross-attention")
    for module in dec.layers:
        timed(module, "forward", "decoder layers")
    timed(dec.output, "forward", "decoder layers")  # the head's FLOPs are the decoder's (de-embedding)
    timed(model, "forward", "model forward in all (patching apart)")
    step_s = []
    for i in range(steps + 2):
        if i == 2:
            spent.clear()
        seconds = trainer.step(i)
        if i >= 2:
            step_s.append(seconds)
    f = flops_per_byte(trainer.config, trainer.patch_size, trainer.tc.seq_len)
    fwd = f["forward"]
    flops = {"patching (entropy model, fp32)": f["entropy_model_forward"], "byte + hash n-gram embeddings": 0.0,
             "encoder layers": fwd["encoder"], "encoder cross-attention (pooling)": fwd["encoder_cross_attention"],
             "global transformer": fwd["global"], "decoder cross-attention": fwd["decoder_cross_attention"],
             "decoder layers": fwd["decoder"], "model forward in all (patching apart)": f["forward_total"]}
    n_bytes = trainer.bytes_per_step
    return {"dtype": dtype, "step_s": float(np.mean(step_s)),
            "parts": [(part, seconds / steps, flops.get(part, 0.0)) for part, seconds in spent.items()],
            "bytes_per_step": n_bytes, "projections": fwd["projections"]}


def print_breakdown(r: dict):
    n = r["bytes_per_step"]
    print(f"\nBLT forward pass by part, {r['dtype']} ({r['step_s']:.3f} s per training step in all; the forward "
          f"parts are timed around their calls, inside training steps):")
    print(f"{'part':36s} {'ms/step':>8s} {'MFLOP/byte':>10s} {'GFLOP/s':>8s}")
    for part, seconds, flops in sorted(r["parts"], key=lambda x: x[0] != "model forward in all (patching apart)"):
        rate = f"{flops * n / seconds / 1e9:8.1f}" if flops else f"{'-':>8s}"
        print(f"{part:36s} {seconds * 1e3:8.1f} {flops / 1e6:10.2f} {rate}")
    print(f"(the patch projections, {r['projections'] / 1e6:.2f} MFLOP/byte, count in the total only; their time "
          f"is in the encoder's pooling, the global transformer and the decoder's own code)")


SKIPS = {  # BLT's own parts, each replaced by the cheapest stand-in of its output's shape: (class, method, stand-in).
    #         The cross-attention's keeps its keys and values in the graph (x 0): without them the decoder would
    #         not read the global transformer, and its backward would be skipped too.
    "cross-attentions (3: the encoder's pooling, 2 in the decoder)":
        (CrossAttention, "forward",
         lambda self, queries, keys_values, *args, **kwargs: queries + 0.0 * keys_values.sum()),
    "hash n-gram embeddings": (LocalEncoder, "embed", lambda self, tokens: self.tok_embeddings(tokens)),
}


def skip_costs(preset_name: str, dtype: str, steps: int) -> dict:
    """What BLT's own parts cost in whole training steps, forward, backward and AdamW together (the forward
    breakdown times only the forward): one BLT steps in turns as it is and with one part stood in for (SKIPS),
    and a part's share of the step is 1 - the median of the paired step-time ratios. The model with a part
    stood in is not trained for anything; it only measures the part's time."""
    trainer = Trainer(preset_name, "blt", dtype, compiled=False)
    ratios, full = {part: [] for part in SKIPS}, []
    for i in range(steps + 2):
        for part, (owner, method, stand_in) in SKIPS.items():
            seconds = trainer.step(i)
            original = getattr(owner, method)
            setattr(owner, method, stand_in)
            try:
                skipped = trainer.step(i)
            finally:
                setattr(owner, method, original)
            if i >= 2:
                ratios[part].append(skipped / seconds)
                full.append(seconds)
    step_s = float(np.median(full))
    return {"dtype": dtype, "step_s": step_s,
            "parts": {part: 1 - float(np.median(r)) for part, r in ratios.items()}}


def print_skip_costs(r: dict):
    print(f"\nBLT's own parts in whole training steps (forward, backward, AdamW), {r['dtype']}: each stood in for, "
          f"taking turns with the full step ({r['step_s']:.3f} s):")
    for part, share in r["parts"].items():
        print(f"  {part:60s} {share:6.1%} of the step, {share * r['step_s'] * 1e3:5.0f} ms")


def run_child(preset: str, model: str, dtype: str, steps: int, compiled: bool) -> dict:
    """measure() in a fresh process (its own peak memory, its own compilation), or, for model "turns",
    alternate() over the specs in dtype ("blt:bf16,byte:bf16"); raises with its last error line."""
    mode = {"turns": ["--turns", preset, dtype], "breakdown": ["--breakdown", preset, dtype],
            "skips": ["--skips", preset, dtype]}.get(
        model, ["--one", preset, model, dtype])
    cmd = [sys.executable, os.path.abspath(__file__), *mode, "--steps", str(steps),
           "--compile" if compiled else "--no-compile"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError((result.stderr.strip().splitlines() or ["?"])[-1])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=("cpu", "gpu"), action="append", help="default: cpu, plus gpu with CUDA")
    p.add_argument("--steps", type=int, default=None, help="timed steps per model (default: 5 on CPU, 20 on GPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time BLT (bf16) with torch.compile switched from the preset's choice: compiled "
                        "against eager (default on; compiling takes minutes on a small CPU)")
    p.add_argument("--one", nargs=3, metavar=("PRESET", "MODEL", "DTYPE"), help=argparse.SUPPRESS)  # a child run
    p.add_argument("--turns", nargs=2, metavar=("PRESET", "SPECS"), help=argparse.SUPPRESS)  # a child run
    p.add_argument("--breakdown", nargs=2, metavar=("PRESET", "DTYPE"), help=argparse.SUPPRESS)  # a child run
    p.add_argument("--skips", nargs=2, metavar=("PRESET", "DTYPE"), help=argparse.SUPPRESS)  # a child run
    p.add_argument("--race", action="store_true", help="only the models of tools/race.py taking turns (cpu), in the "
                   "default dtype of this machine, then BLT's forward part by part")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="with --race (default: bf16 where native)")
    p.add_argument("--race-child", action="store_true", help=argparse.SUPPRESS)  # a child run
    p.add_argument("--parts", action="store_true",
                   help="also time BLT's forward pass part by part (bf16 and fp32): where its time goes")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be at least 1")
    if args.one:
        print(json.dumps(measure(*args.one, steps=args.steps or 5, compiled=args.compile)))  # None: the preset's
        return
    if args.breakdown:
        print(json.dumps(breakdown(*args.breakdown, steps=args.steps or 5)))
        return
    if args.skips:
        print(json.dumps(skip_costs(*args.skips, steps=args.steps or 5)))
        return
    if args.race or args.race_child:
        from runtime import default_dtype
        dtype = args.dtype or default_dtype(torch.device("cpu"))
        steps = args.steps or 5
        if args.race_child:
            print(json.dumps(race_turns(steps, dtype, compiled=args.compile)))
            return
        cmd = [sys.executable, os.path.abspath(__file__), "--race-child", "--steps", str(steps), "--dtype", dtype]
        result = subprocess.run(cmd + (["--compile"] if args.compile else []), capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"error: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
        print_race(json.loads(result.stdout.strip().splitlines()[-1]), dtype, steps)
        print_breakdown(run_child("small", "breakdown", dtype, steps, False))
        print_skip_costs(run_child("small", "skips", dtype, steps, False))
        return
    if args.turns:
        preset, specs = args.turns
        print(json.dumps(alternate(preset, specs.split(","), steps=args.steps or 5, compiled=args.compile)))
        return
    presets = args.preset or (["cpu", "gpu"] if torch.cuda.is_available() else ["cpu"])
    for preset in presets:
        device = torch.device("cuda" if preset == "gpu" else "cpu")
        if device.type == "cuda" and not torch.cuda.is_available():
            sys.exit("error: the gpu preset needs CUDA")
        peaks = {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}
        print(f"\npreset {preset} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} "
              f"({torch.get_num_threads()} threads): matmul peak fp32 {peaks['fp32'] / 1e9:,.0f} GFLOP/s, "
              f"bf16 {peaks['bf16'] / 1e9:,.0f} GFLOP/s")
        print(f"{'model':8s} {'dtype':5s} {'compile':7s} {'batch':>9s} {'patch':>5s} {'bytes/s':>10s} {'MFLOP/byte':>10s} "
              f"{'GFLOP/s':>9s} {'of peak':>7s} {'peak mem':>9s}")
        preset_compiles = device.type == "cuda"  # as train.py: the gpu preset compiles, the cpu preset does not
        rows = [(model, dtype, preset_compiles) for model in ("entropy", "blt", "byte") for dtype in ("bf16", "fp32")]
        rows += [("blt", "bf16", not preset_compiles)] if args.compile is not False else []
        results, steps = {}, args.steps or (20 if device.type == "cuda" else 5)
        for model, dtype, compiled in rows:
            try:
                r = results[model, dtype, compiled] = run_child(preset, model, dtype, steps, compiled)
            except RuntimeError as e:
                print(f"{model:8s} {dtype:5s} {'yes' if compiled else 'no':7s} failed: {e}")
                continue
            patch = f"{r['patch_size']:.2f}" if r["patch_size"] else "-"
            print(f"{model:8s} {dtype:5s} {'yes' if compiled else 'no':7s} {r['batch']:>9s} {patch:>5s} "
                  f"{r['bytes_per_s']:>10,.0f} {r['mflop_per_byte']:>10.2f} {r['flops_per_s'] / 1e9:>9.1f} "
                  f"{r['flops_per_s'] / peaks[dtype]:>7.1%} {r['peak_memory'] / 2 ** 20:>7,.0f} MB", flush=True)
        # The rows above ran one after the other, each alone; a load that comes and goes skews the ratio of
        # two of them. So the ratios that matter are measured once more in one process where BLT and the byte
        # transformer, in bf16 and in fp32, take turns step by step (the rows' own ratios follow, to compare).
        try:
            turns = run_child(preset, "turns", "blt:bf16,blt:fp32,byte:bf16,byte:fp32", steps, preset_compiles)
        except RuntimeError as e:
            print(f"taking turns failed: {e}")
            turns = None

        def ratio(name: str, numerator: tuple, denominator: tuple, key: str):
            """numerator, denominator: (model, dtype); key: flops_per_s, or step_s for a speed ratio."""
            def of(results_a, results_b):
                a, b = results_a[key], results_b[key]
                return a / b if key == "flops_per_s" else b / a
            rows = [results.get((*numerator, preset_compiles)), results.get((*denominator, preset_compiles))]
            parts = []
            if turns:
                parts.append(f"{of(turns[':'.join(numerator)], turns[':'.join(denominator)]):.2f} "
                             f"taking turns ({steps} steps each)")
            if all(rows):
                parts.append(f"{of(*rows):.2f} from the rows above")
            if parts:
                print(f"{name}: {', '.join(parts)}")
        for model in ("entropy", "blt", "byte"):
            bf16, fp32 = results.get((model, "bf16", preset_compiles)), results.get((model, "fp32", preset_compiles))
            if bf16 and fp32 and model != "blt":
                print(f"bf16 / fp32 training speed, {model}: {bf16['bytes_per_s'] / fp32['bytes_per_s']:.2f}x")
        ratio("bf16 / fp32 training speed, blt", ("blt", "bf16"), ("blt", "fp32"), "step_s")
        for dtype in ("bf16", "fp32"):  # the FLOP saving reaches the clock only as far as this ratio allows
            ratio(f"achieved FLOP/s, blt / byte transformer, {dtype}", ("blt", dtype), ("byte", dtype), "flops_per_s")
        for dtype in ("bf16", "fp32") if args.parts else ():
            try:
                print_breakdown(run_child(preset, "breakdown", dtype, steps, False))
            except RuntimeError as e:
                print(f"BLT forward by part, {dtype}: failed: {e}")
        compiled, eager = results.get(("blt", "bf16", True)), results.get(("blt", "bf16", False))
        if compiled and eager:
            print(f"torch.compile, blt bf16: {compiled['step_s']:.3f} s/step compiled, {eager['step_s']:.3f} eager: "
                  f"{eager['step_s'] / compiled['step_s']:.2f}x; first step (compiling) {compiled['first_step_s']:.0f} s; "
                  f"{compiled['graphs']} graph(s) for patch counts {compiled['patch_counts']}, "
                  f"{compiled['graphs'] - compiled['graphs_first_step']} recompiles")


if __name__ == "__main__":
    main()

"""Training speed of each train.py preset: bytes/s, achieved FLOP/s against a matmul peak measured here, and
peak memory.

    python tools/bench_train.py                  # the cpu preset (and the gpu preset when CUDA is available)
    python tools/bench_train.py --preset cpu --steps 8

For every preset it times a few training steps (after warm-up) of the three models train.py trains: the
entropy model, BLT with entropy patching (patched on the fly by the entropy model, as in training) and the
plain byte-level transformer, in bf16 autocast and in fp32. Achieved FLOP/s counts the model FLOPs of paper
section 4.5 (blt.flops_per_byte; for BLT plus the entropy model's forward pass), so it is comparable across
models; the peak is the best square-matmul rate measured on the same device and dtype. Each measurement runs
in a fresh process so that its peak memory (resident set on CPU, allocator peak on GPU) is its own.

One more row times BLT in bf16 with torch.compile switched from the preset's choice (compiled on CPU, eager
on GPU), and a last line gives compiled against eager step time, the first step (mostly compilation) and
how many graphs were compiled for the patch counts seen: one, since the patch dimension is dynamic
(train.Task.patch). `--no-compile` skips it.

The bytes are random (throughput does not depend on the text), so nothing is downloaded.
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
from entropy_model import ByteLMConfig  # noqa: E402
from runtime import compiled_graphs  # noqa: E402


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Best FLOP/s of square matmuls (n = 512 ... 4096) on this device and dtype."""
    best = 0.0
    for n in (512, 1024, 2048) + ((4096, 8192) if device.type == "cuda" else ()):
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


def measure(preset_name: str, model_kind: str, dtype: str, steps: int, compiled: bool | None = None,
            device: str | None = None, backend: str = "inductor", max_seconds: float | None = None) -> dict:
    """Time `steps` training steps of one model of one preset (in this process), or fewer if they take over
    max_seconds. compiled: torch.compile the model with `backend` (default: as the preset does, on CUDA only);
    device: default cuda for the gpu preset, else cpu."""
    import train
    from blt import BLT
    from data import get_batch
    from patching import calibrate_threshold

    device = torch.device(device or ("cuda" if preset_name == "gpu" else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    preset = train.PRESETS[preset_name]
    tc = train.TrainConfig(**{**preset["entropy_train" if model_kind == "entropy" else "train"], "dtype": dtype})
    torch.manual_seed(0)
    blt_cfg = BLTConfig.from_dict(preset["blt"].to_dict())
    if model_kind == "entropy":
        config = ByteLMConfig.of_blt(blt_cfg)
        model, kind = config.build(), "entropy"
    elif model_kind == "byte":
        config, kind = preset["byte"], "byte"
        model = config.build()
    else:
        config, kind = blt_cfg, "blt"
        model = BLT(config)
    corpus = np.random.default_rng(0).integers(0, 256, size=1 << 22, dtype=np.uint8)
    model.to(device)
    if kind == "blt":  # an untrained entropy model, its threshold calibrated to the preset's patch size
        x, _ = get_batch(corpus, tc.batch_size, tc.seq_len, 0, 10 ** 6)
        config.entropy_threshold = calibrate_threshold(model.entropy_model.entropies(x.to(device)).cpu(), config.patch_size)
    compiled = preset["compile"] and device.type == "cuda" if compiled is None else compiled
    task = train.Task(kind, model, config, tc, device, compile_model=compiled)
    task.prepare(backend)
    optimizer = train.make_optimizer(model, tc, device)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    times, patch_sizes, patch_counts = [], [], set()
    patch = task.patch

    def recorded_patch(x):  # the patch counts the model sees (padded when compiled), and the first batch's patch size
        lengths = patch(x)
        patch_counts.add(lengths.shape[1])
        if not patch_sizes:
            patch_sizes.append(float(lengths.sum()) / float((lengths > 0).sum()))
        return lengths
    task.patch = recorded_patch
    graphs_before = compiled_graphs()
    for i in range(steps + 2):  # the first two steps warm up (allocations, compilation)
        if i >= 3 and max_seconds is not None and sum(times) > max_seconds:
            break
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        x, y = get_batch(corpus, tc.batch_size, tc.seq_len, 0, i)
        loss = task.loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        optimizer.step()
        loss.item()
        if i == 0:
            first_step, graphs_first_step = time.perf_counter() - t0, compiled_graphs() - graphs_before
        if i >= 2:
            times.append(time.perf_counter() - t0)
    step_time = float(np.median(times))
    bytes_per_s = tc.batch_size * tc.seq_len / step_time
    if kind == "blt":
        f = flops_per_byte(config, patch_sizes[0], tc.seq_len)
        flops = f["train_total"] + f["entropy_model_forward"]
    else:
        flops = byte_transformer_flops_per_byte(config.dim, config.layers, min(config.window or tc.seq_len, tc.seq_len),
                                                config.multiple_of)["train_total"]
    if device.type == "cuda":
        peak_memory = torch.cuda.max_memory_allocated()
    else:
        import resource
        peak_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"preset": preset_name, "model": model_kind, "dtype": dtype, "bytes_per_s": bytes_per_s,
            "flops_per_s": flops * bytes_per_s, "mflop_per_byte": flops / 1e6,
            "step_s": step_time, "peak_memory": peak_memory, "threads": torch.get_num_threads(),
            "batch": f"{tc.batch_size}x{tc.seq_len}", "patch_size": patch_sizes[0] if patch_sizes else None,
            "compiled": compiled, "first_step_s": first_step, "timed_steps": len(times),
            "graphs": compiled_graphs() - graphs_before, "graphs_first_step": graphs_first_step,
            "patch_counts": sorted(patch_counts)}


def run_child(preset: str, model: str, dtype: str, steps: int, compiled: bool) -> dict:
    """measure() in a fresh process (its own peak memory, its own compilation); raises with its last error line."""
    cmd = [sys.executable, os.path.abspath(__file__), "--one", preset, model, dtype, "--steps", str(steps),
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
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(*args.one, steps=args.steps or 5, compiled=args.compile)))  # None: the preset's
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
        results = {}
        for model, dtype, compiled in rows:
            steps = args.steps or (20 if device.type == "cuda" else 5)
            try:
                r = results[model, dtype, compiled] = run_child(preset, model, dtype, steps, compiled)
            except RuntimeError as e:
                print(f"{model:8s} {dtype:5s} {'yes' if compiled else 'no':7s} failed: {e}")
                continue
            patch = f"{r['patch_size']:.2f}" if r["patch_size"] else "-"
            print(f"{model:8s} {dtype:5s} {'yes' if compiled else 'no':7s} {r['batch']:>9s} {patch:>5s} "
                  f"{r['bytes_per_s']:>10,.0f} {r['mflop_per_byte']:>10.2f} {r['flops_per_s'] / 1e9:>9.1f} "
                  f"{r['flops_per_s'] / peaks[dtype]:>7.1%} {r['peak_memory'] / 2 ** 20:>7,.0f} MB", flush=True)
        for model in ("entropy", "blt", "byte"):
            bf16, fp32 = results.get((model, "bf16", preset_compiles)), results.get((model, "fp32", preset_compiles))
            if bf16 and fp32:
                print(f"bf16 / fp32 training speed, {model}: {bf16['bytes_per_s'] / fp32['bytes_per_s']:.2f}x")
        for dtype in ("bf16", "fp32"):  # the FLOP saving reaches the clock only as far as this ratio allows
            blt, byte = results.get(("blt", dtype, preset_compiles)), results.get(("byte", dtype, preset_compiles))
            if blt and byte:
                print(f"achieved FLOP/s, blt / byte transformer, {dtype}: {blt['flops_per_s'] / byte['flops_per_s']:.2f}")
        compiled, eager = results.get(("blt", "bf16", True)), results.get(("blt", "bf16", False))
        if compiled and eager:
            print(f"torch.compile, blt bf16: {compiled['step_s']:.3f} s/step compiled, {eager['step_s']:.3f} eager: "
                  f"{eager['step_s'] / compiled['step_s']:.2f}x; first step (compiling) {compiled['first_step_s']:.0f} s; "
                  f"{compiled['graphs']} graph(s) for patch counts {compiled['patch_counts']}, "
                  f"{compiled['graphs'] - compiled['graphs_first_step']} recompiles")


if __name__ == "__main__":
    main()

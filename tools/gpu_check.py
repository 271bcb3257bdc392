"""The GPU check: what the README should say about the gpu preset, measured in one go (under 8 minutes on
one GPU), printed as a markdown table.

    python tools/gpu_check.py                       # on a machine with CUDA
    python tools/gpu_check.py --device cpu --preset smoke --backend aot_eager --steps 3   # a dry run on CPU

1. the CUDA tests (`python -m pytest -m cuda`: tests/test_cuda.py);
2. training steps of the preset's BLT (entropy patching, torch.compile; bf16 autocast, or fp16 with a gradient
   scaler on a GPU without native bf16, as train.py picks) on random bytes, so nothing is downloaded
   (tools/bench_train.measure): bytes/s, achieved FLOP/s (paper section 4.5 FLOPs, plus the entropy model's
   forward pass), MFU against the GPU's bf16 peak, peak memory, and how many graphs torch.compile compiled (a
   recompile for a new patch count adds one);
3. the sampler (sample.generate, incremental, one row) on the GPU, on an untrained BLT of the preset: bytes/s,
   and whether one seed samples the same bytes on the GPU as on the CPU.

Without CUDA it says so in one line and exits 1, unless --device cpu asks for the dry run (the CUDA tests
are skipped there).
"""
import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train.py

import torch  # noqa: E402

# Dense bf16 tensor-core peaks from the vendor's data sheets (FLOP/s), by a name torch reports; the first match
# counts, so the PCIe H100 comes before the SXM one. Unknown GPUs are compared with the measured matmul peak only.
BF16_PEAKS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
              ("L4", 121e12)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a dry run of the same steps")
    p.add_argument("--preset", default="gpu", help="a train.py preset (default gpu; smoke for a dry run)")
    p.add_argument("--steps", type=int, default=300, help="timed training steps (default 300)")
    p.add_argument("--max-seconds", type=float, default=120.0,
                   help="stop timing training steps after this many seconds (default 120)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: fast to compile)")
    p.add_argument("--sample-bytes", type=int, default=256, help="bytes the sampler generates (default 256)")
    p.add_argument("--skip-tests", action="store_true", help="do not run the CUDA tests")
    args = p.parse_args(argv)
    import train
    if args.preset not in train.PRESETS:
        p.error(f"--preset {args.preset}: choose one of {', '.join(train.PRESETS)}")
    return args


def cuda_tests() -> str:
    """`pytest -m cuda` in a fresh process: its summary line."""
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"],
                       cwd=ROOT, capture_output=True, text=True)
    lines = [l for l in r.stdout.splitlines() if re.search(r"\d+ (passed|failed|error|skipped|deselected)", l)]
    summary = lines[-1].strip("= ") if lines else (r.stderr.strip().splitlines() or ["no output"])[-1]
    return f"{summary} ({time.time() - t0:.0f} s wall)" + ("" if r.returncode == 0 else f"; exit code {r.returncode}")


def sampler_bytes_per_s(preset: str, device: torch.device, n: int) -> str:
    """Incremental generation of n bytes, one row, by an untrained BLT of the preset (threshold calibrated on
    random bytes), and the same seed's bytes on the CPU (sample.py draws its noise on the host). If generation
    fails on the device, the CPU rate is measured and the error named."""
    import train
    from blt import BLT, BLTConfig
    from patching import calibrate_threshold
    from sample import generate

    torch.manual_seed(0)
    model = BLT(BLTConfig.from_dict(train.PRESETS[preset]["blt"].to_dict())).eval()
    if model.entropy_model is not None:
        x = torch.randint(4, 260, (16, 256))
        model.cfg.entropy_threshold = calibrate_threshold(model.entropy_model.entropies(x), model.cfg.patch_size)

    def rate(on: torch.device) -> tuple[float, torch.Tensor]:
        model.to(on)
        generate(model, b"", 16, seed=0, stop_at_eos=False)  # warm-up
        if on.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        tokens, _ = generate(model, b"", n, seed=0, stop_at_eos=False)
        if on.type == "cuda":
            torch.cuda.synchronize()
        return n / (time.perf_counter() - t0), tokens.cpu()

    try:
        speed, tokens = rate(device)
        if device.type == "cpu":
            return f"{speed:,.0f} bytes/s on cpu"
        _, on_cpu = rate(torch.device("cpu"))
        differ = (tokens != on_cpu).nonzero()
        same = "the same bytes as on the CPU for seed 0" if not len(differ) else \
            f"differs from the CPU's bytes from byte {int(differ[0, 1])} on (float rounding near a tie or the threshold)"
        return f"{speed:,.0f} bytes/s on {device.type}; {same}"
    except Exception as e:  # noqa: BLE001  (whatever sample.py raises on this device, the table names it)
        if device.type == "cpu":
            raise
        why = str(e).strip().splitlines()[0][:120]
        return f"fails on {device.type} ({why}); {rate(torch.device('cpu'))[0]:,.0f} bytes/s on cpu"


def bf16_peak(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((peak for key, peak in BF16_PEAKS if key in name), None)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda or 'none'}); nothing measured. A dry run: python tools/gpu_check.py "
              f"--device cpu --preset smoke --backend aot_eager --steps 3", file=sys.stderr)
        return 1
    from bench_train import matmul_peak, measure

    device = torch.device(args.device)
    name, spec_peak = bf16_peak(device)
    rows = [("device", f"{name}; torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""))]
    t_start = time.time()
    if args.device == "cuda" and not args.skip_tests:
        print("running the CUDA tests ...", file=sys.stderr, flush=True)
        rows.append(("CUDA tests (`python -m pytest -m cuda`)", cuda_tests()))
    else:
        rows.append(("CUDA tests", "skipped" + (" (--device cpu)" if args.device == "cpu" else "")))

    from runtime import default_dtype
    dtype = "bf16" if device.type == "cpu" else default_dtype(device)  # fp16 where the GPU only emulates bf16
    print(f"training {args.preset} BLT ({dtype}) for up to {args.steps} steps ...", file=sys.stderr, flush=True)
    r = measure(args.preset, "blt", dtype, args.steps, compiled=True, device=args.device, backend=args.backend,
                max_seconds=args.max_seconds)
    measured_peak = matmul_peak(device, torch.bfloat16)
    mfu = f"MFU {r['flops_per_s'] / spec_peak:.1%} of the {spec_peak / 1e12:,.0f} TFLOP/s bf16 peak of its data " \
          f"sheet; " if spec_peak else ""
    rows += [
        (f"BLT training, preset {args.preset} ({r['batch']} bytes per step, {dtype}"
         f"{' with a gradient scaler' if dtype == 'fp16' else ''}, torch.compile {args.backend})",
         f"{r['bytes_per_s']:,.0f} bytes/s; {r['step_s']:.3f} s per step (median of {r['timed_steps']} steps); "
         f"{r['patch_size']:.2f} bytes per patch"),
        ("achieved FLOP/s (paper §4.5 FLOPs per byte, plus the entropy model's forward)",
         f"{r['flops_per_s'] / 1e12:,.2f} TFLOP/s ({r['mflop_per_byte']:,.1f} MFLOP per byte): {mfu}"
         f"{r['flops_per_s'] / measured_peak:.1%} of the {measured_peak / 1e12:,.1f} TFLOP/s bf16 matmul peak "
         f"measured here"),
        ("peak memory", f"{r['peak_memory'] / 2 ** 30:,.2f} GiB ({'allocator' if device.type == 'cuda' else 'resident set'})"),
        ("torch.compile", f"first step (compiling) {r['first_step_s']:.0f} s; {r['graphs']} graph(s) for patch counts "
                          f"{r['patch_counts']}: {r['graphs'] - r['graphs_first_step']} recompiles"),
    ]
    print("timing the sampler ...", file=sys.stderr, flush=True)
    rows.append((f"sampler (sample.generate, incremental, 1 row, {args.sample_bytes} bytes, untrained {args.preset} BLT)",
                 sampler_bytes_per_s(args.preset, device, args.sample_bytes)))
    print("\n| check | result |\n|---|---|")
    for what, result in rows:
        print(f"| {what} | {result} |")
    print(f"\n({time.time() - t_start:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

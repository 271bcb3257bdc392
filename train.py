"""Train the Byte Latent Transformer end to end: entropy model -> threshold -> BLT (paper sections 2-4).

    python train.py                          # all three stages, default corpus (shakespeare), cpu or gpu preset
    python train.py --stage entropy          # 1. train the entropy model (paper 2.3) -> OUT/entropy.pt
    python train.py --stage calibrate        # 2. threshold for the target patch size on TRAIN -> OUT/calibration.json
    python train.py --stage blt              # 3. BLT with the frozen entropy model -> OUT/blt_entropy.pt
    python train.py --patching space         # BLT baselines: strided | space | entropy | monotonic
    python train.py --model byte             # a plain byte-level transformer of matching size -> OUT/byte.pt
    python train.py --data ../shared/data/tinyshakespeare.txt --time-budget 300
    torchrun --standalone --nproc_per_node=N train.py ...   # DDP: N processes share each global batch

Stage 1 trains the small causal byte LM of entropy_model.py on the training split. Stage 2 runs it, frozen,
over windows of the training split and bisects the entropy threshold theta until the average patch size is
cfg.patch_size (patching.calibrate_threshold; thresholds do not transfer between models or corpora). Stage 3
trains BLT: each batch is patched by the frozen entropy model (in fp32, exactly as at calibration and at
generation), then encoder -> global transformer -> decoder predict every next byte.

Evaluation: bits per byte over the whole validation split, cut into fixed non-overlapping windows
(data.eval_windows), so every model and every patching scheme predicts exactly the same bytes. Reported with
it: the average patch size and FLOPs per byte (blt.flops_per_byte, paper section 4.5).

Recipe (paper section 4): AdamW (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices, linear warmup then
cosine decay to 10% of the peak, gradient clipping at 1.0; every batch holds B * T bytes.

--time-budget SECONDS is the wall-clock budget of the whole command: the entropy model gets a share of it,
calibration a few seconds, the rest goes to the main model, including its final evaluation. Under a budget
the cosine schedule follows the clock (progress = time spent / time available) instead of the step count.

Checkpoint format (torch.save; every value is a tensor, dict, list or primitive, so torch.load(...,
weights_only=True) reads it). Written to a temporary file and renamed, so a crash never leaves a half
checkpoint; Ctrl-C or SIGTERM saves one before exiting.
    {"format": 1,
     "kind": "entropy" | "blt" | "byte",
     "config": dict,        # blt: BLTConfig.to_dict() (patching mode, threshold, entropy model sizes);
                            # entropy / byte: ByteLMConfig (EntropyModel arguments)
     "train": dict,         # TrainConfig: the settings that must not change across a resume
     "model": state_dict,   # uncompiled weights; for blt it includes the frozen entropy model
     "optimizer": state_dict, "step": int, "steps": int, "done": bool,
     "rng": {"torch", "numpy", "python"}, "data": {"seed", "batches"},   # batches drawn so far
     "elapsed": float, "time_budget": float | None, "metrics": dict}   # last evaluation
`load_checkpoint(path)` returns (kind, config, model) from one of these, for sample.py.

Shapes: B = batch, T = bytes per window (input positions, BOS included), V = 260.
"""
import argparse
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

# On a small machine shared with other work, OpenMP threads that spin while they wait make torch several
# times slower as soon as another process wants a core (measured here: 2.6 s vs 22 s per step with one busy
# core); waiting passively costs little when the machine is idle. OpenMP reads this when torch loads it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from blt import BLT, BLTConfig, bits_per_byte, byte_transformer_flops_per_byte, count_parameters  # noqa: E402
from blt import cpu_tiny, flops_per_byte, one_gpu  # noqa: E402
from data import DataError, eval_windows, get_batch, load_corpus  # noqa: E402
from entropy_model import EntropyModel  # noqa: E402
from patching import VOCAB_SIZE, average_patch_size, calibrate_threshold, entropy_patch_starts  # noqa: E402
from patching import lengths_from_starts, limit_patch_length  # noqa: E402

CHECKPOINT_FORMAT = 1

# ---------------------------------------------------------------------------------------------------------
# Defaults, in one place. A preset = model sizes + training settings; flags override single values.
# ---------------------------------------------------------------------------------------------------------
PRESETS = {
    # 2 CPU cores: the whole pipeline in about 10 minutes.
    "cpu": dict(
        blt=lambda: cpu_tiny(),
        byte=dict(dim=256, layers=4, heads=4, window=None, multiple_of=32),
        entropy_train=dict(seq_len=256, batch_size=32, lr=3e-3, warmup_steps=50, dtype="bf16"),
        train=dict(seq_len=256, batch_size=32, lr=2e-3, warmup_steps=100, dtype="bf16"),
        entropy_steps=400, steps=600, entropy_time_share=0.15,  # BLT ~1 s/step on 2 cores: 4.9 MB, one epoch
        eval_interval=100, eval_bytes=65536, log_interval=10, compile=False,
    ),
    # One GPU: about an hour. Meant for a larger corpus (--data enwik8); shakespeare is small for it.
    "gpu": dict(
        blt=lambda: one_gpu(),
        byte=dict(dim=768, layers=12, heads=12, window=None, multiple_of=256),
        entropy_train=dict(seq_len=1024, batch_size=64, lr=1e-3, warmup_steps=500, dtype="bf16"),
        train=dict(seq_len=1024, batch_size=64, lr=4e-4, warmup_steps=2000, dtype="bf16"),
        entropy_steps=5000, steps=30000, entropy_time_share=0.1,
        eval_interval=1000, eval_bytes=1 << 20, log_interval=50, compile=True,
    ),
}


@dataclass
class ByteLMConfig:
    """A plain causal byte transformer (entropy_model.EntropyModel): the entropy model, or the byte baseline."""
    dim: int = 256
    layers: int = 4
    heads: int = 4
    window: int | None = None  # sliding attention window in bytes; None = the whole window
    rope_theta: float = 10000.0
    multiple_of: int = 256  # SwiGLU hidden width rounding
    norm_eps: float = 1e-5
    dropout: float = 0.0  # training only (the byte baseline, to match a BLT trained with dropout)

    @classmethod
    def of_entropy_model(cls, cfg: BLTConfig) -> "ByteLMConfig":
        return cls(cfg.entropy_dim, cfg.entropy_layers, cfg.entropy_heads, cfg.entropy_window,
                   cfg.entropy_rope_theta, cfg.multiple_of, cfg.norm_eps)

    def build(self) -> EntropyModel:
        return EntropyModel(self.dim, self.layers, self.heads, self.window, self.rope_theta, self.multiple_of,
                            self.norm_eps, self.dropout)


@dataclass
class TrainConfig:
    """Settings a resumed run must share with the original (the step count is planned, so it lives apart)."""
    seq_len: int = 256  # T: bytes per window; a batch predicts batch_size * seq_len bytes
    batch_size: int = 32  # B
    lr: float = 4e-4  # peak learning rate (paper: 4e-4 at 1B scale)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 2000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    dtype: str = "bf16"  # autocast dtype for matmuls: bf16 | fp32
    seed: int = 0


class UsageError(Exception):
    """A bad combination of flags or files, reported as one line."""


class CheckpointError(Exception):
    """A missing, unreadable or mismatched checkpoint, reported as one line."""


class TrainingError(Exception):
    """Training went wrong (a non-finite loss), reported as one line."""


class Interrupted(Exception):
    """A stop asked for by a signal (exit 128 + signal number) or by --stop-at (exit 0), after saving."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum if signum else 0


# ---------------------------------------------------------------------------------------------------------
# Several processes (torchrun): DistributedDataParallel
# ---------------------------------------------------------------------------------------------------------

class Distributed:
    """torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE) -> a process group; in one process every method is
    a no-op, so the training loop reads the same either way.

    Each optimizer step consumes one global batch of `batch_size` windows (data.get_batch, fixed by seed and
    step). Rank r reads rows [r * B / N, (r + 1) * B / N) of it, in micro-batches; DDP averages the gradients.
    So N processes take the same steps as one process with the same --batch-size, up to float summation order."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        self.main = self.rank == 0
        self.device = torch.device("cpu")  # where the small reductions below live (NCCL needs CUDA tensors)

    def start(self, device: torch.device):
        if not self.enabled:
            return
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        if dist.get_world_size() != self.world:
            raise UsageError(f"WORLD_SIZE is {self.world} but the process group has {dist.get_world_size()} ranks")
        self.device = device

    def stop(self):
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    def rows(self, batch_size: int) -> slice:
        """This rank's share of a global batch of batch_size windows."""
        share = batch_size // self.world
        return slice(self.rank * share, (self.rank + 1) * share)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def _reduce(self, values: list[float], op: str) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
        return t.tolist()

    def sum(self, values: list[float]) -> list[float]:
        return self._reduce(values, "SUM")

    def max(self, values: list[float]) -> list[float]:
        """Every rank gets the largest value: used to agree on when to stop (the clock, a signal)."""
        return self._reduce(values, "MAX")


DIST = Distributed()


def say(*args, **kwargs):
    """print on rank 0 only."""
    if DIST.main:
        print(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------

def atomic_save(obj, path: Path):
    """torch.save to a temporary file in the same folder, fsync, then rename over path: a reader (or a crash
    at any moment) sees either the old checkpoint or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_checkpoint(path: Path) -> dict:
    """torch.load with weights_only=True, with one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated files, foreign pickles and random bytes all end up here
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated, corrupted or not ours): {first[:200]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("kind") not in ("entropy", "blt", "byte"):
        raise CheckpointError(f"{path} is not a BLT training checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def build_model(kind: str, config: dict):
    """(kind, config dict) -> (config object, fresh model)."""
    if kind == "blt":
        cfg = BLTConfig.from_dict(config)
        return cfg, BLT(cfg)
    cfg = ByteLMConfig(**config)
    return cfg, cfg.build()


def load_checkpoint(path) -> tuple[str, object, torch.nn.Module]:
    """Checkpoint -> (kind, config, model in eval mode on CPU). kind is "blt" (config: BLTConfig, with the
    patching mode and threshold; model: BLT including its entropy model), "entropy" or "byte" (config:
    ByteLMConfig; model: EntropyModel). Raises CheckpointError with a one-line message."""
    ckpt = read_checkpoint(path)
    try:
        cfg, model = build_model(ckpt["kind"], ckpt["config"])
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: weights do not fit the config stored with them: {first[:200]}") from None
    return ckpt["kind"], cfg, model.eval()


def rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": [py_state[0], list(py_state[1]), py_state[2]]}


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def config_difference(saved: dict, current: dict) -> str | None:
    """First differing key between two config dicts, as 'key: saved vs current', or None."""
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            a, b = list(a), list(b)
        if a != b:
            return f"{key}: {a!r} in the checkpoint, {b!r} now"
    return None


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------

def lr_at(step: int, tc: TrainConfig, progress: float) -> float:
    """Linear warmup over the first warmup_steps, times a cosine from lr down to lr * min_lr_ratio as
    progress goes from 0 to 1 (progress = step / steps, or the fraction of the time budget spent)."""
    warmup = min(1.0, (step + 1) / max(1, tc.warmup_steps))
    cosine = tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return tc.lr * warmup * cosine


def make_optimizer(model: torch.nn.Module, tc: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (linear and embedding weights), none on norm gains. Frozen parameters
    (BLT's entropy model) are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.adam_eps,
                             fused=device.type == "cuda")


def autocast(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x


def pad_patches(lengths: torch.Tensor, multiple: int) -> torch.Tensor:
    """Right-pad patch lengths (B, P) with empty patches to a multiple of `multiple` patches, so a compiled
    model sees a few shapes instead of one per batch. Empty patches are invisible (patching.py)."""
    extra = -lengths.shape[1] % multiple
    return F.pad(lengths, (0, extra)) if extra else lengths


class Stage:
    """What differs between the three trainable models: how a batch becomes a loss and an evaluation."""

    def __init__(self, kind: str, name: str, model: torch.nn.Module, config, tc: TrainConfig, device, compile_model: bool):
        self.kind, self.name, self.model, self.config, self.tc, self.device = kind, name, model, config, tc, device
        self.compile_model = compile_model
        self.pad_to = 16 if compile_model else 1
        self.compiled = model

    def prepare(self):
        """Once the weights are on the device and loaded: wrap for DDP (several processes), then compile."""
        wrapped = DIST.wrap(self.model)
        self.compiled = torch.compile(wrapped) if self.compile_model else wrapped

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "blt":
            lengths = pad_patches(self.model.patch(x), self.pad_to)  # fp32 entropy model, outside autocast
            with autocast(self.device, self.tc.dtype):
                return self.compiled(x, y, patch_lengths=lengths)[1]
        with autocast(self.device, self.tc.dtype):
            return self.compiled(x, y)[1]

    def no_sync(self):
        """DDP: skip the gradient all-reduce on all but the last micro-batch of a step."""
        return self.model_ddp.no_sync() if DIST.enabled else nullcontext()

    @property
    def model_ddp(self):
        return getattr(self.compiled, "_orig_mod", self.compiled)

    @torch.no_grad()
    def evaluate(self, val: np.ndarray, max_bytes: int | None = None) -> dict:
        """Bits per byte over val[:max_bytes] in fixed windows; for BLT also the average patch size."""
        model = self.model
        model.eval()
        nats, n_bytes, positions, patches = 0.0, 0, 0, 0
        for i, (x, y) in enumerate(eval_windows(val, self.tc.seq_len, self.tc.batch_size, max_bytes)):
            if i % DIST.world != DIST.rank:  # several processes: each evaluates every N-th batch
                continue
            x, y = to_device(x, self.device), to_device(y, self.device)
            with autocast(self.device, self.tc.dtype):
                if self.kind == "blt":
                    lengths = model.patch(x)
                    positions, patches = positions + int(lengths.sum()), patches + int((lengths > 0).sum())
                    logits = model(x, patch_lengths=lengths)
                else:
                    logits = model(x)
            nats += F.cross_entropy(logits.float().reshape(-1, VOCAB_SIZE), y.reshape(-1), reduction="sum").item()
            n_bytes += y.numel()
        model.train()
        nats, n_bytes, positions, patches = DIST.sum([nats, n_bytes, positions, patches])
        n_bytes = int(n_bytes)
        out = {"val_bpb": bits_per_byte(nats, n_bytes), "val_bytes": n_bytes}
        if self.kind == "blt":
            out["patch_size"] = positions / patches
        return out

    def flops(self, patch_size: float | None) -> dict:
        """Training and forward FLOPs per byte (paper section 4.5), entropy model apart."""
        T = self.tc.seq_len
        if self.kind == "blt":
            f = flops_per_byte(self.config, patch_size or self.config.patch_size, T)
            return {"train_flops_per_byte": f["train_total"], "forward_flops_per_byte": f["forward_total"],
                    "entropy_forward_flops_per_byte": f["entropy_model_forward"]}
        c = self.config
        f = byte_transformer_flops_per_byte(c.dim, c.layers, min(c.window or T, T), c.multiple_of)
        return {"train_flops_per_byte": f["train_total"], "forward_flops_per_byte": f["forward_total"]}


class StopSignal:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint at the end of the step and exits. A second
    Ctrl-C stops at once (the last saved checkpoint stays intact)."""

    def __init__(self):
        self.signum = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum


class MetricsLog:
    """One JSON object per line: {"type": "train" | "eval", "step", ...}."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        lines = []
        if resume_step is not None and path.exists():  # drop what was logged after the checkpoint
            lines = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= resume_step]
        atomic_write_text(path, "".join(l + "\n" for l in lines))
        self.file = open(path, "a")

    def write(self, record: dict):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


def plot_curves(jsonl_paths: list[Path], png: Path, title: str):
    """Training curves (train and validation bits per byte against bytes seen and wall time) -> PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_bytes, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
    for path in jsonl_paths:
        records = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
        train = [r for r in records if r["type"] == "train"]
        evals = [r for r in records if r["type"] == "eval"]
        label = path.stem
        for ax, key, scale in ((ax_bytes, "bytes", 1e6), (ax_time, "time", 1.0)):
            if train:
                line, = ax.plot([r[key] / scale for r in train], [r["bpb"] for r in train], alpha=0.35, lw=1)
                color = line.get_color()
            else:
                color = None
            if evals:
                ax.plot([r[key] / scale for r in evals], [r["val_bpb"] for r in evals], "o-", color=color,
                        ms=3, label=f"{label} (val {evals[-1]['val_bpb']:.3f})")
    ax_bytes.set_xlabel("training bytes (millions)")
    ax_time.set_xlabel("wall time in this stage (s)")
    for ax in (ax_bytes, ax_time):
        ax.set_ylabel("bits per byte (faint: train, dots: validation)")
        ax.grid(alpha=0.3)
        ax.set_ylim(top=min(ax.get_ylim()[1], 6))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = png.with_name(f".{png.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, png)
    plt.close(fig)


def train_stage(stage: Stage, corpus, ckpt_path: Path, steps: int, time_budget: float | None, resume: dict | None,
                opts) -> dict:
    """The loop shared by the entropy model, BLT and the byte baseline. Returns the final metrics.

    Without a time budget the run takes `steps` steps and the schedule follows the step count: a resumed run
    replays the uninterrupted one exactly. With a budget the schedule follows the clock instead (progress =
    time spent / time available for training, after reserving time for the final evaluation), so a slow
    patch of the machine costs steps but never overruns the budget.

    Under torchrun every rank runs this loop on its share of each batch; after every step the ranks agree on
    the clock and on a pending signal (the largest value wins), so they stop at the same step. Rank 0 alone
    writes the checkpoint, the metrics log and the figure."""
    model, tc, device = stage.model, stage.tc, stage.device
    model.to(device)
    optimizer = make_optimizer(model, tc, device)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    step, elapsed_before, metrics = 0, 0.0, {}
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        set_rng_state(resume["rng"])
        step, elapsed_before, metrics = resume["step"], resume["elapsed"], resume["metrics"]
        steps, time_budget = resume["steps"], resume["time_budget"]
    stage.prepare()
    rows = DIST.rows(tc.batch_size)  # this rank's windows of every global batch
    micro = opts.micro_batch_size or (rows.stop - rows.start)
    accumulate = (rows.stop - rows.start) // micro  # micro-batches per step on this rank
    bytes_per_step = tc.batch_size * tc.seq_len  # the global batch: what every step consumes, whatever N is
    n_final = min(len(corpus.val), opts.final_eval_bytes or len(corpus.val))
    log = MetricsLog(ckpt_path.with_suffix(".jsonl"), step if resume is not None else None) if DIST.main else None
    write = log.write if log else (lambda record: None)
    start = time.time() - elapsed_before
    eval_rate = None  # validation bytes per second, measured at the first periodic evaluation

    def progress() -> float:
        if time_budget is None:
            return step / steps
        # Keep time for the final evaluation, checkpoint and figure. Evaluation runs forward only, ~2.5x the
        # training rate per byte until an evaluation has been timed.
        rate = eval_rate or (2.5 * bytes_per_step * step / max(1e-3, time.time() - start) if step >= 3 else None)
        reserve = min(0.25 * time_budget, 1.2 * n_final / rate + 2.0) if rate else 0.0
        return (time.time() - start) / max(1e-3, time_budget - reserve)

    def checkpoint(done: bool):
        if DIST.main:
            atomic_save({"format": CHECKPOINT_FORMAT, "kind": stage.kind, "config": asdict(stage.config),
                         "train": asdict(tc), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "step": step, "steps": steps, "done": done, "rng": rng_state(),
                         "data": {"seed": tc.seed, "batches": step}, "elapsed": time.time() - start,
                         "time_budget": time_budget, "metrics": metrics}, ckpt_path)
        DIST.barrier()  # no rank leaves (or reads the file) before it is complete

    def eval_record(max_bytes):
        result = stage.evaluate(corpus.val, max_bytes)
        result.update(stage.flops(result.get("patch_size")))
        return {"type": "eval", "step": step, "bytes": step * bytes_per_step, "time": time.time() - start, **result}

    bar = tqdm_bar(stage.name, step, None if time_budget else steps)
    model.train()
    try:
        with StopSignal() as stop:
            def agreed() -> tuple[float, int]:
                """(progress, pending signal number or 0), the same on every rank."""
                p, signum = DIST.max([progress(), float(stop.signum or 0)])
                return p, int(signum)

            p, signum = agreed()
            while p < 1.0:
                t0 = time.time()
                lr = lr_at(step, tc, p)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x, y = get_batch(corpus.train, tc.batch_size, tc.seq_len, tc.seed, step, rows)
                x, y = to_device(x, device), to_device(y, device)
                optimizer.zero_grad(set_to_none=True)
                loss_sum = 0.0
                for i in range(accumulate):  # gradient accumulation: the global batch stays batch_size windows
                    part = slice(i * micro, (i + 1) * micro)
                    with stage.no_sync() if i < accumulate - 1 else nullcontext():
                        loss = stage.loss(x[part], y[part]) / accumulate
                        loss.backward()
                    loss_sum = loss_sum + loss.detach()
                torch.nn.utils.clip_grad_norm_(trainable, tc.grad_clip)
                optimizer.step()
                step += 1
                p, signum = agreed()
                last = p >= 1.0
                if step % opts.log_interval == 0 or last:
                    loss_value = DIST.sum([loss_sum.item()])[0] / DIST.world  # mean over the global batch
                    if not math.isfinite(loss_value):
                        raise TrainingError(f"{stage.name}: loss became {loss_value} at step {step}; the last good "
                                            f"checkpoint {ckpt_path} was kept (try a lower --lr)")
                    rate = bytes_per_step / max(time.time() - t0, 1e-9)
                    write({"type": "train", "step": step, "bytes": step * bytes_per_step,
                           "time": time.time() - start, "lr": lr, "loss": loss_value,
                           "bpb": loss_value / math.log(2), "bytes_per_s": rate})
                    bar.set_postfix(loss=f"{loss_value:.3f}", bpb=f"{loss_value / math.log(2):.3f}",
                                    bytes_s=f"{rate:,.0f}", refresh=False)
                bar.update(1)
                if step % opts.eval_interval == 0 and not last:
                    t_eval = time.time()
                    metrics = eval_record(opts.eval_bytes)
                    eval_rate = metrics["val_bytes"] / max(1e-3, time.time() - t_eval)
                    write(metrics)
                    bar.set_postfix(loss=f"{loss_value:.3f}", val_bpb=f"{metrics['val_bpb']:.3f}", refresh=False)
                    if opts.checkpoint_interval and step % opts.checkpoint_interval == 0:
                        checkpoint(done=False)
                if (signum or step == opts.stop_at) and not last:
                    checkpoint(done=False)
                    why = signal.Signals(signum).name if signum else f"--stop-at {opts.stop_at}"
                    bar.close()
                    if log:
                        log.close()
                        plot_curves([log.path], ckpt_path.with_suffix(".png"), f"{stage.name} (stopped at step {step})")
                    raise Interrupted(f"{stage.name}: stopped by {why} at step {step}; checkpoint saved to "
                                      f"{ckpt_path}; continue with --resume", signum)
        bar.close()
        metrics = eval_record(n_final)
        metrics["steps"] = step
        metrics["stage_seconds"] = time.time() - start
        write(metrics)
        checkpoint(done=True)
    finally:
        bar.close()
        if log:
            log.close()
    if log:
        plot_curves([log.path], ckpt_path.with_suffix(".png"), stage.name)
    return metrics


def tqdm_bar(name: str, step: int, total: int | None):
    from tqdm import tqdm
    return tqdm(total=total, initial=step, desc=name, unit="step", dynamic_ncols=True, mininterval=1.0,
                disable=not DIST.main)


# ---------------------------------------------------------------------------------------------------------
# The three stages
# ---------------------------------------------------------------------------------------------------------

def start_or_resume(ckpt_path: Path, kind: str, config: dict, tc: TrainConfig, opts) -> dict | None:
    """None to start fresh; the checkpoint dict to resume (or to skip a finished stage). Refuses to
    overwrite a checkpoint without --resume or --overwrite, and refuses one written for another config."""
    if not ckpt_path.exists() or opts.overwrite:
        return None
    if not opts.resume:
        raise UsageError(f"{ckpt_path} already exists: pass --resume to continue it, --overwrite to start over, "
                         f"or --out DIR to write elsewhere")
    ckpt = read_checkpoint(ckpt_path)
    if ckpt["kind"] != kind:
        raise CheckpointError(f"{ckpt_path} holds a {ckpt['kind']} model, not a {kind} model")
    diff = config_difference(ckpt["config"], config) or config_difference(ckpt["train"], asdict(tc))
    if diff:
        raise CheckpointError(f"{ckpt_path} was written with another config ({diff}); rerun with the same "
                              f"flags, or drop --resume and use --out DIR")
    return ckpt


def run_stage(kind: str, name: str, config, make_model, tc: TrainConfig, steps: int, corpus, out: Path,
              time_budget: float | None, opts, describe: str) -> dict:
    ckpt_path = out / f"{name}.pt"
    resume = start_or_resume(ckpt_path, kind, asdict(config), tc, opts)
    if resume is not None and resume["done"]:
        say(f"{name}: already trained ({resume['step']} steps) in {ckpt_path}, skipping")
        return resume["metrics"]
    torch.manual_seed(tc.seed)  # the same initial weights on every run with this seed
    model = make_model()
    params = count_parameters(model)
    say(f"{name}: {describe}; parameters {', '.join(f'{k} {v:,}' for k, v in params.items() if v)}; "
        f"{tc.batch_size} x {tc.seq_len} bytes per step"
        + (f"; resuming at step {resume['step']}" if resume is not None else "")
        + (f"; {DIST.world} processes" if DIST.enabled else ""))
    stage = Stage(kind, name, model, config, tc, opts.device, opts.compile)
    metrics = train_stage(stage, corpus, ckpt_path, steps, time_budget, resume, opts)
    summary = f"{name}: val {metrics['val_bpb']:.4f} bpb over {metrics['val_bytes']:,} bytes"
    if "patch_size" in metrics:
        summary += f" | avg patch {metrics['patch_size']:.2f} bytes"
    summary += (f" | {metrics['train_flops_per_byte'] / 1e6:.1f} MFLOP/byte train"
                f" | {metrics['steps']} steps in {metrics['stage_seconds']:.0f} s")
    say(summary)
    return metrics


def calibrate(entropy_cfg: ByteLMConfig, blt_cfg: BLTConfig, tc: TrainConfig, corpus, out: Path, opts) -> dict:
    """Stage 2: entropies of the frozen entropy model on fixed windows of the TRAIN split -> threshold."""
    ckpt = read_checkpoint(out / "entropy.pt")
    diff = config_difference(ckpt["config"], asdict(entropy_cfg))
    if ckpt["kind"] != "entropy" or diff:
        raise CheckpointError(f"{out / 'entropy.pt'} does not match the entropy model of this config ({diff}); "
                              f"retrain it with --stage entropy --overwrite")
    if not ckpt["done"]:
        raise UsageError(f"the entropy model in {out / 'entropy.pt'} is not finished: continue it with --resume")
    model = entropy_cfg.build()
    model.load_state_dict(ckpt["model"])
    model.to(opts.device).eval()
    monotonic = blt_cfg.patching == "monotonic"
    # Fixed windows (seed stream apart from training batches); entropies in fp32 as in BLT.patch.
    x, _ = get_batch(corpus.train, opts.calibration_windows, tc.seq_len, tc.seed + 1_000_003, 0)
    with torch.no_grad():
        entropies = torch.cat([model.entropies(to_device(chunk, opts.device)).cpu() for chunk in x.split(64)])
    theta = calibrate_threshold(entropies, blt_cfg.patch_size, monotonic=monotonic, max_patch_length=blt_cfg.max_patch_length)
    achieved = average_patch_size(lengths_from_starts(limit_patch_length(
        entropy_patch_starts(entropies, theta, monotonic), blt_cfg.max_patch_length)))
    result = {"scheme": blt_cfg.patching, "target_patch_size": blt_cfg.patch_size, "threshold": theta,
              "patch_size_on_train_sample": achieved, "windows": opts.calibration_windows, "seq_len": tc.seq_len,
              "max_patch_length": blt_cfg.max_patch_length, "entropy_model": asdict(entropy_cfg),
              "entropy_model_step": ckpt["step"], "mean_entropy_nats": float(entropies.mean())}
    if DIST.main:  # every rank computed the same threshold; one writes it
        atomic_write_text(out / "calibration.json", json.dumps(result, indent=1) + "\n")
    DIST.barrier()
    say(f"calibrate: {blt_cfg.patching} threshold {theta:.4f} nats gives {achieved:.2f} bytes per patch on "
          f"{opts.calibration_windows} training windows (target {blt_cfg.patch_size})")
    return result


def load_calibration(out: Path, blt_cfg: BLTConfig, entropy_cfg: ByteLMConfig) -> float:
    path = out / "calibration.json"
    if not path.exists():
        raise UsageError(f"no threshold in {out}: run --stage calibrate first (or --stage all)")
    cal = json.loads(path.read_text())
    if (cal["scheme"] != blt_cfg.patching or cal["target_patch_size"] != blt_cfg.patch_size
            or cal["max_patch_length"] != blt_cfg.max_patch_length or cal["entropy_model"] != asdict(entropy_cfg)):
        raise UsageError(f"{path} was calibrated for {cal['scheme']} patching at {cal['target_patch_size']} bytes "
                         f"per patch; rerun --stage calibrate for {blt_cfg.patching} at {blt_cfg.patch_size}")
    return cal["threshold"]


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def parse_overrides(pairs: list[str], cls) -> dict:
    """["local_dim=192", "hash_ngram_sizes=[3,4,5]"] -> {"local_dim": 192, ...}, checked against cls's fields."""
    known = {f.name for f in fields(cls)}
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in known:
            raise UsageError(f"--config {pair!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(known))}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the entropy model, calibrate its threshold, train BLT "
                                "(or a byte-level baseline), and report held-out bits per byte.")
    p.add_argument("--data", default="shakespeare",
                   help="a local file (last 10%% is validation), a directory, or a corpus name: shakespeare "
                        "(default), tinyshakespeare, enwik8")
    p.add_argument("--preset", choices=PRESETS, default=None, help="cpu or gpu (default: gpu if CUDA is available)")
    p.add_argument("--stage", choices=("all", "entropy", "calibrate", "blt"), default="all",
                   help="run one stage alone (each reads what the previous one wrote into --out)")
    p.add_argument("--model", choices=("blt", "byte"), default="blt", help="byte: a plain byte-level transformer")
    p.add_argument("--patching", choices=("entropy", "monotonic", "strided", "space"), default="entropy")
    p.add_argument("--patch-size", type=float, default=None,
                   help="target average patch size (entropy schemes) or stride (strided)")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model config field (BLTConfig; ByteLMConfig with --model byte)")
    p.add_argument("--out", default=None, help="output folder (default: out/<corpus>-<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the checkpoints in --out (finished stages are skipped)")
    p.add_argument("--overwrite", action="store_true", help="start over even if --out holds checkpoints")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="wall-clock budget for the whole command; the schedules follow the clock")
    p.add_argument("--steps", type=int, default=None, help="training steps of the main model")
    p.add_argument("--entropy-steps", type=int, default=None, help="training steps of the entropy model")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows per optimizer step of the main model (the global batch, over all processes)")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="windows per forward/backward in one process; the rest of the batch is gradient "
                        "accumulation (default: batch size / processes)")
    p.add_argument("--seq-len", type=int, default=None, help="bytes per window of the main model")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate of the main model")
    p.add_argument("--entropy-lr", type=float, default=None, help="peak learning rate of the entropy model")
    p.add_argument("--entropy-seq-len", type=int, default=None, help="bytes per window for the entropy model")
    p.add_argument("--warmup-steps", type=int, default=None, help="warmup steps of the main model")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay of the main model (default 0.1)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="autocast dtype (default bf16)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice, the physical cores)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--eval-interval", type=int, default=None, help="steps between validation estimates")
    p.add_argument("--eval-bytes", type=int, default=None, help="validation bytes per periodic estimate")
    p.add_argument("--final-eval-bytes", type=int, default=0, help="bytes of the final evaluation (0: all)")
    p.add_argument("--log-interval", type=int, default=None, help="steps between logged training losses")
    p.add_argument("--checkpoint-interval", type=int, default=None,
                   help="save a checkpoint at every evaluation whose step is a multiple of this (default: eval interval)")
    p.add_argument("--calibration-windows", type=int, default=256, help="training windows used to calibrate")
    p.add_argument("--stop-at", type=int, default=None, help="save a resumable checkpoint after this step and stop")
    return p.parse_args(argv)


def main(argv=None) -> int:
    global DIST
    args = parse_args(argv)
    DIST = Distributed()  # from torchrun's environment; one process without it
    try:
        run(args)
    except (DataError, UsageError, CheckpointError, TrainingError) as e:
        print(f"error: {e}" if DIST.main else f"error (rank {DIST.rank}): {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        if DIST.main:
            print(str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        DIST.stop()
    return 0


def run(args):
    t_start = time.time()
    default_device = (f"cuda:{DIST.local_rank}" if DIST.enabled else "cuda") if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device or default_device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available here")
    if DIST.enabled and args.device and device.type == "cuda":
        raise UsageError("under torchrun each process takes the GPU of its LOCAL_RANK; drop --device")
    preset_name = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    preset = PRESETS[preset_name]
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # configs: preset, then flags
    blt_cfg = preset["blt"]()
    if args.model == "blt":
        blt_cfg = BLTConfig.from_dict({**blt_cfg.to_dict(), **parse_overrides(args.config, BLTConfig),
                                       "patching": args.patching,
                                       **({"patch_size": args.patch_size} if args.patch_size else {})})
    byte_cfg = ByteLMConfig(**{**preset["byte"], **(parse_overrides(args.config, ByteLMConfig) if args.model == "byte" else {})})
    entropy_cfg = ByteLMConfig.of_entropy_model(blt_cfg)
    seed = {"seed": args.seed}
    train = {k: v for k, v in dict(seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                                   warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                                   dtype=args.dtype).items() if v is not None}
    tc = TrainConfig(**{**preset["train"], **train, **seed})
    entropy_train = {k: v for k, v in dict(lr=args.entropy_lr, seq_len=args.entropy_seq_len, dtype=args.dtype).items() if v is not None}
    entropy_tc = TrainConfig(**{**preset["entropy_train"], **entropy_train, **seed})
    opts = argparse.Namespace(
        device=device, compile=preset["compile"] if args.compile is None else args.compile,
        eval_interval=args.eval_interval or preset["eval_interval"], eval_bytes=args.eval_bytes or preset["eval_bytes"],
        final_eval_bytes=args.final_eval_bytes, log_interval=args.log_interval or preset["log_interval"],
        checkpoint_interval=args.checkpoint_interval or args.eval_interval or preset["eval_interval"],
        calibration_windows=args.calibration_windows, resume=args.resume, overwrite=args.overwrite,
        stop_at=args.stop_at, micro_batch_size=args.micro_batch_size)
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other")
    if args.model == "byte":
        stages = ["byte"]
    elif args.stage == "all":
        stages = ["entropy", "calibrate", "blt"] if blt_cfg.patching in ("entropy", "monotonic") else ["blt"]
    else:
        stages = [args.stage]
    if "calibrate" in stages and blt_cfg.patching not in ("entropy", "monotonic"):
        raise UsageError(f"--stage calibrate needs entropy or monotonic patching, not {blt_cfg.patching}")
    trained = [("--batch-size", tc)] if {"blt", "byte"} & set(stages) else []
    trained += [("the entropy model's batch size", entropy_tc)] if "entropy" in stages else []
    for what, t in trained:
        per_rank = t.batch_size // DIST.world
        if t.batch_size % DIST.world or (args.micro_batch_size and per_rank % args.micro_batch_size):
            raise UsageError(f"{what} {t.batch_size} must split evenly into {DIST.world} processes"
                             + (f" x micro-batches of {args.micro_batch_size}" if args.micro_batch_size else ""))
    DIST.start(device)

    if not DIST.main:
        DIST.barrier()  # rank 0 downloads and prepares a named corpus first; the others then read its cache
    corpus = load_corpus(args.data, min_bytes=max(tc.seq_len, entropy_tc.seq_len))
    if DIST.main:
        DIST.barrier()
    name = Path(args.data).stem if os.sep in args.data or Path(args.data).exists() else args.data
    out = Path(args.out or Path("out") / f"{name}-{preset_name}")
    out.mkdir(parents=True, exist_ok=True)
    say(f"{corpus.describe()} | preset {preset_name} | device {device} | {torch.get_num_threads()} threads"
        + (f" x {DIST.world} processes" if DIST.enabled else "") + f" | out {out}")

    budget_left = lambda: None if args.time_budget is None else args.time_budget - (time.time() - t_start)  # noqa: E731
    steps = args.steps or preset["steps"]
    if "entropy" in stages:
        share = preset["entropy_time_share"] if "blt" in stages else 1.0
        budget = None if args.time_budget is None else max(1.0, share * budget_left())
        run_stage("entropy", "entropy", entropy_cfg, entropy_cfg.build, entropy_tc,
                  args.entropy_steps or preset["entropy_steps"], corpus, out, budget, opts,
                  "entropy model (paper 2.3), a small causal byte LM")
    if "calibrate" in stages:
        calibrate(entropy_cfg, blt_cfg, tc, corpus, out, opts)  # on windows as long as BLT's
    if "blt" in stages:
        if blt_cfg.patching in ("entropy", "monotonic"):
            blt_cfg.entropy_threshold = load_calibration(out, blt_cfg, entropy_cfg)
        entropy_weights = None
        if blt_cfg.patching in ("entropy", "monotonic"):
            ckpt = read_checkpoint(out / "entropy.pt")
            if config_difference(ckpt["config"], asdict(entropy_cfg)):
                raise CheckpointError(f"{out / 'entropy.pt'} does not match this config's entropy model; rerun --stage entropy")
            entropy_weights = ckpt["model"]

        def make_blt():
            model = BLT(blt_cfg)
            if entropy_weights is not None:
                model.entropy_model.load_state_dict(entropy_weights)
            return model
        run_stage("blt", f"blt_{blt_cfg.patching}", blt_cfg, make_blt, tc, steps, corpus, out, budget_left(), opts,
                  f"BLT with {blt_cfg.patching} patching (patch size {blt_cfg.patch_size:g})")
    if "byte" in stages:
        run_stage("byte", "byte", byte_cfg, byte_cfg.build, tc, steps, corpus, out, budget_left(), opts,
                  "plain byte-level transformer (no patches)")
    runs = sorted(out.glob("*.jsonl"))
    if runs and DIST.main:
        plot_curves(runs, out / "curves.png", f"{name}: validation bits per byte")
    say(f"done in {time.time() - t_start:.0f} s; metrics, checkpoints and curves in {out}")


if __name__ == "__main__":
    sys.exit(main())

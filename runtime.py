"""The machinery around train.py's training loop, so that the loop itself reads as the recipe.

    Distributed   torchrun's processes: process group, DDP wrapping, each rank's share of a batch, reductions
    Run           one training stage's bookkeeping: resume, the clock (steps or a time budget), stop signals,
                  the metrics log, checkpoints, the progress bar and the curves
    autocast, to_device   the compute dtype and host-to-device copies

Each of these is one line inside the loop. Nothing here changes what is computed: a run with the same flags
takes the same steps on the same batches whether it ran in one piece, was stopped by Ctrl-C and resumed, or
ran over several processes.
"""
import json
import math
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from checkpoint import FORMAT, atomic_save, atomic_write_text, rng_state, set_rng_state
from plots import plot_curves


class UsageError(Exception):
    """A bad combination of flags or files, reported as one line."""


class TrainingError(Exception):
    """Training went wrong (a non-finite loss), reported as one line."""


class Interrupted(Exception):
    """A stop asked for by a signal (exit 128 + signal number) or by --stop-at (exit 0), after saving."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum if signum else 0


# ---------------------------------------------------------------------------------------------------------
# Several processes (torchrun)
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
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
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

    def micro_batches(self, batch_size: int, micro_batch_size: int | None) -> list[slice]:
        """Slices of this rank's rows, one forward/backward each (gradient accumulation)."""
        rows = self.rows(batch_size)
        n = rows.stop - rows.start
        micro = micro_batch_size or n
        return [slice(i, i + micro) for i in range(0, n, micro)]

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def no_sync(self, ddp_model: torch.nn.Module, sync_now: bool):
        """Gradient accumulation: skip DDP's all-reduce on every micro-batch but a step's last."""
        return ddp_model.no_sync() if self.enabled and not sync_now else nullcontext()

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def _reduce(self, values: list[float], op) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def sum(self, values: list[float]) -> list[float]:
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, values: list[float]) -> list[float]:
        """Every rank gets the largest value: used to agree on when to stop (the clock, a signal)."""
        return self._reduce(values, dist.ReduceOp.MAX)

    def say(self, *args, **kwargs):
        """print on rank 0 only."""
        if self.main:
            print(*args, **kwargs)


DIST = Distributed()


def autocast(device: torch.device, dtype: str):
    """bf16: matmuls in bfloat16 under autocast (weights, optimizer and losses stay fp32); fp32: nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x


# ---------------------------------------------------------------------------------------------------------
# One training stage's bookkeeping
# ---------------------------------------------------------------------------------------------------------

class StopSignal:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint at the end of the step and exits. A second
    Ctrl-C stops at once (the last saved checkpoint stays intact)."""

    def __init__(self):
        self.signum = 0
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Clock:
    """How far a stage is: step / steps, or, under a time budget, the fraction of the budget spent.

    Under a budget the final evaluation must fit in it too, so the time for it is held back. Its length is
    estimated from the validation bytes and a measured evaluation rate; until an evaluation has been timed, the
    rate is guessed from the training rate."""
    EVAL_VS_TRAIN_RATE = 2.5  # forward only is ~1/3 of a training step's FLOPs; 2.5x was measured on 2 cores
    MIN_STEPS_FOR_RATE = 3  # the first steps include warm-up and compilation: too slow to extrapolate from
    SAFETY = 1.2  # the estimate x 1.2: a shared machine may slow down
    SAVE_SECONDS = 2.0  # the final checkpoint and figure
    MAX_RESERVE = 0.25  # never hold back more than a quarter of the budget

    def __init__(self, steps: int, budget: float | None, elapsed: float, bytes_per_step: int, final_eval_bytes: int):
        self.steps, self.budget, self.bytes_per_step, self.final_eval_bytes = steps, budget, bytes_per_step, final_eval_bytes
        self.start = time.time() - elapsed
        self.eval_rate = None  # validation bytes per second, once measured

    def elapsed(self) -> float:
        return time.time() - self.start

    def progress(self, step: int) -> float:
        if self.budget is None:
            return step / self.steps
        rate = self.eval_rate
        if rate is None and step >= self.MIN_STEPS_FOR_RATE:
            rate = self.EVAL_VS_TRAIN_RATE * self.bytes_per_step * step / max(1e-3, self.elapsed())
        reserve = 0.0
        if rate:
            reserve = min(self.MAX_RESERVE * self.budget, self.SAFETY * self.final_eval_bytes / rate + self.SAVE_SECONDS)
        return self.elapsed() / max(1e-3, self.budget - reserve)


class MetricsLog:
    """One JSON object per line: {"type": "train" | "eval", "step", ...}. On resume, lines logged after the
    checkpoint's step are dropped, so the log of a resumed run equals the log of an uninterrupted one."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        lines = []
        if resume_step is not None and path.exists():
            lines = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= resume_step]
        atomic_write_text(path, "".join(l + "\n" for l in lines))
        self.file = open(path, "a")

    def write(self, record: dict):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


class Run:
    """Everything one stage of train.py does besides training: use as `with Run(...) as run:`.

    Under torchrun every rank runs the loop on its share of each batch; `progress` makes the ranks agree on
    the clock and on a pending signal (the largest value wins), so they stop at the same step. Rank 0 alone
    writes the checkpoint, the metrics log and the figure."""

    def __init__(self, name: str, ckpt_path: Path, saved: dict, steps: int, time_budget: float | None,
                 bytes_per_step: int, final_eval_bytes: int, log_interval: int, stop_at: int | None,
                 resume: dict | None, bytes_per_unit: float = 1.0):
        # bytes_per_unit: bytes one loss term predicts (1, or a token model's average bytes per token), so
        # that the logged training bpb is per byte for every model
        self.name, self.ckpt_path, self.saved, self.resume_from = name, ckpt_path, saved, resume
        self.bytes_per_unit = bytes_per_unit
        self.steps, self.time_budget = (resume["steps"], resume["time_budget"]) if resume else (steps, time_budget)
        self.bytes_per_step, self.final_eval_bytes = bytes_per_step, final_eval_bytes
        self.log_interval, self.stop_at = log_interval, stop_at
        self.metrics, self.signum = (resume["metrics"] if resume else {}), 0

    def __enter__(self):
        return self

    def start(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """Load the checkpoint being continued (weights, optimizer, random state); start the clock, the log,
        the signal handler and the progress bar. Returns the first step to take."""
        from tqdm import tqdm
        self.model, self.optimizer = model, optimizer
        r = self.resume_from
        step = 0
        if r is not None:
            model.load_state_dict(r["model"])
            optimizer.load_state_dict(r["optimizer"])
            set_rng_state(r["rng"])
            step = r["step"]
        self.clock = Clock(self.steps, self.time_budget, r["elapsed"] if r else 0.0, self.bytes_per_step,
                           self.final_eval_bytes)
        self.log = MetricsLog(self.ckpt_path.with_suffix(".jsonl"), step if r else None) if DIST.main else None
        self.stop = StopSignal()
        self.logged_step, self.logged_time = step, self.clock.elapsed()  # for bytes/s between log lines
        self.bar = tqdm(total=None if self.time_budget else self.steps, initial=step, desc=self.name, unit="step",
                        dynamic_ncols=True, mininterval=1.0, disable=not DIST.main)
        return step

    def progress(self, step: int) -> float:
        """Fraction of the stage done, the same on every rank (which also agree on a pending stop signal)."""
        p, signum = DIST.max([self.clock.progress(step), float(self.stop.signum)])
        self.signum = int(signum)
        return p

    def write(self, record: dict):
        if self.log:
            self.log.write(record)

    def log_train(self, step: int, loss_sum: torch.Tensor, lr: float, last: bool):
        """Every log_interval steps: the mean loss over the global batch; stop on a non-finite loss."""
        self.bar.update(1)
        if step % self.log_interval and not last:
            return
        now = self.clock.elapsed()
        rate = (step - self.logged_step) * self.bytes_per_step / max(1e-9, now - self.logged_time)
        self.logged_step, self.logged_time = step, now
        loss = DIST.sum([loss_sum.item()])[0] / DIST.world
        bpb = loss / math.log(2) / self.bytes_per_unit
        if not math.isfinite(loss):
            raise TrainingError(f"{self.name}: loss became {loss} at step {step}; the last good checkpoint "
                                f"{self.ckpt_path} was kept (try a lower --lr)")
        self.write({"type": "train", "step": step, "bytes": step * self.bytes_per_step, "time": self.clock.elapsed(),
                    "lr": lr, "loss": loss, "bpb": bpb, "bytes_per_s": rate})
        self.bar.set_postfix(loss=f"{loss:.3f}", bpb=f"{bpb:.3f}", bytes_s=f"{rate:,.0f}", refresh=False)

    def evaluate(self, step: int, evaluate, max_bytes: int | None) -> dict:
        """metrics = evaluate(max_bytes), timed (for the clock's reserve) and logged."""
        t0 = time.time()
        self.metrics = {"type": "eval", "step": step, "bytes": step * self.bytes_per_step, **evaluate(max_bytes)}
        self.clock.eval_rate = self.metrics["val_bytes"] / max(1e-3, time.time() - t0)
        self.metrics["time"] = self.clock.elapsed()
        self.write(self.metrics)
        self.bar.set_postfix(val_bpb=f"{self.metrics['val_bpb']:.3f}", refresh=False)
        return self.metrics

    def save(self, step: int, done: bool):
        """Atomic checkpoint of everything needed to continue (or, when done, to use) the model."""
        if DIST.main:
            atomic_save({"format": FORMAT, **self.saved, "model": self.model.state_dict(),
                         "optimizer": self.optimizer.state_dict(), "step": step, "steps": self.steps, "done": done,
                         "rng": rng_state(), "data": {"seed": self.saved["train"]["seed"], "batches": step},
                         "elapsed": self.clock.elapsed(), "time_budget": self.time_budget, "metrics": self.metrics},
                        self.ckpt_path)
        DIST.barrier()  # no rank leaves (or reads the file) before it is complete

    def stop_if_asked(self, step: int, last: bool):
        """A signal or --stop-at: save a checkpoint and raise Interrupted (the caller's exit code)."""
        if last or not (self.signum or step == self.stop_at):
            return
        self.save(step, done=False)
        why = signal.Signals(self.signum).name if self.signum else f"--stop-at {self.stop_at}"
        raise Interrupted(f"{self.name}: stopped by {why} at step {step}; checkpoint saved to {self.ckpt_path}; "
                          f"continue with --resume", self.signum)

    def finish(self, step: int, evaluate) -> dict:
        """The final evaluation over final_eval_bytes, then the finished checkpoint. Returns the metrics."""
        self.bar.close()
        t0 = time.time()
        self.metrics = {"type": "eval", "step": step, "bytes": step * self.bytes_per_step,
                        **evaluate(self.final_eval_bytes)}
        self.metrics.update(time=self.clock.elapsed(), steps=step, stage_seconds=self.clock.elapsed(),
                            eval_seconds=time.time() - t0)
        self.write(self.metrics)
        self.save(step, done=True)
        return self.metrics

    def __exit__(self, exc_type, exc, tb):
        if hasattr(self, "stop"):
            self.stop.restore()
            self.bar.close()
            if self.log:
                self.log.close()
                if exc_type is None or exc_type is Interrupted:
                    plot_curves([self.log.path], self.ckpt_path.with_suffix(".png"), self.name)
        return False

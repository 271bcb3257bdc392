"""The machinery around train.py's training loop, so that the loop itself reads as the recipe.

    Distributed   torchrun's processes: process group, DDP wrapping, each rank's share of a batch, reductions
    StopSignal    Ctrl-C and SIGTERM for the whole command (STOP): stop at once, or save first where work is unsaved
    Run           one training stage's bookkeeping: resume, the clock (steps or a time budget), stop signals,
                  the metrics log, checkpoints, the progress bar and the curves
    report        the one line on stderr, and the exit code, for whatever ended the command
    start_or_resume   whether a stage starts fresh, continues its checkpoint, or refuses to touch it
    FolderLock        one run at a time in an output folder
    finished_entropy_model   stage 1's checkpoint, for stages 2 and 3
    autocast, to_device   the compute dtype and host-to-device copies
    default_dtype         bf16 where this device multiplies bf16 natively, else fp16 on a GPU, fp32 on a CPU
    full_fp32             fp32 matmuls without TF32, for the entropy model's patching pass
    compiled_graphs       how many graphs torch.compile has compiled (a recompile adds one)

Each of these is one line inside the loop. Nothing here changes what is computed: a run with the same flags
takes the same steps on the same batches whether it ran in one piece, was stopped by Ctrl-C and resumed, or
ran over several processes.
"""
import fcntl
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext, suppress
from pathlib import Path

import torch
import torch.distributed as dist

from checkpoint import (FORMAT, CheckpointError, StorageError, atomic_save, atomic_write_text, config_difference,
                        os_reason, read_training_checkpoint, restore, rng_state)
from data import DataError
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


def native_bf16(device: torch.device, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this device multiplies bf16 matrices in hardware. On a CPU without bf16 instructions (AVX2
    only, or AVX-512 without AVX512_BF16) oneDNN emulates them: measured 1.5 GFLOP/s against 45 GFLOP/s in
    fp32 on one such 2-core machine, so bf16 autocast there slows every model down many times."""
    if device.type == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch before 2.5 has no including_emulation and counts only native support
            return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open(cpuinfo) as f:
            flags = {word for line in f if line.startswith(("flags", "Features")) for word in line.split()}
    except OSError:  # not Linux: oneDNN's own answer (it may still emulate bf16 on AVX-512 without BF16)
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & flags)  # x86 (AVX512_BF16, AMX), Arm (BF16)


def default_dtype(device: torch.device) -> str:
    """The autocast dtype when --dtype is not given: bf16 where it is native; else fp16 on a GPU (T4, V100: fp16
    tensor cores, with a gradient scaler) and fp32 on a CPU."""
    return "bf16" if native_bf16(device) else "fp16" if device.type == "cuda" else "fp32"


def check_dtype(dtype: str, device: torch.device):
    """bf16 on a GPU that only emulates it is refused: the efficient attention kernels refuse emulated bf16, and
    the fallback builds about 1 GiB of scores per local attention call."""
    if dtype == "bf16" and device.type == "cuda" and not native_bf16(device):
        raise UsageError(f"--dtype bf16: {torch.cuda.get_device_name(device)} has no native bf16; use --dtype fp16 "
                         f"(with a gradient scaler) or --dtype fp32")


def autocast(device: torch.device, dtype: str):
    """bf16 or fp16: matmuls in that dtype under autocast (weights, optimizer and losses stay fp32; fp16 also
    needs a gradient scaler, train.train_loop); fp32: nothing."""
    if dtype in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)
    return nullcontext()


class full_fp32:
    """with full_fp32(): fp32 matmuls in full precision (TF32 off) inside, as they are on a CPU. train.py turns
    TF32 on for speed; the entropy model's patching pass runs without it in training, calibration, evaluation
    and sampling alike, so that a byte whose entropy is within rounding of the threshold gets the same
    boundary everywhere."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        return self

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved
        return False


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch onto the device (on the CPU, .to returns x itself)."""
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled so far in this process, whatever the backend: a recompile adds one."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


# ---------------------------------------------------------------------------------------------------------
# The whole command: stop signals, and one line on stderr for whatever ends it
# ---------------------------------------------------------------------------------------------------------

class StopSignal:
    """SIGINT (Ctrl-C) and SIGTERM, for the whole command: `with STOP:` installs the handler; the exit code is
    128 + the signal's number.

    While a stage holds work that no checkpoint has yet (its steps and its checkpoint writes: `defer` is True),
    the first signal only sets `signum`: the loop finishes the step, saves a checkpoint and stops. Anywhere
    else (loading, calibrating, the final evaluation, which starts from a checkpoint, drawing figures) and on a
    second signal, it raises KeyboardInterrupt at once. Either way the last checkpoint written stays intact."""

    def __init__(self):
        self.signum, self.defer, self.previous = 0, False, {}

    def __enter__(self):
        self.signum, self.defer = 0, False
        if threading.current_thread() is threading.main_thread():  # Python lets only the main thread set handlers
            self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        first = not self.signum
        self.signum = self.signum or signum
        if not (first and self.defer):
            raise KeyboardInterrupt

    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGINT).name

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous, self.defer = {}, False
        return False


STOP = StopSignal()


def report(e: BaseException) -> int:
    """The exit code for what ended the command, after one line on stderr. Errors a user can cause (flags,
    files, data, a full disk, memory) are named in one line; anything else is a bug and keeps its traceback."""
    if isinstance(e, Interrupted):
        message, code = str(e), e.exit_code
    elif isinstance(e, KeyboardInterrupt):
        message = f"stopped by {STOP.name()}; every checkpoint written so far is intact: continue with --resume"
        code = 128 + (STOP.signum or signal.SIGINT)
    elif isinstance(e, BrokenPipeError):  # `train.py | head`: the reader left; nothing to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    elif isinstance(e, (UsageError, TrainingError, DataError, CheckpointError, StorageError)):
        message, code = f"error: {e}", 1
    elif isinstance(e, OSError):
        message, code = f"error: {e.filename or 'a file'}: {os_reason(e)}", 1
    elif isinstance(e, MemoryError) or "can't allocate memory" in str(e) or isinstance(e, torch.OutOfMemoryError):
        message, code = f"error: out of memory ({str(e).splitlines()[0][:120]}); try a smaller --batch-size, " \
                        f"--micro-batch-size or model", 1
    else:
        raise e
    if message.startswith("error") and not DIST.main:
        message = f"error (rank {DIST.rank}):" + message[len("error:"):]
    if DIST.main or message.startswith("error"):
        print(message, file=sys.stderr)
    return code


class FolderLock:
    """One run at a time in an output folder: `with FolderLock(folder):` holds an exclusive flock on
    folder/.lock, whose text, "pid command", names the holder in the message a second run gets. The operating
    system drops the lock when its process ends, however it ends (a SIGKILL included), so a killed run never
    blocks the next one. Re-entrant within a process (a tool that runs train.main in-process). Under torchrun
    rank 0 takes it and every rank learns whether it got it, so all ranks go on or all stop."""
    NAME = ".lock"
    held: dict = {}  # resolved folder -> [file descriptor, depth], in this process

    def __init__(self, folder: Path):
        self.folder, self.key = Path(folder), Path(folder).resolve()

    def __enter__(self):
        refused = ""
        if DIST.main and self.key in self.held:
            self.held[self.key][1] += 1
        elif DIST.main:
            try:
                refused = self._take()
            except StorageError as e:  # told on every rank below, rather than leaving the others waiting
                refused = str(e)
        if int(DIST.max([float(bool(refused))])[0]):
            raise UsageError(refused or f"{self.folder} is held by another run (rank 0 says which)")
        return self

    def _take(self) -> str:
        """Take the lock, or return why not (one line naming the folder and the holder)."""
        path = self.folder / self.NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StorageError(f"cannot write in the output folder {self.folder}: {os_reason(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another process holds it: "pid command" is in the file
            pid, _, command = os.read(fd, 300).decode(errors="replace").strip().partition(" ")
            os.close(fd)
            return (f"{self.folder} is in use by process {pid or 'unknown'}" + (f" ({command})" if command else "")
                    + ": one run per output folder; wait for it to end, or use --out DIR")
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {command[:200]}\n".encode())
        self.held[self.key] = [fd, 1]
        return ""

    def __exit__(self, *exc):
        entry = self.held.get(self.key) if DIST.main else None
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                del self.held[self.key]
                os.close(entry[0])  # releases the flock; the file stays (deleting it would race a new holder)
        return False


def same_corpus(a: dict, b: dict) -> bool:
    """Two data.ByteCorpus.record()s of the same bytes (the name may differ: a file moved or renamed)."""
    return all(a.get(k) == b.get(k) for k in ("train_bytes", "val_bytes", "sha256"))


def describe_corpus(record: dict) -> str:
    return f"{record.get('name')} ({record.get('train_bytes', 0) + record.get('val_bytes', 0):,} bytes, " \
           f"sha256 {str(record.get('sha256'))[:12]})"


def start_or_resume(ckpt_path: Path, saved: dict, steps: int, budget, opts) -> dict | None:
    """None to start fresh; the checkpoint to continue (or to skip, if done). Refuses to overwrite a
    checkpoint without --resume or --overwrite, and refuses one written with another config, tokenizer or
    step count, or on another corpus unless opts.new_corpus (checkpoints from before the corpus record
    resume as they are)."""
    if not ckpt_path.exists() or opts.overwrite:
        return None
    if not opts.resume:
        raise UsageError(f"{ckpt_path} already exists: pass --resume to continue it, --overwrite to start over, "
                         f"or --out DIR to write elsewhere")
    ckpt = read_training_checkpoint(ckpt_path)
    if ckpt["kind"] != saved["kind"]:
        raise CheckpointError(f"{ckpt_path} holds a {ckpt['kind']} model, not a {saved['kind']} model")
    old, new = ckpt.get("corpus"), saved.get("corpus")
    if isinstance(old, dict) and new is not None and not same_corpus(old, new) and not getattr(opts, "new_corpus", False):
        raise UsageError(f"{ckpt_path} was trained on {describe_corpus(old)}, not on --data {describe_corpus(new)}: "
                         f"resume with the same --data, or pass --new-corpus to continue on this one")
    diff = next(filter(None, (config_difference(ckpt.get(k, {}), saved[k]) for k in ("config", "train", "tokens")
                              if k in saved)), None)  # "tokens" holds the tokenizer's digest, not its JSON
    if not diff and budget is None and ckpt["time_budget"] is None and ckpt["steps"] != steps:
        diff = f"steps: {ckpt['steps']} in the checkpoint, {steps} now"
    if diff:
        raise CheckpointError(f"{ckpt_path} was written with another config ({diff}); rerun with the same "
                              f"flags, or drop --resume and use --out DIR")
    return ckpt


def finished_entropy_model(out: Path, entropy_cfg) -> dict:
    """The finished entropy model in OUT/entropy.pt, checked against this run's ByteLMConfig (stages 2 and 3)."""
    ckpt = read_training_checkpoint(out / "entropy.pt")
    diff = config_difference(ckpt["config"], entropy_cfg.to_dict())
    if ckpt["kind"] != "entropy" or diff:
        raise CheckpointError(f"{out / 'entropy.pt'} does not match this config's entropy model ({diff}); "
                              f"retrain it with --stage entropy --overwrite")
    if not ckpt.get("done"):
        raise UsageError(f"the entropy model in {out / 'entropy.pt'} is not finished: continue it with --resume")
    return ckpt


def draw_curves(jsonl_paths: list[Path], png: Path, title: str):
    """plot_curves, but a figure that cannot be written is a warning: the logs hold the numbers."""
    try:
        plot_curves(jsonl_paths, png, title)
    except (OSError, RuntimeError, ValueError) as e:
        print(f"warning: cannot write {png}: {os_reason(e)}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------
# One training stage's bookkeeping
# ---------------------------------------------------------------------------------------------------------

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

    excluded = 0.0  # seconds left out of every clock in this process (compiling), for train.py's whole budget

    def __init__(self, steps: int, budget: float | None, elapsed: float, bytes_per_step: int, final_eval_bytes: int):
        self.steps, self.budget, self.bytes_per_step, self.final_eval_bytes = steps, budget, bytes_per_step, final_eval_bytes
        self.start = time.time() - elapsed
        self.eval_rate = None  # validation bytes per second, once measured

    def elapsed(self) -> float:
        return time.time() - self.start

    def exclude(self, seconds: float):
        """Leave seconds (torch.compile's first compile) out of the stage's clock and of the whole budget."""
        self.start += seconds
        Clock.excluded += seconds

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


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a line torn by a crash
        return math.inf


class MetricsLog:
    """One JSON object per line: {"type": "train" | "eval", "step", ...}. Each checkpoint notes how many records
    it covers; on resume the log is cut back to them, so the log of a resumed run equals that of an
    uninterrupted one."""

    def __init__(self, path: Path, keep: int | None, resume_step: int | None):
        self.path = path
        lines = []
        if (keep or resume_step is not None) and path.exists():
            try:
                lines = path.read_text().splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise StorageError(f"cannot read {path}: {os_reason(e)}") from None
            if keep is not None:
                lines = lines[:keep]
            else:  # a checkpoint from before log_records: keep the records up to its step
                lines = [l for l in lines if _step_of(l) <= resume_step]
        self.records = len(lines)
        atomic_write_text(path, "".join(l + "\n" for l in lines))
        try:
            self.file = open(path, "a")
        except OSError as e:
            raise StorageError(f"cannot write {path}: {os_reason(e)}") from None

    def write(self, record: dict):
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:
            raise StorageError(f"cannot write {self.path}: {os_reason(e)}") from None
        self.records += 1

    def close(self):
        with suppress(OSError):
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
        self.saved_step = resume["step"] if resume else None  # the step of the checkpoint on disk
        self.log = self.bar = None

    def __enter__(self):
        return self

    def start(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler=None, compiling: bool = False) -> int:
        """Load the checkpoint being continued (weights, optimizer, gradient scaler, random state); start the
        clock, the log and the progress bar; from here a signal waits for the end of the step. Returns the first
        step. compiling: the first step compiles the model, and its time is left out of the clock."""
        from tqdm import tqdm
        self.model, self.optimizer, self.scaler, self.compiling = model, optimizer, scaler, compiling
        r = self.resume_from
        step = 0
        if r is not None:
            restore(r, self.ckpt_path, model, optimizer, scaler)
            step = r["step"]
        self.clock = Clock(self.steps, self.time_budget, r["elapsed"] if r else 0.0, self.bytes_per_step,
                           self.final_eval_bytes)
        if DIST.main:
            self.log = MetricsLog(self.ckpt_path.with_suffix(".jsonl"), r.get("log_records") if r else None,
                                  step if r else None)
        old, new = (r or {}).get("corpus"), self.saved.get("corpus")
        if isinstance(old, dict) and new is not None and not same_corpus(old, new):  # --new-corpus: say so, and log it
            DIST.say(f"{self.name}: continuing at step {step} on {describe_corpus(new)}, trained so far on "
                     f"{describe_corpus(old)}")
            self.write({"type": "corpus", "step": step, "from": old, "to": new})
        self.logged_step, self.logged_time = step, self.clock.elapsed()  # for bytes/s between log lines
        self.first_step = step
        # On a terminal only (disable=None): in a pipe or a log file the bar would bury the messages.
        self.bar = tqdm(total=None if self.time_budget else self.steps, initial=step, desc=self.name, unit="step",
                        dynamic_ncols=True, mininterval=1.0, disable=None if DIST.main else True)
        STOP.defer = True
        return step

    def warmup_share(self, warmup_steps: int) -> float | None:
        """Under a time budget, the share of it the warmup may take: as planned in steps (train.lr_at)."""
        return min(1.0, warmup_steps / self.steps) if self.time_budget else None

    def agreed_signal(self) -> int:
        """A pending stop signal, the same on every rank."""
        self.signum = int(DIST.max([float(STOP.signum)])[0])
        return self.signum

    def progress(self, step: int) -> float:
        """Fraction of the stage done, the same on every rank (which also agree on a pending stop signal)."""
        p, signum = DIST.max([self.clock.progress(step), float(STOP.signum)])
        self.signum = int(signum)
        return p

    def write(self, record: dict):
        if self.log:
            self.log.write(record)

    def log_train(self, step: int, loss_sum: torch.Tensor, lr: float, last: bool, extra=None):
        """Every log_interval steps: the mean loss over the global batch; stop on a non-finite loss. extra():
        more fields for the record (learned boundaries: bytes per chunk and the ratio loss), called when logging.
        After the first step of a compiled model: its time, which is mostly compiling, leaves the clock (one
        line says it)."""
        self.bar.update(1)
        if self.compiling and step == self.logged_step + 1 and self.logged_step == self.first_step:
            seconds = self.clock.elapsed() - self.logged_time
            self.clock.exclude(seconds)
            self.logged_time = self.clock.elapsed()
            self.graphs = compiled_graphs()
            DIST.say(f"{self.name}: compiling took {seconds:.0f} s (the first step, left out of the clock"
                     f"{' and of --time-budget' if self.time_budget else ''}); {self.graphs} graph(s)")
        if step % self.log_interval and not last:
            return
        more = extra() if extra is not None else {}
        now = self.clock.elapsed()
        rate = (step - self.logged_step) * self.bytes_per_step / max(1e-9, now - self.logged_time)
        self.logged_step, self.logged_time = step, now
        loss = DIST.sum([loss_sum.item()])[0] / DIST.world
        bpb = loss / math.log(2) / self.bytes_per_unit
        if not math.isfinite(loss):
            raise TrainingError(f"{self.name}: loss became {loss} at step {step}; the last good checkpoint "
                                f"{self.ckpt_path} was kept (try a lower --lr)")
        self.write({"type": "train", "step": step, "bytes": step * self.bytes_per_step, "time": self.clock.elapsed(),
                    "lr": lr, "loss": loss, "bpb": bpb, "bytes_per_s": rate, **more,
                    **({"graphs": compiled_graphs()} if self.compiling else {})})
        self.bar.set_postfix(loss=f"{loss:.3f}", bpb=f"{bpb:.3f}", bytes_s=f"{rate:,.0f}",
                             **{k: f"{v:.3f}" for k, v in more.items()}, refresh=False)

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
                         "elapsed": self.clock.elapsed(), "time_budget": self.time_budget, "metrics": self.metrics,
                         "log_records": self.log.records,
                         **({"scaler": self.scaler.state_dict()} if self.scaler and self.scaler.is_enabled() else {})},
                        self.ckpt_path)
        DIST.barrier()  # no rank leaves (or reads the file) before it is complete
        self.saved_step = step

    def stop_if_asked(self, step: int, last: bool = False):
        """A signal or --stop-at: save a checkpoint (unless this step's is on disk) and raise Interrupted."""
        if last or not (self.signum or step == self.stop_at):
            return
        if self.saved_step != step:
            self.save(step, done=False)
        why = signal.Signals(self.signum).name if self.signum else f"--stop-at {self.stop_at}"
        raise Interrupted(f"{self.name}: stopped by {why} at step {step}; checkpoint saved to {self.ckpt_path}; "
                          f"continue with --resume", self.signum)

    def finish(self, step: int, evaluate) -> dict:
        """The final evaluation over final_eval_bytes, the figure, then the finished checkpoint. The evaluation
        starts from a checkpoint of the last step, so a signal during it (or the figure) stops at once and
        --resume only repeats the evaluation. Returns the metrics."""
        self.bar.close()
        if self.saved_step != step:
            self.save(step, done=False)
        if self.agreed_signal():
            self.stop_if_asked(step)
        STOP.defer = False
        t0 = time.time()
        self.metrics = {"type": "eval", "step": step, "bytes": step * self.bytes_per_step,
                        **evaluate(self.final_eval_bytes)}
        self.metrics.update(time=self.clock.elapsed(), steps=step, stage_seconds=self.clock.elapsed(),
                            eval_seconds=time.time() - t0)
        self.write(self.metrics)
        if self.log:
            draw_curves([self.log.path], self.ckpt_path.with_suffix(".png"), self.name)
        STOP.defer = True
        self.save(step, done=True)
        if self.agreed_signal():
            raise Interrupted(f"{self.name}: finished and saved to {self.ckpt_path}, then stopped by "
                              f"{signal.Signals(self.signum).name}; continue with --resume", self.signum)
        return self.metrics

    def __exit__(self, exc_type, exc, tb):
        STOP.defer = False
        if self.bar is not None:
            self.bar.close()
        if self.log:
            self.log.close()
            if exc_type is Interrupted:  # the curves so far
                draw_curves([self.log.path], self.ckpt_path.with_suffix(".png"), self.name)
        return False

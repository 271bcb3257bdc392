"""Train the Byte Latent Transformer end to end: entropy model -> threshold -> BLT (paper sections 2-4).

    python train.py                          # all three stages on the default corpus (shakespeare; enwik8 on a GPU)
    python train.py --stage entropy          # 1. the entropy model (paper 2.3)           -> OUT/entropy.pt
    python train.py --stage calibrate        # 2. the threshold for the target patch size  -> OUT/calibration.json
    python train.py --stage blt              # 3. BLT with the frozen entropy model         -> OUT/blt_entropy.pt
    python train.py --patching space         # BLT baselines: strided | space | entropy | monotonic
    python train.py --patching learned       # boundaries learned end to end (H-Net), --patch-size bytes per chunk
    python train.py --model byte             # a plain byte-level transformer               -> OUT/byte.pt
    python train.py --model byte --hash-ngrams   # ... with BLT's hash n-gram embeddings (a control) -> OUT/byte.pt
    python train.py --no-hash                # BLT without hash n-gram embeddings (a control)
    python train.py --model bpe              # a BPE-token transformer (tokens.py)           -> OUT/bpe.pt
    python train.py --data tinyshakespeare --time-budget 300   # a small corpus under a budget: the small preset
    python train.py --preset smoke           # every stage in under a minute on 2 cores, for trying flags
    torchrun --standalone --nproc_per_node=N train.py ...   # N processes share each global batch (DDP)

Stage 1 trains the small causal byte LM of entropy_model.py. Stage 2 runs it, frozen, over windows of the
training split and bisects the entropy threshold until the average patch size is the target
(patching.calibrate_threshold). Stage 3 trains BLT: each batch is patched by the frozen entropy model, in
fp32 as at calibration and generation, then encoder -> global transformer -> decoder predict every next byte.

The recipe (paper section 4): AdamW (0.9, 0.95), eps 1e-8, weight decay on matrices, linear warmup then
cosine decay to 10% of the peak learning rate, gradient clipping at 1.0. It is `train_loop` below; what
surrounds it (processes, signals, the time budget, checkpoints, the metrics log) lives in runtime.py and
checkpoint.py. Under --time-budget the cosine follows the clock (progress = time spent / time available).

Evaluation: bits per byte over the whole validation split in fixed windows (data.eval_windows), so every
model and patching scheme predicts exactly the same bytes; with it the average patch size and FLOPs per byte
(blt.flops_per_byte, paper section 4.5). Shapes: B = batch, T = bytes per window (BOS included), V = 260.
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# On a small machine shared with other work, OpenMP threads that spin while they wait make torch several
# times slower as soon as another process wants a core (measured: 2.6 s vs 22 s per step with one busy
# core); waiting passively costs little on an idle machine. OpenMP reads this when torch loads it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from blt import LEARNED, BLTConfig, build_model, count_parameters, cpu_tiny, one_gpu  # noqa: E402
from checkpoint import atomic_write_text, load_weights, output_folder, read_calibration  # noqa: E402
from data import get_batch, load_corpus  # noqa: E402
from evaluation import evaluate  # noqa: E402
from entropy_model import ByteLMConfig  # noqa: E402
from patching import average_patch_size, calibrate_threshold, patch_lengths  # noqa: E402
from tokens import TokenLMConfig, get_token_batch, prepare_tokens  # noqa: E402
from options import check_batches, check_stop_at, model_configs, parse_args, pick_device  # noqa: E402
from runtime import (DIST, STOP, Clock, FolderLock, Run, UsageError, autocast, check_dtype, default_dtype,  # noqa: E402
                     draw_curves, finished_entropy_model, full_fp32, report, start_or_resume, to_device)

# ---------------------------------------------------------------------------------------------------------
# Defaults, in one place: the cpu preset; the others list what they change. Flags override single values.
# ---------------------------------------------------------------------------------------------------------
CPU = dict(
    blt=cpu_tiny(),  # ~3M parameters outside the hash tables
    byte=ByteLMConfig(dim=256, layers=4, heads=4, window=None, multiple_of=32),  # the byte-level baseline
    bpe=TokenLMConfig(vocab_size=4096, dim=256, layers=4, heads=4, multiple_of=32),  # ~3 bytes per token
    entropy_train=dict(seq_len=256, batch_size=32, lr=3e-3, warmup_steps=50),
    train=dict(seq_len=256, batch_size=32, lr=2e-3, warmup_steps=100),
    entropy_steps=400, steps=600,  # BLT ~1 s/step on 2 cores: 600 x 8 KiB = one epoch of the default corpus
    entropy_time_share=0.15,  # under --time-budget, the entropy model's share of the whole budget
    eval_interval=100, eval_bytes=65536, final_eval_bytes=0, log_interval=10, calibration_windows=256, compile=False,
    data="shakespeare",  # the corpus without --data
)  # final_eval_bytes 0: the whole validation split
PRESETS = {
    "cpu": CPU,  # 2 CPU cores: the whole pipeline in about 10 minutes
    "gpu": {**CPU, **dict(  # one GPU, about an hour on enwik8, its default corpus (~1e17 FLOPs: estimated, not measured)
        blt=one_gpu(), byte=ByteLMConfig(dim=768, layers=12, heads=12, window=None, multiple_of=256),
        bpe=TokenLMConfig(vocab_size=4096, dim=768, layers=12, heads=12),
        entropy_train=dict(seq_len=1024, batch_size=64, lr=1e-3, warmup_steps=300),
        train=dict(seq_len=1024, batch_size=64, lr=4e-4, warmup_steps=500),
        # 5,000 x 64 KiB = 3.6 passes over enwik8's 90 MB: more and the 154M hash-table parameters memorise it
        entropy_steps=4000, steps=5000, entropy_time_share=0.1, data="enwik8",
        eval_interval=500, eval_bytes=1 << 20, log_interval=50, compile=True)},
    "smoke": {**CPU, **dict(  # every stage in well under a minute on 2 cores: for trying flags, and for tests
        blt=cpu_tiny(entropy_dim=32, entropy_layers=1, entropy_window=32, local_dim=64, local_heads=2, decoder_layers=1,
                     local_window=64, hash_buckets=512, global_dim=128, global_layers=2, global_heads=2),
        byte=ByteLMConfig(dim=64, layers=2, heads=2, window=None, multiple_of=32),
        entropy_train=dict(seq_len=64, batch_size=8, lr=3e-3, warmup_steps=5),
        train=dict(seq_len=64, batch_size=8, lr=3e-3, warmup_steps=5), entropy_steps=20, steps=20,
        eval_interval=10, eval_bytes=2048, final_eval_bytes=8192, log_interval=5, calibration_windows=32)},
    "small": {**CPU, **dict(  # a small corpus under a time budget: the best 300 s settings found for BLT on tiny
        #                     Shakespeare; the baselines train with the same settings (tools/race.py has the controls)
        blt=cpu_tiny(patching="space", hash_ngram_sizes=(3, 4, 5)),  # no entropy model to train; fewer hashes
        train=dict(seq_len=128, batch_size=16, lr=3e-3, warmup_steps=30, weight_decay=0.5),  # wd: hashes memorise
        steps=900)},  # ~300 s on 2 cores (under --time-budget no run evaluates along the way: see settings)
}
# The default preset: gpu with CUDA, else cpu; but any model under --time-budget on a training split under 16 MB
# gets the small preset (docs/training.md, "Five minutes on tiny Shakespeare"). --preset cpu keeps cpu.
SMALL_CORPUS_BYTES = 16 << 20
MAX_PASSES = 4  # more passes over the training split than this, and the start line warns: a model that memorises
NEVER = 10 ** 9  # an evaluation interval no run reaches
MIN_SPACE_PATCH = 3.5  # the small preset's space patching, on text it cuts finer than this, becomes strided (size 4)


@dataclass
class TrainConfig:
    """Settings a resumed run must share with the original (the step count is planned, so it lives apart)."""
    seq_len: int = 256  # T: bytes per window; a batch predicts batch_size * seq_len bytes
    batch_size: int = 32  # B: windows per optimizer step, over all processes
    lr: float = 4e-4  # peak learning rate (paper: 4e-4 at 1B scale)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 2000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    dtype: str = "bf16"  # autocast dtype for matmuls: bf16 | fp16 | fp32 (train.py: runtime.default_dtype without --dtype)
    seed: int = 0
    # learned boundaries (learned.py): the outer stage (encoder, router, decoder) trains at lr x this, the global
    # transformer at lr (H-Net's per-stage learning-rate multiplier; None: 1, one rate for all)
    outer_lr_multiplier: float | None = None


# ---------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------

def lr_at(step: int, tc: TrainConfig, progress: float, warmup_share: float | None = None) -> float:
    """Linear warmup over the first warmup_steps, times a cosine from lr down to lr * min_lr_ratio as
    progress goes from 0 to 1 (progress = step / steps, or the fraction of the time budget spent).

    Under a time budget the warmup follows the clock as well: it also ends once warmup_share of the budget
    is spent (the planned warmup_steps / steps), so that a slow machine, which takes fewer steps in the
    same time, does not spend most of them warming up."""
    warmup = min(1.0, (step + 1) / max(1, tc.warmup_steps))
    if warmup_share:
        warmup = max(warmup, min(1.0, progress / warmup_share))
    cosine = tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return tc.lr * warmup * cosine


def make_optimizer(model: torch.nn.Module, tc: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (linear and embedding weights), none on norm gains. Frozen parameters
    (BLT's entropy model) are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if tc.outer_lr_multiplier is not None and hasattr(model, "outer_parameters"):
        groups = outer_stage_groups(groups, model.outer_parameters(), tc.outer_lr_multiplier)
    # fused: one kernel for all parameters instead of a loop over them (on CPU too: 2.2 ms against 13.3 ms for
    # 4.1M parameters, measured on a 2-core machine)
    optimizer = torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.adam_eps,
                                  fused=device.type in ("cuda", "cpu"))
    if any("lr_scale" in g for g in groups):
        optimizer.register_step_pre_hook(scale_learning_rates)
    return optimizer


def outer_stage_groups(groups: list[dict], outer, multiplier: float) -> list[dict]:
    """Each group split in two, the outer stage's parameters with lr_scale = multiplier, the rest with 1."""
    outer = {id(p) for p in outer}
    split = []
    for group in groups:
        for scale, keep in ((1.0, lambda p: id(p) not in outer), (multiplier, lambda p: id(p) in outer)):
            split.append({**group, "params": [p for p in group["params"] if keep(p)], "lr_scale": scale})
    return split


def scale_learning_rates(optimizer, args, kwargs):
    """Optimizer step pre-hook: train_loop sets one lr for every group each step; a group's lr_scale (the outer
    stage's multiplier) applies it here, just before the step."""
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * group.get("lr_scale", 1.0)


class Task:
    """One model being trained, and how a batch becomes its loss or its bits per byte. kind: "entropy" (the
    entropy model), "blt", "byte" or "bpe" (the baselines; bpe reads token windows of tokens.TokenSetup)."""

    def __init__(self, kind: str, model: torch.nn.Module, config, tc: TrainConfig, device, compile_model: bool, tokens=None):
        self.kind, self.model, self.config, self.tc, self.device = kind, model.to(device), config, tc, device
        self.compile_model, self.forward, self.tokens = compile_model, self.model, tokens
        # learned boundaries (learned.py): the model cuts its own bytes; the log gets its chunks and ratio loss
        self.learned = kind == "blt" and config.patching == LEARNED
        self.chunk_sums = [0.0, 0.0, 0.0, 0]  # bytes, chunks, ratio loss, forwards since the last log line
        if self.learned and compile_model:
            model.pad_chunks_to = 16  # few distinct chunk counts: few recompiles

    def prepare(self, backend: str = "inductor"):
        """After the weights are loaded: wrap for DDP (several processes), then compile."""
        wrapped = DIST.wrap(self.model)
        self.forward = torch.compile(wrapped, backend=backend) if self.compile_model else wrapped

    def patch(self, x: torch.Tensor) -> torch.Tensor:
        """BLT's patch lengths (B, P) from the frozen fp32 entropy model, outside autocast. Compiled, P changes
        from batch to batch, so it is one dynamic dimension: one graph serves every P (no recompiles). Rows are
        right-padded with empty (invisible) patches to a multiple of 16: P - 1 is never 1, a size torch specializes.
        TF32 off, as at calibration and in sample.py (runtime.full_fp32)."""
        with full_fp32():
            lengths = self.model.patch(x)
        if self.compile_model:
            lengths = F.pad(lengths, (0, -lengths.shape[1] % 16))
            torch._dynamo.mark_dynamic(lengths, 1)
        return lengths

    def batch(self, train, step: int) -> tuple[torch.Tensor, torch.Tensor]:  # this process's rows, (B, T) each
        tc, rows = self.tc, DIST.rows(self.tc.batch_size)
        if self.kind == "bpe":
            return get_token_batch(self.tokens.train, tc.batch_size, self.tokens.seq_len, tc.seed, step, rows)
        return get_batch(train, tc.batch_size, tc.seq_len, tc.seed, step, rows)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean next-byte (next-token) cross-entropy in nats of one (micro-)batch: x, y (B, T)."""
        x, y = to_device(x, self.device), to_device(y, self.device)
        extra = {"patch_lengths": self.patch(x)} if self.kind == "blt" and not self.learned else {}
        with autocast(self.device, self.tc.dtype):
            loss = self.forward(x, y, **extra)[1]
        if self.learned:
            s = self.model.stats
            self.chunk_sums = [self.chunk_sums[0] + s["bytes"], self.chunk_sums[1] + s["chunks"],
                               self.chunk_sums[2] + s["ratio_loss"], self.chunk_sums[3] + 1]
        return loss

    def chunk_log(self) -> dict:
        """Learned boundaries: realised bytes per chunk and mean ratio loss since the last call (for the log)."""
        if not self.learned:
            return {}
        n_bytes, chunks, ratio, n = DIST.sum([float(v) for v in self.chunk_sums])
        self.chunk_sums = [0.0, 0.0, 0.0, 0]
        return {"bytes_per_chunk": n_bytes / max(1.0, chunks), "ratio_loss": ratio / max(1.0, n)}

    def sync_gradients(self, now: bool):
        """DDP: all-reduce gradients only on the last micro-batch of a step."""
        return DIST.no_sync(getattr(self.forward, "_orig_mod", self.forward), now)

    def evaluate(self, val, max_bytes: int | None) -> dict:
        return evaluate(self.model, self.kind, self.config, val, self.tc.seq_len, self.tc.batch_size,
                        self.tc.dtype, self.device, max_bytes, self.tokens)


def train_loop(task: Task, corpus, run: Run, opts) -> dict:
    """The training loop, the same for the entropy model, BLT and both baselines. Returns final metrics.

    lr -> batch -> forward/backward (accumulated over micro-batches) -> clip -> step -> log / evaluate /
    checkpoint. Without a time budget it takes `steps` steps: a resumed run replays an uninterrupted one
    exactly. Each `run.` call is machinery from runtime.py: one line here."""
    model, tc = task.model, task.tc
    optimizer = make_optimizer(model, tc, task.device)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    # fp16: the loss is scaled up before backward so that small gradients do not underflow (a no-op otherwise)
    scaler = torch.amp.GradScaler(task.device.type, enabled=tc.dtype == "fp16")
    step = run.start(model, optimizer, scaler, task.compile_model)  # 0, or the step of the checkpoint being continued
    task.prepare()
    micro_batches = DIST.micro_batches(tc.batch_size, opts.micro_batch_size)  # this process's share
    model.train()
    progress = run.progress(step)
    while progress < 1.0:
        # --- solution: lesson 8: one step: lr, batch, zero_grad, forward/backward, clip, AdamW step (paper §4) ---
        lr = lr_at(step, tc, progress, run.warmup_share(tc.warmup_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = task.batch(corpus.train, step)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for i, part in enumerate(micro_batches):
            with task.sync_gradients(now=i == len(micro_batches) - 1):
                loss = task.loss(x[part], y[part]) / len(micro_batches)
                scaler.scale(loss).backward()
            loss_sum = loss_sum + loss.detach()
        scaler.unscale_(optimizer)  # fp16: the true gradients, before clipping
        torch.nn.utils.clip_grad_norm_(trainable, tc.grad_clip)
        scaler.step(optimizer)  # optimizer.step(); fp16: skipped if a gradient overflowed
        # --- end solution ---
        scaler.update()  # fp16: the next step's loss scale (a no-op otherwise)
        step += 1
        progress = run.progress(step)  # the same on every process, which also agree on a pending Ctrl-C
        last = progress >= 1.0
        run.log_train(step, loss_sum, lr, last, task.chunk_log)
        if step % opts.eval_interval == 0 and not last:
            run.evaluate(step, lambda n: task.evaluate(corpus.val, n), opts.eval_bytes)
            if step % opts.checkpoint_interval == 0:
                run.save(step, done=False)
        run.stop_if_asked(step, last)  # a signal or --stop-at: save, then stop
    return run.finish(step, lambda n: task.evaluate(corpus.val, n))


# ---------------------------------------------------------------------------------------------------------
# The three stages
# ---------------------------------------------------------------------------------------------------------

def train_model(kind: str, name: str, config, make_model, tc: TrainConfig, steps: int, corpus, out: Path,
                time_budget: float | None, opts, describe: str, tokens=None) -> dict:
    """Train (or continue, or skip if finished) one model into OUT/name.pt; print its summary."""
    ckpt_path = out / f"{name}.pt"
    saved = {"kind": kind, "config": config.to_dict(), "train": asdict(tc), "corpus": corpus.record(),
             **(tokens.saved() if tokens else {})}
    resume = start_or_resume(ckpt_path, saved, steps, time_budget, opts)
    if resume is not None and resume["done"]:
        DIST.say(f"{name}: already trained ({resume['step']} steps) in {ckpt_path}, skipping")
        return resume["metrics"]
    torch.manual_seed(tc.seed)  # the same initial weights on every run with this seed
    model = make_model()
    DIST.say(f"{name}: {describe}; parameters {', '.join(f'{k} {v:,}' for k, v in count_parameters(model).items() if v)}; "
             f"{tc.batch_size} x {tc.seq_len} bytes per step" + (f"; resuming at step {resume['step']}" if resume else "")
             + (f"; {DIST.world} processes" if DIST.enabled else ""))
    task = Task(kind, model, config, tc, opts.device, opts.compile, tokens)
    final_bytes = min(len(corpus.val), opts.final_eval_bytes or len(corpus.val))
    bytes_per_step = round(tc.batch_size * (tokens.bytes_per_window if tokens else tc.seq_len))
    with Run(name, ckpt_path, saved, steps, time_budget, bytes_per_step, final_bytes,
             opts.log_interval, opts.stop_at, resume, tokens.train_bytes_per_token if tokens else 1.0) as run:
        m = train_loop(task, corpus, run, opts)
    DIST.say(f"{name}: val {m['val_bpb']:.4f} bpb over {m['val_bytes']:,} bytes"
             + (f" | avg patch {m['patch_size']:.2f} bytes" if "patch_size" in m and not config_learned(config) else "")
            + (f" | {m['patch_size']:.2f} bytes per chunk (learned)" if config_learned(config) else "")
             + (f" | {m['bytes_per_token']:.2f} bytes per token" if "bytes_per_token" in m else "")
             + f" | {m['train_flops_per_byte'] / 1e6:.1f} MFLOP/byte train | {m['steps']} steps in {m['stage_seconds']:.0f} s")
    return m


def config_learned(config) -> bool:
    return getattr(config, "patching", None) == LEARNED


def calibrate(entropy_cfg: ByteLMConfig, blt_cfg: BLTConfig, tc: TrainConfig, corpus, out: Path, opts) -> float:
    """Stage 2: entropies of the frozen entropy model on fixed windows of the TRAIN split -> threshold."""
    ckpt = finished_entropy_model(out, entropy_cfg)
    model = entropy_cfg.build()
    load_weights(model, ckpt["model"], out / "entropy.pt")
    model.to(opts.device).eval()
    # Fixed windows as long as BLT's (a seed stream apart from training batches); entropies in fp32 as in BLT.patch.
    x, _ = get_batch(corpus.train, opts.calibration_windows, tc.seq_len, tc.seed + 1_000_003, 0)
    with full_fp32():
        entropies = torch.cat([model.entropies(to_device(chunk, opts.device)).cpu() for chunk in x.split(64)])
    theta = calibrate_threshold(entropies, blt_cfg.patch_size, monotonic=blt_cfg.patching == "monotonic",
                                max_patch_length=blt_cfg.max_patch_length)
    achieved = average_patch_size(patch_lengths(x, blt_cfg.patching, entropies=entropies, threshold=theta,
                                                max_patch_length=blt_cfg.max_patch_length))
    result = {"scheme": blt_cfg.patching, "target_patch_size": blt_cfg.patch_size, "threshold": theta,
              "patch_size_on_train_sample": achieved, "windows": opts.calibration_windows, "seq_len": tc.seq_len,
              "max_patch_length": blt_cfg.max_patch_length, "entropy_model": entropy_cfg.to_dict(),
              "entropy_model_step": ckpt["step"], "mean_entropy_nats": float(entropies.mean())}
    if DIST.main:  # every process computed the same threshold; one writes it
        atomic_write_text(out / "calibration.json", json.dumps(result, indent=1) + "\n")
    DIST.barrier()
    DIST.say(f"calibrate: {blt_cfg.patching} threshold {theta:.4f} nats gives {achieved:.2f} bytes per patch on "
             f"{opts.calibration_windows} training windows (target {blt_cfg.patch_size})")
    return theta


def load_calibration(out: Path, blt_cfg: BLTConfig, entropy_cfg: ByteLMConfig) -> float:
    path = out / "calibration.json"
    if not path.exists():
        raise UsageError(f"no threshold in {out}: run --stage calibrate first (or --stage all)")
    cal = read_calibration(path)
    if (cal["scheme"] != blt_cfg.patching or cal["target_patch_size"] != blt_cfg.patch_size
            or cal["max_patch_length"] != blt_cfg.max_patch_length or cal["entropy_model"] != entropy_cfg.to_dict()):
        raise UsageError(f"{path} was calibrated for {cal['scheme']} patching at {cal['target_patch_size']} bytes "
                         f"per patch; rerun --stage calibrate for {blt_cfg.patching} at {blt_cfg.patch_size}")
    return cal["threshold"]


def run_stages(args, opts, corpus, out: Path, blt_cfg: BLTConfig, baseline_cfg, tc: TrainConfig,
               entropy_tc: TrainConfig, stages: list[str], preset: dict, budget_left):
    """Stage 1 (entropy model) -> stage 2 (calibration) -> stage 3 (BLT), or one baseline (byte or bpe) alone."""
    entropy_cfg = ByteLMConfig.of_blt(blt_cfg)
    if "entropy" in stages:
        share = preset["entropy_time_share"] if "blt" in stages else 1.0
        budget = None if args.time_budget is None else max(1.0, share * budget_left())
        train_model("entropy", "entropy", entropy_cfg, entropy_cfg.build, entropy_tc,
                    opts.entropy_steps, corpus, out, budget, opts,
                    "entropy model (paper 2.3), a small causal byte LM")
    if "calibrate" in stages:
        calibrate(entropy_cfg, blt_cfg, tc, corpus, out, opts)
    if "blt" in stages:
        entropy_weights = None
        if blt_cfg.patching in ("entropy", "monotonic"):
            blt_cfg.entropy_threshold = load_calibration(out, blt_cfg, entropy_cfg)
            entropy_weights = finished_entropy_model(out, entropy_cfg)["model"]

        def make_blt():
            model = build_model(blt_cfg)  # BLT, or learned.LearnedBLT
            if entropy_weights is not None:
                load_weights(model.entropy_model, entropy_weights, out / "entropy.pt")
            return model
        describe = (f"BLT with {blt_cfg.patching} patching (patch size {blt_cfg.patch_size:g})"
                    if blt_cfg.patching != LEARNED else f"BLT with learned boundaries (H-Net's dynamic chunking, "
                    f"target {blt_cfg.patch_size:g} bytes per chunk)")
        train_model("blt", f"blt_{blt_cfg.patching}", blt_cfg, make_blt, tc, opts.steps, corpus, out, budget_left(),
                    opts, describe)
    if "byte" in stages:
        train_model("byte", "byte", baseline_cfg, baseline_cfg.build, tc, opts.steps, corpus, out, budget_left(), opts,
                    "plain byte-level transformer (no patches)" + (
                        f" with BLT's hash n-gram embeddings (n = {', '.join(map(str, baseline_cfg.hash_ngram_sizes))})"
                        if baseline_cfg.hash_ngram_sizes else ""))
    if "bpe" in stages:  # every process trains (or loads) the same tokenizer: deterministic, written atomically
        tokens = prepare_tokens(corpus.train, baseline_cfg.vocab_size, tc.seq_len)
        baseline_cfg.vocab_size = tokens.tokenizer.vocab_size  # fewer ids than asked if pairs ran out
        train_model("bpe", "bpe", baseline_cfg, baseline_cfg.build, tc, opts.steps, corpus, out, budget_left(), opts,
                    f"BPE-token transformer ({tokens.train_bytes_per_token:.2f} bytes per token: windows of "
                    f"{tokens.seq_len} tokens)", tokens)


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    DIST.__init__()  # from torchrun's environment; one process without it
    try:
        with STOP:  # Ctrl-C and SIGTERM, for the whole command (runtime.StopSignal)
            run(parse_args(argv, PRESETS))
    except (Exception, KeyboardInterrupt) as e:
        return report(e)  # one line on stderr and the exit code; anything unexpected keeps its traceback
    finally:
        DIST.stop()
    return 0


def settings(args, preset_name: str, device: torch.device):
    """The preset's values, then the flags: model and training configs, options, the stages to run. Every
    check of the flags against each other is made here, before anything is read or written."""
    preset = PRESETS[preset_name]
    blt_cfg, baseline_cfg = model_configs(args, preset, preset_name)  # the preset, then --config and flags
    pick = lambda flag, key: preset[key] if flag is None else flag  # noqa: E731  (a flag, else the preset's value)
    dtype = args.dtype or default_dtype(device)  # bf16 only where it is native: emulated it is many times slower
    check_dtype(dtype, device)
    flags = dict(seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                 weight_decay=args.weight_decay, dtype=dtype, outer_lr_multiplier=args.outer_lr_multiplier)
    tc = TrainConfig(**{**preset["train"], **{k: v for k, v in flags.items() if v is not None}, "seed": args.seed})
    if tc.outer_lr_multiplier is not None and (args.model != "blt" or blt_cfg.patching != LEARNED):
        raise UsageError(f"--outer-lr-multiplier scales the outer stage of learned boundaries: it needs --patching "
                         f"learned, not {blt_cfg.patching if args.model == 'blt' else '--model ' + args.model}")
    flags = dict(lr=args.entropy_lr, seq_len=args.entropy_seq_len, dtype=dtype)
    entropy_tc = TrainConfig(**{**preset["entropy_train"], **{k: v for k, v in flags.items() if v is not None},
                                "seed": args.seed})
    # Under a time budget no model evaluates along the way unless asked: every second trains, the same for every
    # model (a periodic evaluation would cost one model seconds that another keeps); the final one covers all.
    eval_interval = args.eval_interval or (NEVER if args.time_budget is not None else preset["eval_interval"])
    opts = argparse.Namespace(
        device=device, compile=pick(args.compile, "compile"), steps=pick(args.steps, "steps"),
        entropy_steps=pick(args.entropy_steps, "entropy_steps"), eval_interval=eval_interval,
        eval_bytes=pick(args.eval_bytes, "eval_bytes"), final_eval_bytes=pick(args.final_eval_bytes, "final_eval_bytes"),
        log_interval=pick(args.log_interval, "log_interval"),
        checkpoint_interval=args.checkpoint_interval or eval_interval,
        calibration_windows=pick(args.calibration_windows, "calibration_windows"), resume=args.resume,
        overwrite=args.overwrite, stop_at=args.stop_at, micro_batch_size=args.micro_batch_size,
        new_corpus=args.new_corpus)
    if args.model in ("byte", "bpe"):
        stages = [args.model]
    elif args.stage == "all":
        stages = ["entropy", "calibrate", "blt"] if blt_cfg.patching in ("entropy", "monotonic") else ["blt"]
    else:
        stages = [args.stage]
    if "calibrate" in stages and blt_cfg.patching not in ("entropy", "monotonic"):
        raise UsageError(f"--stage calibrate needs entropy or monotonic patching, not {blt_cfg.patching}")
    check_batches(([("--batch-size", tc.batch_size)] if {"blt", "byte", "bpe"} & set(stages) else [])
                  + ([("the entropy model's batch size", entropy_tc.batch_size)] if "entropy" in stages else []),
                  args.micro_batch_size, DIST.world)
    check_stop_at(args.stop_at, [] if args.time_budget else [opts.steps] * bool({"blt", "byte", "bpe"} & set(stages))
                  + [opts.entropy_steps] * ("entropy" in stages))
    return preset, blt_cfg, baseline_cfg, tc, entropy_tc, opts, stages


def space_patch_size(train, sample_bytes: int = 1 << 16) -> float:
    """Average space patch on the first bytes of the training split. Space patching starts a patch after every
    space-like byte, and UTF-8 lead bytes are space-like: Cyrillic or Chinese text gets a patch per character
    (2-3 bytes), where English gets one per word (about 4-5), and the global model runs twice as often."""
    x = torch.from_numpy(train[:sample_bytes].astype("int64"))[None] + 4  # (1, T) ids, bytes + 4
    return average_patch_size(patch_lengths(x, "space"))


def default_preset(args, device: torch.device) -> tuple[str, str]:
    """(preset, corpus) without --preset and --data: gpu and enwik8 with CUDA, else cpu and shakespeare."""
    preset_name = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    return preset_name, args.data or PRESETS[preset_name]["data"]


def passes_line(stages: list[str], opts, tc: TrainConfig, entropy_tc: TrainConfig, train_bytes: int,
                time_budget: float | None) -> str:
    """One line at start: how many times each model will read the training split, with a warning past
    MAX_PASSES (a model that sees its data many times memorises it; BLT's hash tables especially)."""
    if time_budget is not None:
        return f"passes over the training split ({train_bytes:,} bytes): as many as --time-budget allows"
    plan = [("the entropy model", opts.entropy_steps, entropy_tc)] * ("entropy" in stages)
    plan += [(name, opts.steps, tc) for name in ("BLT", "the byte model", "the BPE model")
             if {"BLT": "blt", "the byte model": "byte", "the BPE model": "bpe"}[name] in stages]
    passes = [(name, steps * c.batch_size * c.seq_len / max(1, train_bytes)) for name, steps, c in plan]
    line = (f"passes over the training split ({train_bytes:,} bytes): "
            + ", ".join(f"{name} {p:.3g} ({steps:,} steps)" for (name, p), (_, steps, _) in zip(passes, plan)))
    many = [name for name, p in passes if p > MAX_PASSES]
    if many:
        line += (f"; warning: {' and '.join(many)} will read the training split more than {MAX_PASSES} times and "
                 f"may memorise it: a larger corpus (--data enwik8), or fewer --steps")
    return line


def small_by_default(args, preset_name: str, train_bytes: int) -> bool:
    """The rule of the defaults block: a run on CPU under --time-budget, no --preset, a small training split (the
    same rule for BLT and both baselines: each model's plain command is what tools/race.py compares)."""
    return (args.preset is None and preset_name == "cpu" and args.time_budget is not None
            and train_bytes < SMALL_CORPUS_BYTES)


def run(args):
    t_start = time.time()
    device = pick_device(args.device, DIST)
    preset_name, args.data = default_preset(args, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    preset, blt_cfg, baseline_cfg, tc, entropy_tc, opts, stages = settings(args, preset_name, device)
    DIST.start(device)

    if not DIST.main:
        DIST.barrier()  # rank 0 downloads and prepares a named corpus first; the others then read its cache
    corpus = load_corpus(args.data, min_bytes=max(tc.seq_len, entropy_tc.seq_len))
    if DIST.main:
        DIST.barrier()
    why = ""
    if small_by_default(args, preset_name, len(corpus.train)):  # its windows are no longer: min_bytes holds
        preset_name, why = "small", (f" (the default under --time-budget for a training split under "
                                     f"{SMALL_CORPUS_BYTES >> 20} MB; --preset cpu for the cpu defaults)")
        preset, blt_cfg, baseline_cfg, tc, entropy_tc, opts, stages = settings(args, preset_name, device)
        if "blt" in stages and blt_cfg.patching == "space" and args.patching is None:
            size = space_patch_size(corpus.train)
            if size < MIN_SPACE_PATCH:  # a script without spaces between words: one character per patch
                args.patching = "strided"
                preset, blt_cfg, baseline_cfg, tc, entropy_tc, opts, stages = settings(args, preset_name, device)
                why += (f"; strided patching: space patching cuts this text into {size:.1f}-byte patches "
                        f"(--patching space to use it anyway)")
    name = Path(args.data).stem if os.sep in args.data or Path(args.data).exists() else args.data
    out = output_folder(Path(args.out or Path("out") / f"{name}-{preset_name}"))
    with FolderLock(out):  # one run per output folder; a second one is refused, naming this process
        DIST.say(f"{corpus.describe()} | preset {preset_name}{why} | device {device} | {torch.get_num_threads()} "
                 f"threads" + (f" x {DIST.world} processes" if DIST.enabled else "") + f" | out {out}")
        DIST.say(passes_line(stages, opts, tc, entropy_tc, len(corpus.train), args.time_budget))
        # compiling is left out of the budget (runtime.Clock.exclude), as it is out of each stage's clock
        excluded = Clock.excluded  # earlier commands' compiling, in this process (tests, tools)
        budget_left = lambda: None if args.time_budget is None else (  # noqa: E731
            args.time_budget - (time.time() - t_start - (Clock.excluded - excluded)))
        run_stages(args, opts, corpus, out, blt_cfg, baseline_cfg, tc, entropy_tc, stages, preset, budget_left)
        if DIST.main and sorted(out.glob("*.jsonl")):
            draw_curves(sorted(out.glob("*.jsonl")), out / "curves.png", f"{name}: validation bits per byte")
    DIST.say(f"done in {time.time() - t_start:.0f} s; metrics, checkpoints and curves in {out}")


if __name__ == "__main__":
    sys.exit(main())

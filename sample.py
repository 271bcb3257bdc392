"""Byte-level generation with dynamic patching (paper sections 2.4 and 3), incremental and naive.

The paper's inference savings come from running the global model once per patch, not once per byte. The
incremental generator below does exactly that, one new byte at a time:

  1. entropy model, one cached step: H[t] decides whether byte t+1 starts a patch (patching.py convention);
     strided and space patching decide from the bytes alone;
  2. local encoder, one cached step: byte t's state joins the open patch;
  3. if byte t+1 starts a patch, the open patch is complete: pool it (encoder cross-attention) and run ONE
     cached global step, giving o_j;
  4. local decoder, one cached step: byte t reads the most recent global output. That is the one-patch
     shift of decoder.py: the latest complete patch is j-1 inside patch j, and j itself once j closes.

The transformers take their steps through incremental.py (preallocated caches, fused projections), the
decoder's cross-attention reads one patch's slots through incremental.PatchReader, a closed patch is pooled
through incremental.PatchPooler and the newest byte's hash n-grams come from incremental.NewestByteEmbedding;
a row's patch decision looks only at the tail of its history that patching.py's rules can see (for the entropy
rules, H[t] and H[t-1]). Entropies are the training code's own function; every shortcut computes what the
training code computes, and tests/test_sample.py holds them to it. A byte-level model (train.py --model byte,
or the entropy model itself) generates the same way, one cached step per byte, for comparison
(tools/bench_sample.py). A BPE token model (train.py --model bpe) takes one cached step per token
(`generate_tokens`): the prompt is encoded with its tokenizer, the tokens it samples are decoded to bytes.

`--naive` recomputes the entropy model and the whole BLT on the full prefix for every byte, as Meta's released
generator does; it is the reference the incremental generator is tested against.

    python sample.py --checkpoint out/shakespeare-cpu/blt_entropy.pt --prompt "ROMEO:" --max-bytes 300 --show-patches
    python sample.py --checkpoint out/shakespeare-cpu/byte.pt --prompt "ROMEO:"
    python sample.py --checkpoint out/shakespeare-cpu/bpe.pt --prompt "ROMEO:" --show-patches   # token boundaries
    python sample.py --checkpoint out/shakespeare-cpu/blt_learned.pt --prompt "ROMEO:" --show-patches  # learned

A BLT with learned boundaries (train.py --patching learned) generates through learned.IncrementalLearnedBLT:
its router decides whether each byte starts a chunk as the byte arrives, and a row runs its global step then.
"""
import argparse
import codecs
import functools
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from blt import BLT
from checkpoint import CheckpointError, StorageError, load_checkpoint, os_reason
from entropy_model import EntropyModel, entropy_from_logits
from learned import IncrementalLearnedBLT, LearnedBLT
from incremental import CachedByteLM, CachedStack, Head, NewestByteEmbedding, PatchPooler, PatchReader, transposed
from patching import BOS_ID, EOS_ID, OFFSET, detokenize, limit_patch_length, patch_starts, tokenize
from options import SEED, THREADS, Parser, device_name, int_at_least, nonempty, number, pick_device
from plots import plot_entropies
from runtime import DIST, STOP, UsageError
from tokens import TokenLM


class IncrementalBLT:
    """Keeps every cache of one BLT for a batch of B rows that advance one byte per step in lockstep.

    Local models (entropy, encoder, decoder) are batched. Patch boundaries differ between rows, so each row
    runs its global step only when its own patch completes (on its own rows of the global caches). The
    transformers, hash n-grams and pooling run through incremental.py, which computes what the training
    modules compute (tests/test_sample.py checks it).
    capacity: positions to allocate for at first (buffers double when full).
    """

    def __init__(self, model: BLT, batch_size: int, capacity: int = 256):
        self.model, self.cfg, self.B = model, model.cfg, batch_size
        cfg, B, weight = model.cfg, batch_size, model.decoder.output.weight
        self.t = 0  # next position to process
        em, enc, g, dec = model.entropy_model, model.encoder, model.global_transformer, model.decoder
        self.entropy_model = CachedByteLM(em, B, capacity) if em is not None else None
        self.embed = NewestByteEmbedding(enc)
        self.encoder = CachedStack(enc.layers, enc.rope_theta, cfg.local_window, B, capacity)
        self.pool = PatchPooler(enc)
        self.global_projection = transposed(g.input_projection) if g.input_projection is not None else None
        self.global_model = CachedStack(g.layers, g.rope_theta, None, B, max(16, capacity // 4))
        self.slots = transposed(dec.patch_projection)  # o_j -> its k slots for the decoder
        self.readers = [PatchReader(c, cfg.cross_attn_k, B) for c in dec.cross_attn]
        self.decoder = CachedStack(dec.layers, dec.rope_theta, cfg.local_window, B, capacity)
        self.head = Head(dec.norm, dec.output)
        # per position: ids, entropies H[t] (nats), encoder byte states, and whether t starts a patch
        self.history = torch.zeros(B, capacity, dtype=torch.long, device=weight.device)
        self.entropy = weight.new_zeros(B, capacity)
        self.states = weight.new_zeros(B, capacity, cfg.local_dim)
        self.is_start = torch.zeros(B, capacity + 1, dtype=torch.bool, device=weight.device)
        self.is_start[:, 0] = True  # BOS
        self.patch_start = [0] * B  # first position of each row's open patch
        self.rule_start = [0] * B  # latest start of each row's patching rule (before max_patch_length)
        self.n_patches = [0] * B
        self.global_steps = 0

    @property
    def starts(self) -> list[torch.Tensor]:
        """Per position t so far: does t+1 start a patch? (B,) bool each."""
        return list(self.is_start[:, 1:self.t + 1].T)

    @property
    def entropies(self) -> list[torch.Tensor]:
        """Per position t so far: H[t] in nats, (B,) each (entropy schemes)."""
        return list(self.entropy[:, :self.t].T)

    def _make_room(self):
        """Double the per-position buffers when position t does not fit."""
        if self.t + 1 < self.history.shape[1]:
            return
        double = lambda x: torch.cat([x, torch.zeros_like(x)], dim=1)  # noqa: E731
        self.history, self.entropy, self.states, self.is_start = (
            double(self.history), double(self.entropy), double(self.states), double(self.is_start))

    def _next_start(self) -> list[int]:
        """Which rows start a patch at position t+1 (their open patch is complete)? Records it in is_start.

        patching.py's rules (incremental: paper section 2.4) on the shortest tail of the history that decides
        it. A rule looks back at most two positions, strided starts line up with any rule start, and
        max_patch_length counts from the latest rule start: so the tail begins one position before the
        earliest of the rows' latest rule starts. (patch_starts forces starts at a tail's first two positions;
        a row whose own rule start is later overrides them.)"""
        cfg, t = self.cfg, self.t
        if cfg.patching in ("entropy", "monotonic"):
            return self._next_entropy_start()
        first = max(0, min(self.rule_start) - 1)
        entropies = self.entropy[:, first:t + 1] if self.entropy_model is not None else None
        rule = patch_starts(self.history[:, first:t + 1], cfg.patching, patch_size=int(cfg.patch_size),
                            entropies=entropies, threshold=cfg.entropy_threshold)  # (B, t + 2 - first)
        if cfg.max_patch_length is None:
            starts = rule[:, -1]
            rows = starts.nonzero()[:, 0].tolist()
            ruled = rows
        else:  # what patch_starts(max_patch_length=...) does
            starts = limit_patch_length(rule, cfg.max_patch_length)[:, -1]
            ruled, starting = torch.stack([rule[:, -1], starts]).tolist()
            ruled, rows = [b for b, r in enumerate(ruled) if r], [b for b, s in enumerate(starting) if s]
        for b in ruled:
            self.rule_start[b] = t + 1
        self.is_start[:, t + 1] = starts
        return rows

    def _next_entropy_start(self) -> list[int]:
        """_next_start for the entropy rules, read off H[t] (and H[t-1]) directly: patching.py's
        entropy_patch_starts and limit_patch_length at position t+1 alone, in as few small calls as possible
        (tests/test_sample.py checks both against patching.py)."""
        cfg, t = self.cfg, self.t
        if t == 0:  # position 1 always starts a patch
            rule = [True] * self.B
        elif cfg.patching == "entropy":
            rule = (self.entropy[:, t] > cfg.entropy_threshold).tolist()
        else:  # monotonic: the same float32 difference as entropy_patch_starts
            rule = (self.entropy[:, t] - self.entropy[:, t - 1] > cfg.entropy_threshold).tolist()
        starts, L = [], cfg.max_patch_length
        for b, r in enumerate(rule):
            if r:
                self.rule_start[b] = t + 1
            starts.append(r or (L is not None and (t + 1 - self.rule_start[b]) % L == 0))
        self.is_start[:, t + 1] = torch.tensor(starts, device=self.is_start.device)
        return [b for b, s in enumerate(starts) if s]

    def _global_step(self, rows: list[int]):
        """The open patches of `rows` (row b's: positions patch_start[b]..t) are complete: pool them, run one
        global step for each row (together), and give the decoder's cross-attention the new outputs' slots,
        which each row reads until its next patch completes."""
        t, starts = self.t, [self.patch_start[b] for b in rows]
        first = min(starts)
        if len(rows) == self.B and max(starts) == first:  # every row, one start (always for B = 1)
            patches = self.pool(self.states[:, first:t + 1])  # (R, k * D_E)
        else:  # the longest of the patches, and what precedes the others (masked)
            device = self.states.device
            before = torch.arange(first, t + 1, device=device) < torch.tensor(starts, device=device)[:, None]
            patches = self.pool(self.states[rows, first:t + 1], before)
        x = patches @ self.global_projection if self.global_projection is not None else patches
        positions = [self.n_patches[b] for b in rows]
        if len(rows) == self.B and len(set(positions)) == 1:  # every row at the same patch (always for B = 1)
            out = self.global_model.step(x, positions[0])  # o_j per row (R, D_G)
        else:
            out = self.global_model.step_rows(x, rows, positions)
        slots = (out @ self.slots).view(len(rows), self.cfg.cross_attn_k, -1)  # (R, k, D)
        for j, b in enumerate(rows):
            for reader in self.readers:
                reader.set(b, slots[j])
            self.n_patches[b] += 1
            self.patch_start[b] = t + 1
        self.global_steps += len(rows)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """token: (B,) id at position t. Returns next-byte logits (B, V) for position t+1."""
        if not torch.is_inference_mode_enabled():
            with torch.inference_mode():
                return self.step(token)
        t = self.t
        self._make_room()
        self.history[:, t] = token
        if self.entropy_model is not None:  # 1. entropy model
            self.entropy[:, t] = entropy_from_logits(self.entropy_model.step(token, t))
        closed = self._next_start()  # rows whose open patch is now complete
        # 2. encoder: the hash n-grams need only the last max(n) ids
        window = self.history[:, max(0, t + 1 - self.embed.N):t + 1]
        if window.shape[1] < self.embed.N:  # the first bytes: n-grams reach back before BOS, as zeros
            window = F.pad(window, (self.embed.N - window.shape[1], 0))
        h = self.encoder.step(self.embed(window), t)  # (B, D_E)
        self.states[:, t] = h
        # 3. global model, only for rows whose patch just closed
        if closed:
            self._global_step(closed)
        # 4. decoder: before each layer, cross-attention to the latest complete patch (released: 2h + attention)
        position = self.decoder.position(t)
        for i in range(len(self.decoder.layers)):
            if i < len(self.readers):
                h = self.readers[i].read(h)
            h = self.decoder.block(i, h, position)
        self.t += 1
        return self.head(h)


class IncrementalByteLM:
    """The byte-level baseline (train.py --model byte) or the entropy model with KV caches: one step per byte,
    like IncrementalBLT. A BPE token model (tokens.TokenLM, the same stack) steps the same way, one token per step."""

    def __init__(self, model: EntropyModel, batch_size: int, capacity: int = 256):
        self.model, self.B, self.t = model, batch_size, 0
        self.lm = CachedByteLM(model, batch_size, capacity)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """token: (B,) id at position t. Returns next-byte logits (B, V) for position t+1."""
        if not torch.is_inference_mode_enabled():
            with torch.inference_mode():
                return self.step(token)
        logits = self.lm.step(token, self.t)
        self.t += 1
        return logits


@torch.no_grad()
def naive_logits(model: BLT, tokens: torch.Tensor) -> torch.Tensor:
    """Reference: full recomputation on the prefix. tokens: (B, T) -> next-byte logits (B, V)."""
    return model(tokens)[:, -1]


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator, banned: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) ids. temperature 0 is greedy. banned (V,): -inf where an id is never sampled, 0
    elsewhere; by default the byte vocabulary's special ids other than EOS."""
    logits = logits.float() + (never_sampled(logits.shape[-1], logits.device) if banned is None else banned)
    if temperature == 0:
        return logits.argmax(-1)
    if temperature != 1:
        logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    # torch.multinomial's own method for one draw, argmax(p / Exp(1) noise), without its input checks. The noise
    # is drawn on the host (generator is a CPU generator) and copied: one seed gives the same bytes on any device
    probs = logits.softmax(-1)
    noise = torch.empty(probs.shape, dtype=probs.dtype).exponential_(generator=generator)
    return (probs / noise.to(probs.device)).argmax(-1)


@functools.cache
def never_sampled(vocab_size: int, device: torch.device) -> torch.Tensor:
    """(V,): -inf at the special ids other than EOS, 0 elsewhere (added to logits)."""
    bias = torch.zeros(vocab_size, device=device)
    bias[:OFFSET] = float("-inf")
    bias[EOS_ID] = 0.0
    return bias


def incremental(model, batch_size: int, capacity: int = 256):
    """The cached one-byte-per-step generator of a BLT, a BLT with learned boundaries (learned.py) or a
    byte-level model (EntropyModel)."""
    if isinstance(model, LearnedBLT):
        return IncrementalLearnedBLT(model, batch_size, capacity)
    if isinstance(model, BLT):
        return IncrementalBLT(model, batch_size, capacity)
    return IncrementalByteLM(model, batch_size, capacity)


def generate(model: BLT | EntropyModel, prompt: bytes, max_bytes: int, *, batch_size: int = 1,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             naive: bool = False, stop_at_eos: bool = True, on_byte=None):
    """Generate max_bytes after prompt for batch_size rows with a BLT or a byte-level model. Returns
    (ids (B, T), the incremental generator (IncrementalBLT or IncrementalByteLM), or None if naive).

    on_byte(ids (B,)) is called after every generated byte (for streaming). Everything runs on the model's
    device; the sampling noise comes from a host generator (sample_next), so a seed gives the same bytes anywhere."""
    model.eval()
    device = next(model.parameters()).device
    with torch.inference_mode():
        generator = torch.Generator().manual_seed(seed)
        prompt_ids = torch.tensor(tokenize(prompt), device=device).expand(batch_size, -1)
        T = prompt_ids.shape[1] + max_bytes
        tokens = torch.full((batch_size, T), EOS_ID, device=device)  # the prompt, then generated ids
        tokens[:, :prompt_ids.shape[1]] = prompt_ids
        state = None if naive else incremental(model, batch_size, capacity=min(T, 4096))
        if state is not None:
            for t in range(prompt_ids.shape[1]):
                logits = state.step(prompt_ids[:, t])
        finished = [False] * batch_size  # rows that have produced EOS: they produce nothing else
        for t in range(prompt_ids.shape[1], T):
            if naive:
                logits = naive_logits(model, tokens[:, :t])
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            if any(finished):
                nxt = torch.where(torch.tensor(finished, device=device), EOS_ID, nxt)
            tokens[:, t] = nxt
            if on_byte is not None:
                on_byte(nxt)
            finished = [f or i == EOS_ID for f, i in zip(finished, nxt.tolist())]
            if stop_at_eos and all(finished):
                return tokens[:, :t + 1].clone(), state
            if state is not None:
                logits = state.step(nxt)
    return tokens, state


def generate_tokens(model: TokenLM, prompt: bytes, max_bytes: int, *, batch_size: int = 1,
                    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                    naive: bool = False, on_token=None):
    """generate for a BPE token model (train.py --model bpe; model.tokens holds its tokenizer): BOS and the
    prompt's tokens, then sampled tokens until every row spells at least max_bytes bytes (the caller cuts the
    bytes there). A token model has no EOS, and BOS is never sampled. Returns (ids (B, N), the incremental
    generator (IncrementalByteLM over the token stack), or None if naive); on_token(ids (B,)) after each token.

    The prompt is encoded on its own, so its last token may be shorter than the text would merge into."""
    tok = model.tokens.tokenizer
    device = next(model.parameters()).device
    spelled_by = torch.tensor([len(b) for b in tok.token_bytes], device=device)  # (V,) bytes each id decodes to
    banned = torch.zeros(tok.vocab_size, device=device)
    banned[tok.bos_id] = float("-inf")
    model.eval()
    with torch.inference_mode():
        generator = torch.Generator().manual_seed(seed)  # on the host, as in generate
        prompt_ids = torch.tensor([tok.bos_id, *tok.encode(prompt).tolist()], device=device).expand(batch_size, -1)
        ids, spelled = [prompt_ids], torch.zeros(batch_size, dtype=torch.long, device=device)  # (B, P), (B,)
        state = None if naive else incremental(model, batch_size, capacity=min(prompt_ids.shape[1] + max_bytes, 4096))
        if state is not None:
            for t in range(prompt_ids.shape[1]):
                logits = state.step(prompt_ids[:, t])
        more = max_bytes > 0  # until every row spells max_bytes: one host sync per token
        while more:
            if naive:
                logits = model(torch.cat(ids, dim=1))[:, -1]  # the whole prefix, recomputed
            nxt = sample_next(logits, temperature, top_k, top_p, generator, banned)
            ids.append(nxt[:, None])
            spelled += spelled_by[nxt]
            more = int(spelled.min()) < max_bytes
            if on_token is not None:
                on_token(nxt)
            if state is not None and more:
                logits = state.step(nxt)
    return torch.cat(ids, dim=1), state


# ---- command line ----

def load_model(path: str) -> BLT | EntropyModel | TokenLM:
    """A BLT (as load_blt), a byte-level model (train.py --model byte, or the entropy model) or a BPE token
    model (train.py --model bpe) from a checkpoint; CheckpointError otherwise."""
    kind, _, model = load_checkpoint(path)
    return calibrated(model, path) if kind == "blt" else model


def load_blt(path: str) -> BLT:
    """A BLT from a checkpoint of train.py or tools/convert.py (checkpoint.py); CheckpointError otherwise."""
    return calibrated(load_checkpoint(path, kinds=("blt",))[2], path)


def calibrated(model: BLT, path: str) -> BLT:
    if model.entropy_model is not None and model.cfg.entropy_threshold is None:
        raise CheckpointError(f"{path} uses {model.cfg.patching} patching but holds no threshold: calibrate it "
                              f"(train.py --stage calibrate, then --stage blt)")
    return model


def characters(data: bytes):
    """(text, start, end) for each character of data: a whole UTF-8 character, or a single byte that is not
    part of one, written \\xNN, so that every byte of the output keeps its own place."""
    i = 0
    while i < len(data):
        for n in range(1, 5):
            try:
                text = data[i:i + n].decode("utf-8")
                break
            except UnicodeDecodeError:
                continue
        else:
            text, n = f"\\x{data[i]:02x}", 1
        yield text, i, i + n
        i += n


COLOURS, SPLIT_COLOUR = ["\033[30;46m", "\033[30;43m"], "\033[30;45m"


def show_patches(ids: list[int], starts: list[bool], colour: bool = True) -> str:
    """Mark patches: alternate background colours (ANSI) on a terminal, otherwise a "|" before every patch
    start, so the boundaries survive a pipe or a file. The bytes are decoded as one text and no character is
    cut: a boundary inside a multi-byte character is shown as "¦" before that character (on a terminal, the
    character in magenta). Bytes that are not UTF-8 are shown as \\xNN, each with its own boundaries."""
    data, boundaries, pending = bytearray(), set(), False
    for i, s in zip(ids, starts):
        pending = pending or s
        if i >= OFFSET:  # a start on a special id (BOS, EOS) marks the next byte
            if pending:
                boundaries.add(len(data))
            data.append(i - OFFSET)
            pending = False
    pieces, k = [], 0  # (patch number, a start inside the character?, text, a start before it?)
    for text, start, end in characters(bytes(data)):
        k += start in boundaries and start > 0
        cuts = sum(b in boundaries for b in range(start + 1, end))
        pieces.append((k, cuts > 0, text, start in boundaries and start > 0))
        k += cuts
    if not colour:
        return "".join(("|" if new else "") + ("¦" if cut else "") + text for _, cut, text, new in pieces)
    out, current = [], None
    for patch, cut, text, _ in pieces:
        style = SPLIT_COLOUR if cut else COLOURS[patch % 2]
        if (patch, cut) != current or cut:
            out.append(("\033[0m" if out else "") + style)
            current = (patch, cut)
        out.append(text)
    return "".join(out) + ("\033[0m" if out else "")


def parse_args(argv) -> argparse.Namespace:
    """sample.py's flags, each checked as it enters (options.py's types), and their combinations."""
    p = Parser(description="Generate bytes from a BLT checkpoint (or a byte-level, entropy or BPE model's).")
    p.add_argument("--checkpoint", type=nonempty, default="out/shakespeare-cpu/blt_entropy.pt",
                   help="checkpoint written by train.py or tools/convert.py")
    p.add_argument("--prompt", help="prompt string (default: --prompt-file, else stdin if piped, else BOS only)")
    p.add_argument("--prompt-file", type=nonempty, help="read the prompt as raw bytes from this file")
    p.add_argument("--max-bytes", type=int_at_least(0), default=256, help="bytes to generate")
    p.add_argument("--num-samples", type=int_at_least(1), default=1, help="samples generated together in one batch")
    p.add_argument("--temperature", type=temperature, default=0.8, help="0 = greedy, else at least 0.001")
    p.add_argument("--top-k", type=int_at_least(1), default=None)
    p.add_argument("--top-p", type=number(above=0, at_most=1), default=None)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--device", type=device_name, default=None,
                   help="cpu, cuda, cuda:1, ... (default: cuda if available); a seed gives the same bytes on any")
    p.add_argument("--threads", type=THREADS, default=None,
                   help="CPU threads (default: OMP_NUM_THREADS if set, else up to 4: one byte's matmuls are small)")
    p.add_argument("--no-stop-at-eos", action="store_true", help="keep going after EOS")
    p.add_argument("--naive", action="store_true", help="recompute everything for every byte (reference)")
    p.add_argument("--show-patches", action="store_true",
                   help="mark patch starts (a BPE model: token starts): colours on a terminal, '|' when piped; a "
                        "start inside a multi-byte "
                        "character is shown as '¦' (magenta on a terminal) before the character, which is not "
                        "cut; bytes that are not UTF-8 are shown as \\xNN")
    p.add_argument("--plot", help="write a PNG of per-byte entropy with the threshold (entropy schemes)")
    args = p.parse_args(argv)
    if args.prompt is not None and args.prompt_file is not None:
        p.error("--prompt and --prompt-file both give the prompt: give one")
    if args.naive and (args.show_patches or args.plot):
        p.error(f"{'--show-patches' if args.show_patches else '--plot'} needs the incremental sampler: drop --naive")
    if args.plot is not None and not Path(args.plot).resolve().parent.is_dir():
        p.error(f"--plot {args.plot}: there is no folder {Path(args.plot).resolve().parent}")
    return args


def temperature(text: str) -> float:
    value = number(at_least=0)(text)
    if 0 < value < 1e-3:  # below this, logits / temperature overflows float32 on the way to greedy anyway
        raise argparse.ArgumentTypeError(f"{text!r}: must be 0 (greedy) or at least 0.001")
    return value


def read_prompt(args) -> bytes:
    if args.prompt is not None:
        return os.fsencode(args.prompt)  # raw bytes back, even if the argument is not valid UTF-8
    if args.prompt_file is not None:
        try:
            return Path(args.prompt_file).read_bytes()
        except OSError as e:
            raise StorageError(f"cannot read --prompt-file {args.prompt_file}: {os_reason(e)}") from None
    if sys.stdin is not None and not sys.stdin.isatty():
        return sys.stdin.buffer.read()
    return b""


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(errors="replace")  # a terminal that cannot show a character gets "?", not a traceback
    try:
        with STOP:  # Ctrl-C or SIGTERM: KeyboardInterrupt at once; run() keeps what was generated
            return run(args)
    except (CheckpointError, StorageError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before or after generation: nothing to keep
        print(f"stopped by {STOP.name()}", file=sys.stderr)
        return 128 + (STOP.signum or signal.SIGINT)
    except BrokenPipeError:  # `sample.py | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def token_starts(tokenizer, ids: list[int]) -> tuple[list[int], list[bool]]:
    """A BPE model's ids -> (BOS + byte ids, whether each starts a token): show_patches's input, with tokens
    as the patches."""
    byte_ids, starts = [BOS_ID], [True]
    for i in ids:
        piece = tokenizer.token_bytes[i]
        byte_ids += [b + OFFSET for b in piece]
        starts += [True] + [False] * (len(piece) - 1)
    return byte_ids, starts


def run(args) -> int:
    prompt = read_prompt(args)
    device = pick_device(args.device, DIST)
    model = load_model(args.checkpoint).to(device)
    bpe = isinstance(model, TokenLM)
    what = "a BPE model" if bpe else "a byte-level model (one byte per step)"
    if args.plot and not isinstance(model, (BLT, LearnedBLT)):
        raise UsageError(f"--plot draws a BLT's entropies; {args.checkpoint} holds {what}")
    if args.show_patches and not (isinstance(model, (BLT, LearnedBLT)) or bpe):
        raise UsageError(f"--show-patches needs a BLT (or a BPE model, for its tokens); {args.checkpoint} holds {what}")
    if args.plot and model.entropy_model is None:
        raise UsageError(f"--plot draws the entropy model's entropies; {args.checkpoint} uses {model.cfg.patching} patching")
    if args.threads or "OMP_NUM_THREADS" not in os.environ:  # else torch has already taken OMP_NUM_THREADS
        torch.set_num_threads(args.threads or max(1, min(4, os.cpu_count() or 1)))
    spell = model.tokens.tokenizer.decode if bpe else detokenize  # generated ids -> their bytes
    limit = len(prompt) + args.max_bytes  # a BPE model's last token may spell past --max-bytes: cut there

    stream = args.num_samples == 1 and not args.show_patches
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = sys.stdout
    if stream:
        out.write(decoder.decode(prompt))
        out.flush()
    generated = [[] for _ in range(args.num_samples)]  # ids so far, kept if generation is interrupted
    streamed = [len(prompt)]

    def on_byte(ids):  # one byte per row, or one token
        ids = ids.tolist()  # one host sync per byte (or token)
        for row, i in zip(generated, ids):
            row.append(i)
        if stream:
            piece = spell(ids[:1])[:limit - streamed[0]]
            streamed[0] += len(piece)
            out.write(decoder.decode(piece))
            out.flush()

    sample = functools.partial(generate_tokens, on_token=on_byte) if bpe else functools.partial(
        generate, stop_at_eos=not args.no_stop_at_eos, on_byte=on_byte)
    t0 = time.perf_counter()
    try:
        tokens, state = sample(model, prompt, args.max_bytes, batch_size=args.num_samples, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, seed=args.seed, naive=args.naive)
    except KeyboardInterrupt:  # keep what was generated, say so, exit 128 + signal
        if stream:
            out.write(decoder.decode(b"", final=True) + "\n")
        for b, row in enumerate(generated if not stream else []):
            print(f"--- sample {b} ---")
            print((prompt + spell(row))[:limit].decode("utf-8", "replace"))
        out.flush()
        n = min(len(spell(generated[0])), args.max_bytes)
        print(f"stopped by {STOP.name()} after {n} bytes", file=sys.stderr)
        return 128 + (STOP.signum or signal.SIGINT)
    seconds = max(1e-9, time.perf_counter() - t0)
    if stream:
        out.write(decoder.decode(b"", final=True) + "\n")
    for b in range(tokens.shape[0]):
        ids = tokens[b].tolist()
        if args.show_patches and bpe:
            byte_ids, starts = token_starts(model.tokens.tokenizer, ids[1:])
            print(show_patches(byte_ids[:1 + limit], starts[:1 + limit], colour=sys.stdout.isatty()))
        elif args.show_patches:
            starts = [True] + state.is_start[b, 1:state.t + 1].tolist()  # position 0 (BOS) starts a patch
            print(show_patches(ids[: len(starts)], starts, colour=sys.stdout.isatty()))
        elif not stream:
            print(f"--- sample {b} ---")
            print(spell(ids)[:limit].decode("utf-8", "replace"))
    if args.plot:  # before the summary line, so that a figure that cannot be written is the only line
        ents = state.entropy[0, :state.t].tolist()
        starts = [True] + state.is_start[0, 1:state.t + 1].tolist()
        try:
            plot_entropies(args.plot, tokens[0].tolist(), ents, starts, model.cfg.entropy_threshold,
                           model.cfg.patching == "monotonic")
        except (OSError, RuntimeError, ValueError) as e:
            raise StorageError(f"cannot write --plot {args.plot}: {os_reason(e)}") from None
    n_new = args.max_bytes if bpe else tokens.shape[1] - len(prompt) - 1
    info = f"{n_new} bytes x {tokens.shape[0]} in {seconds:.2f}s ({n_new * tokens.shape[0] / seconds:.0f} bytes/s"
    info += f", {torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''})"
    if isinstance(state, (IncrementalBLT, IncrementalLearnedBLT)):
        info += f", global steps per byte {state.global_steps / max(1, state.t * state.B):.3f}"
    if bpe:  # every row took as many tokens
        n_tokens = len(generated[0])
        info += f", {n_tokens} tokens per sample ({n_new / max(1, n_tokens):.2f} bytes per token)"
    print(info + (f"; wrote {args.plot}" if args.plot else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

`--naive` recomputes the entropy model and the whole BLT on the full prefix for every byte, as Meta's released
generator does; it is the reference the incremental generator is tested against.

    python sample.py --checkpoint out/shakespeare-cpu/blt_entropy.pt --prompt "ROMEO:" --max-bytes 300 --show-patches
"""
import argparse
import codecs
import os
import sys
import time

import torch

from blt import BLT
from checkpoint import CheckpointError, load_checkpoint
from entropy_model import entropy_from_logits
from layers import KVCache
from patching import EOS_ID, OFFSET, detokenize, patch_starts, tokenize
from plots import plot_entropies


class IncrementalBLT:
    """Keeps every cache of one BLT for a batch of B rows that advance one byte per step in lockstep.

    Local models (entropy, encoder, decoder) are batched. Patch boundaries differ between rows, so each row
    has its own global-model cache and runs its global step only when its own patch completes.
    """

    def __init__(self, model: BLT, batch_size: int):
        self.model, self.cfg, self.B = model, model.cfg, batch_size
        self.t = 0  # next position to process
        self.entropy_caches = model.entropy_model.new_caches() if model.entropy_model is not None else None
        self.encoder_caches = [KVCache(model.cfg.local_window) for _ in model.encoder.layers]
        self.decoder_caches = [KVCache(model.cfg.local_window) for _ in model.decoder.layers]
        self.global_caches = [[KVCache(None) for _ in model.global_transformer.layers] for _ in range(batch_size)]
        self.open_patch = [[] for _ in range(batch_size)]  # encoder states (1, D_E) of the patch being built
        self.last_global = [None] * batch_size  # most recent global output o_j, (1, 1, D_G)
        self.n_patches = [0] * batch_size
        self.history = torch.zeros(batch_size, 0, dtype=torch.long)  # ids so far (for hashes and patching)
        self.starts, self.entropies = [], []  # per position t: does t+1 start a patch (B,); H[t] in nats (B,)
        self.global_steps = 0

    def _next_start(self) -> torch.Tensor:
        """Does position t+1 start a patch? patching.py's rules on the history so far: they look only at
        positions <= t, so the last column is final (incremental patching, paper section 2.4)."""
        cfg = self.cfg
        entropies = torch.stack(self.entropies, dim=1) if self.entropy_caches is not None else None  # (B, t+1)
        starts = patch_starts(self.history, cfg.patching, patch_size=int(cfg.patch_size), entropies=entropies,
                              threshold=cfg.entropy_threshold, max_patch_length=cfg.max_patch_length)
        return starts[:, -1]  # (B,)

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """token: (B,) id at position t. Returns next-byte logits (B, V) for position t+1."""
        model, t = self.model, self.t
        pos = torch.tensor([t])
        self.history = torch.cat([self.history, token[:, None]], dim=1)
        if self.entropy_caches is not None:  # 1. entropy model
            logits_e = model.entropy_model(token[:, None], caches=self.entropy_caches, start_pos=t)
            self.entropies.append(entropy_from_logits(logits_e[:, -1]))  # (B,)
        start_next = self._next_start()
        self.starts.append(start_next)
        # 2. encoder: the hash n-grams need only the last max(n) ids
        window = self.history[:, -max(self.cfg.hash_ngram_sizes, default=1):]
        e = model.encoder.embed(window)[:, -1:]  # (B, 1, D_E)
        h = model.encoder.byte_layers(e, pos, self.encoder_caches)  # (B, 1, D_E)
        # 3. global model, only for rows whose patch just closed
        for b in range(self.B):
            self.open_patch[b].append(h[b])
            if start_next[b]:
                states = torch.cat(self.open_patch[b])[None]  # (1, n, D_E): the complete patch
                patch = model.encoder.pool(states, torch.zeros(1, states.shape[1], dtype=torch.long), 1)
                self.last_global[b] = model.global_transformer(patch, self.global_caches[b], self.n_patches[b])
                self.n_patches[b] += 1
                self.global_steps += 1
                self.open_patch[b] = []
        # 4. decoder reads the latest complete patch
        global_out = torch.cat(self.last_global)  # (B, 1, D_G)
        logits = model.decoder(h, global_out, torch.zeros(self.B, 1, dtype=torch.long), pos, self.decoder_caches)
        self.t += 1
        return logits[:, -1]


@torch.no_grad()
def naive_logits(model: BLT, tokens: torch.Tensor) -> torch.Tensor:
    """Reference: full recomputation on the prefix. tokens: (B, T) -> next-byte logits (B, V)."""
    return model(tokens)[:, -1]


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator) -> torch.Tensor:
    """(B, V) logits -> (B,) ids. temperature 0 is greedy. Special ids other than EOS are never sampled."""
    logits = logits.float().clone()
    eos = logits[:, EOS_ID].clone()
    logits[:, :OFFSET] = float("-inf")
    logits[:, EOS_ID] = eos
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def generate(model: BLT, prompt: bytes, max_bytes: int, *, batch_size: int = 1, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0, naive: bool = False,
             stop_at_eos: bool = True, on_byte=None):
    """Generate max_bytes after prompt for batch_size rows. Returns (ids (B, T), IncrementalBLT or None).

    on_byte(ids (B,)) is called after every generated byte (for streaming)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    prompt_ids = torch.tensor(tokenize(prompt)).expand(batch_size, -1)
    tokens = prompt_ids.clone()
    state = None if naive else IncrementalBLT(model, batch_size)
    if state is not None:
        for t in range(prompt_ids.shape[1]):
            logits = state.step(prompt_ids[:, t])
    finished = torch.zeros(batch_size, dtype=torch.bool)
    for _ in range(max_bytes):
        if naive:
            logits = naive_logits(model, tokens)
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        nxt = torch.where(finished, torch.full_like(nxt, EOS_ID), nxt)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if on_byte is not None:
            on_byte(nxt)
        finished |= nxt == EOS_ID
        if stop_at_eos and finished.all():
            break
        if state is not None:
            logits = state.step(nxt)
    return tokens, state


# ---- command line ----

def load_blt(path: str) -> BLT:
    """A BLT from a checkpoint of train.py or tools/convert.py (checkpoint.py); CheckpointError otherwise."""
    return load_checkpoint(path, kinds=("blt",))[2]


def show_patches(ids: list[int], starts: list[bool], colour: bool = True) -> str:
    """Mark patches: alternate background colours (ANSI) on a terminal, otherwise a "|" before every patch
    start, so the boundaries survive a pipe or a file. UTF-8 is decoded leniently."""
    colours = ["\033[30;46m", "\033[30;43m"]
    out, patch, k = [], bytearray(), 0

    def flush():
        text = patch.decode("utf-8", "replace")
        if colour:
            out.append(colours[k % 2] + text + "\033[0m")
        else:
            out.append(("|" if out else "") + text)

    for i, s in zip(ids, starts):
        if s and patch:
            flush()
            patch, k = bytearray(), k + 1
        if i >= OFFSET:
            patch.append(i - OFFSET)
    flush()
    return "".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description="Generate bytes from a BLT checkpoint.")
    p.add_argument("--checkpoint", default="out/shakespeare-cpu/blt_entropy.pt", help="checkpoint written by train.py or convert.py")
    p.add_argument("--prompt", help="prompt string (default: --prompt-file, else stdin if piped, else BOS only)")
    p.add_argument("--prompt-file", help="read the prompt as raw bytes from this file")
    p.add_argument("--max-bytes", type=int, default=256, help="bytes to generate")
    p.add_argument("--num-samples", type=int, default=1, help="samples generated together in one batch")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-stop-at-eos", action="store_true", help="keep going after EOS")
    p.add_argument("--naive", action="store_true", help="recompute everything for every byte (reference)")
    p.add_argument("--show-patches", action="store_true", help="mark patch starts: colours on a terminal, '|' when piped")
    p.add_argument("--plot", help="write a PNG of per-byte entropy with the threshold (entropy schemes)")
    args = p.parse_args(argv)

    if args.prompt is not None:
        prompt = os.fsencode(args.prompt)  # raw bytes back, even if the argument is not valid UTF-8
    elif args.prompt_file is not None:
        if not os.path.isfile(args.prompt_file):
            sys.exit(f"error: prompt file not found: {args.prompt_file}")
        prompt = open(args.prompt_file, "rb").read()
    elif not sys.stdin.isatty():
        prompt = sys.stdin.buffer.read()
    else:
        prompt = b""
    try:
        model = load_blt(args.checkpoint)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    stream = args.num_samples == 1 and not args.show_patches
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = sys.stdout
    if stream:
        out.write(decoder.decode(prompt))
        out.flush()

    def on_byte(ids):
        if stream and int(ids[0]) >= OFFSET:
            out.write(decoder.decode(bytes([int(ids[0]) - OFFSET])))
            out.flush()

    t0 = time.perf_counter()
    tokens, state = generate(model, prompt, args.max_bytes, batch_size=args.num_samples,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                             naive=args.naive, stop_at_eos=not args.no_stop_at_eos, on_byte=on_byte)
    seconds = time.perf_counter() - t0
    if stream:
        out.write(decoder.decode(b"", final=True) + "\n")
    for b in range(tokens.shape[0]):
        ids = tokens[b].tolist()
        if args.show_patches and state is not None:
            starts = [True] + [bool(s[b]) for s in state.starts]  # position 0 (BOS) starts a patch
            print(show_patches(ids[: len(starts)], starts, colour=sys.stdout.isatty()))
        elif not stream:
            print(f"--- sample {b} ---")
            print(detokenize(ids).decode("utf-8", "replace"))
    n_new = tokens.shape[1] - len(prompt) - 1
    info = f"{n_new} bytes x {tokens.shape[0]} in {seconds:.2f}s ({n_new * tokens.shape[0] / seconds:.0f} bytes/s)"
    if state is not None:
        info += f", global steps per byte {state.global_steps / max(1, state.t * state.B):.3f}"
    print(info, file=sys.stderr)
    if args.plot:
        if state is None or not state.entropies:
            sys.exit("error: --plot needs entropy patching and the incremental sampler (no --naive)")
        ents = [float(e[0]) for e in state.entropies]
        starts = [True] + [bool(s[0]) for s in state.starts]
        plot_entropies(args.plot, tokens[0].tolist(), ents, starts, model.cfg.entropy_threshold,
                       model.cfg.patching == "monotonic")
        print(f"wrote {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()

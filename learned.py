"""BLT with learned boundaries: H-Net's dynamic chunking (arXiv 2507.07955, section 2) in place of BLT's patcher.

    bytes -> local encoder: byte + hash n-gram embeddings, local layers (encoder.py, BLT section 3.2.1)
          -> router: boundary probabilities p_t, boundaries b_t (dynamic_chunking.py)
          -> selection: the states of each chunk's first byte                  (replaces BLT's patcher and
                                                                                 cross-attention pooling)
          -> global latent transformer over chunks (global_transformer.py, BLT section 3.1)
          -> smoothing and upsampling: every byte reads its own chunk's output (replaces the decoder's
                                                                                 cross-attention)
          -> local decoder layers and the byte head (next-byte logits)

The boundaries are trained by the next-byte loss (through the smoothing and the straight-through confidence)
and a ratio loss that keeps about one byte in N a boundary, N = cfg.patch_size: the same flag that sets
BLT's target patch size sets the target bytes per chunk here (train.py --patching learned --patch-size N).

Causality (dynamic_chunking.py's docstring works it out): byte t reads chunk j with s_j <= t, whose output has
seen bytes 0..s_j only, so no one-patch shift is needed; the global output of a chunk that starts at t+1 (the
byte being predicted) must never reach byte t. tests/test_learned.py checks every position.

Widths: the chunk vectors (D_E) are projected to D_G for the global transformer (its input projection) and
its outputs back to D_E (H-Net pads and truncates instead; a projection is this project's way, as in BLT).

Shapes: B = batch, T = bytes (incl. BOS), P = chunks, D_E = local width, D_G = global width, V = 260.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from dynamic_chunking import SMOOTHING_EPS, DynamicChunking, ratio_loss
from encoder import LocalEncoder
from global_transformer import GlobalTransformer
from incremental import CachedStack, Head, NewestByteEmbedding, transposed
from layers import RMSNorm, TransformerBlock, causal_mask, compute_dtype, rope_cos_sin, swiglu_hidden_dim
from patching import PAD_ID, VOCAB_SIZE

RATIO_LOSS_WEIGHT = 0.03  # alpha in L_AR + alpha * L_ratio (H-Net section 2.3.3)


class ByteEncoder(LocalEncoder):
    """BLT's local encoder (embeddings and local layers) without its patch cross-attention: selection replaces
    the pooling, so those weights would never be used."""

    def __init__(self, cfg):
        super().__init__(cfg)
        del self.patch_projection, self.cross_attn

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, D_E) byte states."""
        T = tokens.shape[1]
        return self.byte_layers(self.dropout(self.embed(tokens)), torch.arange(T, device=tokens.device))


class ByteDecoder(nn.Module):
    """Local decoder layers (causal sliding window, as BLT's) over the upsampled states, then the byte head."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.local_dim
        self.window, self.rope_theta, self.head_dim = cfg.local_window, cfg.rope_theta, D // cfg.local_heads
        hidden = swiglu_hidden_dim(D, cfg.multiple_of)
        self.layers = nn.ModuleList(TransformerBlock(D, cfg.local_heads, hidden, cfg.norm_eps, cfg.dropout,
                                                     window=cfg.local_window) for _ in range(cfg.decoder_layers))
        self.norm = RMSNorm(D, cfg.norm_eps)
        self.output = nn.Linear(D, VOCAB_SIZE, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: (B, T, D_E) -> logits (B, T, V)."""
        positions = torch.arange(h.shape[1], device=h.device)
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta, compute_dtype(h))
        mask = causal_mask(positions, positions, self.window)  # (1, 1, T, T)
        for layer in self.layers:
            h = layer(h, mask, cos, sin)
        return self.output(self.norm(h))


class LearnedBLT(nn.Module):
    """The model of train.py --patching learned. Same interface as blt.BLT where it matters: cfg,
    entropy_model (None), forward(tokens, targets) -> logits or (logits, loss)."""

    def __init__(self, cfg):
        super().__init__()
        from blt import init_weights  # blt.py builds this model (blt.build_model): imported here, not at the top
        self.cfg = cfg
        D_E, D_G = cfg.local_dim, cfg.global_dim
        self.entropy_model = None  # the boundaries are learned: no separate model decides them
        self.encoder = ByteEncoder(cfg)
        self.chunking = DynamicChunking(D_E)
        self.global_transformer = GlobalTransformer(cfg)
        # a chunk is one byte state (D_E), where a BLT patch is k pooled slots (k * D_E)
        self.global_transformer.input_projection = nn.Linear(D_E, D_G, bias=False) if D_E != D_G else None
        self.global_output = nn.Linear(D_G, D_E, bias=False)  # z_j back to the local width
        self.decoder = ByteDecoder(cfg)
        self.apply(init_weights)
        self.chunking.reset_parameters()  # identity router, zero residual (as released)
        self.pad_chunks_to = 1  # P rounded up to a multiple of this (train.py sets 16 under torch.compile)
        self.stats = {}  # the last forward's chunk count, bytes and ratio loss (detached), for the logs

    def outer_parameters(self) -> list[nn.Parameter]:
        """The outer stage's parameters (encoder, router and residual, decoder): train.py's
        --outer-lr-multiplier scales their learning rate."""
        return [*self.encoder.parameters(), *self.chunking.parameters(), *self.decoder.parameters()]

    @property
    def ratio_loss_weight(self) -> float:
        w = self.cfg.ratio_loss_weight
        return RATIO_LOSS_WEIGHT if w is None else w

    def chunk(self, tokens: torch.Tensor) -> dict:
        """Encoder and router: tokens (B, T) -> {"h": (B, T, D_E) byte states, and DynamicChunking.down's
        "chunks" (B, P, D_E), "p", "b" (B, T), "starts", "real" (B, P)}."""
        h = self.encoder(tokens)
        return {"h": h, **self.chunking.down(h, tokens, self.pad_chunks_to)}

    @torch.no_grad()
    def boundaries(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T) bool: does byte t start a chunk (b_t)? For pictures (tools/figures.py)."""
        return self.chunk(tokens)["b"]

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, patch_lengths=None):
        """tokens: (B, T) ids; targets: (B, T) next ids or -1. Returns logits (B, T, V), plus the loss.

        The loss's value is the mean next-byte cross-entropy alone (comparable with every other model in the
        logs); its gradient is that of L_AR + alpha * L_ratio: alpha * (L_ratio - L_ratio.detach()) adds the
        ratio loss's gradient and exactly 0 to the value."""
        if patch_lengths is not None:
            raise ValueError("learned boundaries come from the model itself: give no patch_lengths")
        c = self.chunk(tokens)
        global_out = self.global_transformer(c["chunks"])  # (B, P, D_G), causal over chunks
        z = self.global_output(global_out)  # (B, P, D_E)
        logits = self.decoder(self.chunking.up(z, c["h"], c))  # (B, T, V)
        real = tokens != PAD_ID
        ratio = ratio_loss(c["b"], c["p"], self.cfg.patch_size, real)
        self.stats = {"chunks": (c["b"] & real).sum().detach(), "bytes": real.sum().detach(),
                      "ratio_loss": ratio.detach()}
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, VOCAB_SIZE), targets.reshape(-1), ignore_index=-1)
        return logits, loss + self.ratio_loss_weight * (ratio - ratio.detach())


# ---- generation: one byte per step, each boundary decided as its byte arrives ----

class IncrementalLearnedBLT:
    """sample.IncrementalBLT's counterpart for learned boundaries: B rows advance one byte per step.

    Per byte t: embed it (hash n-grams from the last ids), one cached encoder step gives x_t; the router
    compares it with x_{t-1}: if b_t, byte t starts a chunk and that row runs ONE cached global step on x_t,
    and its smoothed output becomes zbar_j = P z_j + (1 - P) zbar_{j-1}, which byte t and the following bytes
    of the chunk read (times the straight-through confidence, whose value is 1); plus the residual path, then
    one cached decoder step. tests/test_learned.py checks the logits against LearnedBLT on the whole prefix.
    """

    def __init__(self, model: LearnedBLT, batch_size: int, capacity: int = 256):
        self.model, self.cfg, self.B, self.t = model, model.cfg, batch_size, 0
        cfg, B, enc, g = model.cfg, batch_size, model.encoder, model.global_transformer
        weight = model.decoder.output.weight
        self.embed = NewestByteEmbedding(enc)
        self.encoder = CachedStack(enc.layers, enc.rope_theta, cfg.local_window, B, capacity)
        self.router = model.chunking.router
        self.residual = transposed(model.chunking.residual)  # (D_E, D_E)
        self.global_projection = transposed(g.input_projection) if g.input_projection is not None else None
        self.global_model = CachedStack(g.layers, g.rope_theta, None, B, max(16, capacity // 4))
        self.global_output = transposed(model.global_output)  # (D_G, D_E)
        self.decoder = CachedStack(model.decoder.layers, model.decoder.rope_theta, cfg.local_window, B, capacity)
        self.head = Head(model.decoder.norm, model.decoder.output)
        self.history = torch.zeros(B, capacity, dtype=torch.long, device=weight.device)  # ids so far
        self.is_start = torch.zeros(B, capacity, dtype=torch.bool, device=weight.device)  # b_t so far
        self.previous = None  # x_{t-1} (B, D_E)
        self.zbar = weight.new_zeros(B, cfg.local_dim)  # each row's current chunk output, smoothed
        self.n_chunks = [0] * B
        self.global_steps = 0

    @property
    def starts(self) -> list[torch.Tensor]:
        """Per position t = 0 .. t-2 so far: does t+1 start a chunk? (B,) bool each (sample.py --show-patches)."""
        return list(self.is_start[:, 1:self.t].T)

    def _make_room(self):
        if self.t < self.history.shape[1]:
            return
        double = lambda x: torch.cat([x, torch.zeros_like(x)], dim=1)  # noqa: E731
        self.history, self.is_start = double(self.history), double(self.is_start)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """token: (B,) id at position t. Returns next-byte logits (B, V) for position t+1."""
        if not torch.is_inference_mode_enabled():
            with torch.inference_mode():
                return self.step(token)
        t = self.t
        self._make_room()
        self.history[:, t] = token
        window = self.history[:, max(0, t + 1 - self.embed.N):t + 1]
        if window.shape[1] < self.embed.N:  # the first bytes: n-grams reach back before BOS, as zeros
            window = F.pad(window, (self.embed.N - window.shape[1], 0))
        x = self.encoder.step(self.embed(window), t)  # (B, D_E): x_t
        p = self.router.step(self.previous, x, token)  # (B,)
        b = p > 0.5
        self.is_start[:, t] = b
        rows = b.nonzero()[:, 0].tolist()
        if rows:  # these rows start a chunk at t: one global step each, on the state of its first byte
            chunks = x[rows] @ self.global_projection if self.global_projection is not None else x[rows]
            positions = [self.n_chunks[r] for r in rows]
            if len(rows) == self.B and len(set(positions)) == 1:
                out = self.global_model.step(chunks, positions[0])  # (R, D_G)
            else:
                out = self.global_model.step_rows(chunks, rows, positions)
            z = out @ self.global_output  # (R, D_E)
            P = p[rows].clamp(SMOOTHING_EPS, 1 - SMOOTHING_EPS)[:, None]  # (R, 1)
            self.zbar[rows] = P * z + (1 - P) * self.zbar[rows]
            for r in rows:
                self.n_chunks[r] += 1
            self.global_steps += len(rows)
        # upsampling: the confidence's straight-through value is exactly 1
        h = torch.addmm(self.zbar, x, self.residual)  # (B, D_E)
        self.previous = x
        self.t += 1
        return self.head(self.decoder.step(h, t))

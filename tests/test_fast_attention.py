"""The fast attention paths of layers.py against the dense masked reference `attend`, outputs and gradients
in float32: cross-attention that scores only the allowed pairs (decoder: a byte reads the k slots of one
patch; encoder: a patch's k queries read its own bytes) and sliding-window self-attention in blocks. Then
the same equality for a whole BLT, and the bf16 path."""
import pytest
import torch

import layers
from blt import BLT, BLTConfig
from decoder import decoder_patch_ids
from layers import (CrossAttention, KVCache, TransformerBlock, attend, attend_sliding_window, causal_mask,
                    few_allowed, mask_from_pairs, rope_cos_sin)
from patching import patch_ids_from_lengths, tokenize

ATOL = 1e-5


def ragged_lengths(B: int, T: int, seed: int, padding: int = 2) -> torch.Tensor:
    """Patch lengths (B, P) of a ragged batch: a BOS patch, random patches over bytes 1..T-1 and the
    next-byte slot (so the last patch may hold only the slot: a patch without bytes), right-padded with
    `padding` or more empty patches."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        lengths, left = [1], T
        while left:
            n = min(left, int(torch.randint(1, 7, (1,), generator=g)))
            lengths.append(n)
            left -= n
        rows.append(lengths)
    P = max(map(len, rows)) + padding
    return torch.tensor([r + [0] * (P - len(r)) for r in rows])


def encoder_mask(lengths: torch.Tensor, T: int, k: int) -> torch.Tensor:
    """(B, 1, P*k, T): query slot j of patch p (row p*k + j) may read the bytes of patch p."""
    ids = patch_ids_from_lengths(lengths, T)  # (B, T)
    query_patch = torch.arange(lengths.shape[1]).repeat_interleave(k)
    return (query_patch[None, :, None] == ids[:, None, :])[:, None]


def decoder_mask(lengths: torch.Tensor, T: int, k: int) -> torch.Tensor:
    """(B, 1, T, P*k): byte t may read the k slots of its decoder patch."""
    slot_patch = torch.arange(lengths.shape[1]).repeat_interleave(k)
    return (decoder_patch_ids(lengths, T)[:, :, None] == slot_patch[None, None, :])[:, None]


def outputs_and_grads(fn, module: torch.nn.Module, *inputs: torch.Tensor, seed: int = 0):
    """fn(*inputs) and the gradients of a random projection of it w.r.t. the inputs and the parameters."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*inputs)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * weights).sum(), inputs + params)
    assert all(torch.isfinite(g).all() for g in grads)
    return out, grads


def assert_same(fast, dense):
    (out_f, grads_f), (out_d, grads_d) = fast, dense
    torch.testing.assert_close(out_f, out_d, atol=ATOL, rtol=0)
    for g_f, g_d in zip(grads_f, grads_d):
        torch.testing.assert_close(g_f, g_d, atol=ATOL, rtol=0)


# ---- cross-attention ----

@pytest.mark.parametrize("k, heads", [(1, 1), (2, 2), (3, 4), (2, 8)])
def test_decoder_cross_attention_reads_k_slots_like_the_dense_mask(k, heads):
    torch.manual_seed(k * 10 + heads)
    B, T, D = 3, 23, 16
    lengths = ragged_lengths(B, T, seed=k)
    mask = decoder_mask(lengths, T, k)
    assert (mask.sum(-1) == k).all()  # the promise: every byte reads exactly the k slots of one patch
    cross = CrossAttention(D, heads)
    h, slots = torch.randn(B, T, D), torch.randn(B, lengths.shape[1] * k, D)
    fast = outputs_and_grads(lambda q, kv: cross(q, kv, mask, keys_per_query=k), cross, h, slots)
    dense = outputs_and_grads(lambda q, kv: cross(q, kv, mask), cross, h, slots)
    assert_same(fast, dense)


@pytest.mark.parametrize("k, heads", [(1, 1), (2, 2), (3, 4), (2, 8)])
def test_encoder_cross_attention_reads_own_bytes_like_the_dense_mask(k, heads):
    torch.manual_seed(k * 10 + heads)
    B, T, D = 3, 23, 16
    lengths = ragged_lengths(B, T, seed=k)
    mask = encoder_mask(lengths, T, k)  # (B, 1, P*k, T)
    empty = ~mask.any(-1)[:, 0]  # (B, P*k): slot-only and padding patches
    assert empty.any() and (mask.sum(-2) == k).all()  # every byte is read by the k queries of its patch
    cross = CrossAttention(D, heads)
    queries, h = torch.randn(B, lengths.shape[1] * k, D), torch.randn(B, T, D)
    fast = outputs_and_grads(lambda q, kv: cross(q, kv, mask, queries_per_key=k), cross, queries, h)
    dense = outputs_and_grads(lambda q, kv: cross(q, kv, mask), cross, queries, h)
    assert_same(fast, dense)
    # a query without bytes attends to nothing: the block returns the query itself (attention part 0)
    assert torch.equal(fast[0][empty], queries[empty])


def test_cross_attention_refuses_pairs_without_their_layout():
    cross = CrossAttention(16, 2)
    q, kv = torch.randn(1, 3, 16), torch.randn(1, 4, 16)
    pairs = (torch.zeros(1, 3, 1, dtype=torch.long), torch.ones(1, 3, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="exactly one of"):
        cross(q, kv, None, pairs=pairs)
    with pytest.raises(ValueError, match="a mask or the allowed pairs"):
        cross(q, kv, None, keys_per_query=1)


def test_a_mask_that_breaks_the_promise_gets_the_dense_path():
    torch.manual_seed(0)
    mask = torch.rand(2, 1, 7, 9) > 0.5
    mask[0, 0, 3] = True  # a query that may read all 9 keys
    assert few_allowed(mask[:, 0], 2) is None
    cross = CrossAttention(16, 2)
    q, kv = torch.randn(2, 7, 16), torch.randn(2, 9, 16)
    torch.testing.assert_close(cross(q, kv, mask, keys_per_query=2), cross(q, kv, mask), atol=ATOL, rtol=0)
    torch.testing.assert_close(cross(q, kv, mask, queries_per_key=2), cross(q, kv, mask), atol=ATOL, rtol=0)


def test_few_allowed_pads_short_rows_with_forbidden_columns():
    mask = torch.tensor([[True, False, False, True], [False, False, True, False], [False] * 4])
    index, allowed = few_allowed(mask, 2)
    assert allowed.tolist() == [[True, True], [True, False], [False, False]]
    assert set(index[0].tolist()) == {0, 3} and index[1, 0] == 2


def test_mask_from_pairs_inverts_few_allowed():
    torch.manual_seed(0)
    mask = torch.rand(3, 8, 11) > 0.75
    mask[0, 2] = False  # a row with nothing allowed
    n = int(mask.sum(-1).max())
    assert torch.equal(mask_from_pairs(*few_allowed(mask, n), 11), mask)
    assert torch.equal(mask_from_pairs(*few_allowed(mask, n + 2), 11), mask)  # padded with forbidden columns


EDGE_LENGTHS = {  # lengths summing to T (the Hugging Face convention, no next-byte slot): bytes with no patch to read
    "bos only, T = 1": ([[1]], 1),
    "a lone BOS row in a batch": ([[1, 4], [1, 0]], 5),
}


@pytest.mark.parametrize("k, case", [(1, None), (2, None), (3, None), (2, "bos only, T = 1"),
                                     (2, "a lone BOS row in a batch"), (3, "a lone BOS row in a batch")])
def test_encoder_and_decoder_list_exactly_the_pairs_of_their_masks(k, case, monkeypatch):
    """The encoder and decoder build no cross-attention mask: they list each byte's k queries (encoder) or
    k slots (decoder). Those lists must allow exactly what the masks of the paper allow (encoder_mask and
    decoder_mask above): on a ragged batch with padding patches and patches without bytes, and where a byte
    has no patch to read (decoder id -1): it must read nothing, not another row's slots."""
    model = small_blt(cross_attn_k=k)
    if case is None:
        B, T = 3, 23
        lengths = ragged_lengths(B, T, seed=k)
    else:
        rows, T = EDGE_LENGTHS[case]
        lengths = torch.tensor(rows)
        B = len(rows)
    seen = []
    forward = CrossAttention.forward

    def spy(self, queries, keys_values, mask, keys_per_query=None, queries_per_key=None, pairs=None):
        seen.append((self, keys_values.shape[1], queries.shape[1], keys_per_query, queries_per_key, pairs))
        return forward(self, queries, keys_values, mask, keys_per_query, queries_per_key, pairs)
    monkeypatch.setattr(CrossAttention, "forward", spy)
    model(torch.randint(0, 256, (B, T)), patch_lengths=lengths)
    encoder_calls = [c for c in seen if c[0] is model.encoder.cross_attn]
    decoder_calls = [c for c in seen if c[0] in list(model.decoder.cross_attn)]
    assert len(encoder_calls) == 1 and len(decoder_calls) == len(model.decoder.cross_attn)
    _, S, Q, per_query, per_key, pairs = encoder_calls[0]
    assert per_key == k and per_query is None and pairs[0].shape == (B, T, k)
    assert torch.equal(mask_from_pairs(*pairs, Q).transpose(1, 2), encoder_mask(lengths, T, k)[:, 0])
    for _, S, Q, per_query, per_key, pairs in decoder_calls:
        assert per_query == k and per_key is None and pairs[0].shape == (B, T, k)
        assert torch.equal(mask_from_pairs(*pairs, S), decoder_mask(lengths, T, k)[:, 0])


def test_a_byte_with_no_patch_to_read_stays_in_its_row():
    """Row 1 is a lone BOS (Hugging Face lengths): its bytes read no global output. Changing row 0's bytes
    must not move row 1's logits (a negative slot index would wrap into row 0's slots)."""
    model = small_blt(cross_attn_k=2)
    lengths = torch.tensor([[1, 4], [1, 0]])
    tokens = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(tokens, patch_lengths=lengths)
        other = tokens.clone()
        other[0] = (other[0] + 1) % 256
        assert torch.equal(model(other, patch_lengths=lengths)[1], base[1])


# ---- sliding-window self-attention ----

@pytest.mark.parametrize("window, T", [(4, 3), (4, 7), (3, 13), (4, 17), (4, 32), (8, 45)])
def test_sliding_window_blocks_match_dense(window, T):
    torch.manual_seed(window + T)
    q, k, v = torch.randn(3, 2, T, 8), torch.randn(3, 2, T, 8), torch.randn(3, 2, T, 8)
    pos = torch.arange(T)
    mask = causal_mask(pos, pos, window)

    def blocks(q, k, v):
        out = attend_sliding_window(q, k, v, mask, window)
        assert out is not None
        return out

    module = torch.nn.Module()  # no parameters
    dense = outputs_and_grads(lambda *x: attend(*x, mask), module, q, k, v)
    assert_same(outputs_and_grads(blocks, module, q, k, v), dense)


def test_sliding_window_blocks_honour_the_mask_inside_the_window():
    """The blocks cut their mask out of the given one: a per-row mask with holes inside the window (and a
    row with nothing allowed) gives the dense result."""
    torch.manual_seed(0)
    T, window = 21, 4
    q, k, v = torch.randn(2, 2, T, 8), torch.randn(2, 2, T, 8), torch.randn(2, 2, T, 8)
    pos = torch.arange(T)
    mask = causal_mask(pos, pos, window) & (torch.rand(2, 1, T, T) > 0.3)
    mask[1, 0, 5] = False
    torch.testing.assert_close(attend_sliding_window(q, k, v, mask, window), attend(q, k, v, mask),
                               atol=ATOL, rtol=0)


def test_sliding_window_refuses_a_mask_that_reaches_further():
    T = 20
    pos = torch.arange(T)
    q = torch.randn(1, 1, T, 8)
    # blocks of 4 hold every key of a window of 4, even 5; a window of 6 reaches before the previous block
    assert attend_sliding_window(q, q, q, causal_mask(pos, pos, 5), 4) is not None
    assert attend_sliding_window(q, q, q, causal_mask(pos, pos, 6), 4) is None
    assert attend_sliding_window(q, q, q, causal_mask(pos, pos), 4) is None


@pytest.mark.parametrize("window", [2, 5])
def test_block_with_window_matches_dense_block_and_kv_cache(window):
    """TransformerBlock(window=w) takes the blocked path for T > 4w; it equals the dense block (outputs and
    gradients), and the KV-cache path (one position at a time, as in sample.py) is unchanged."""
    torch.manual_seed(window)
    T = 4 * window + 7
    blocked, dense = TransformerBlock(32, 4, 64, window=window), TransformerBlock(32, 4, 64)
    dense.load_state_dict(blocked.state_dict())
    pos = torch.arange(T)
    cos, sin = rope_cos_sin(pos, 8, 10000.0)
    mask = causal_mask(pos, pos, window)
    x = torch.randn(2, T, 32)
    full = outputs_and_grads(lambda x: blocked(x, mask, cos, sin), blocked, x)
    assert_same(full, outputs_and_grads(lambda x: dense(x, mask, cos, sin), dense, x))
    cache = KVCache(window)
    with torch.no_grad():
        steps = [blocked(x[:, t:t + 1], None, cos[t:t + 1], sin[t:t + 1], cache, pos[t:t + 1]) for t in range(T)]
    torch.testing.assert_close(torch.cat(steps, 1), full[0].detach(), atol=ATOL, rtol=0)


def test_long_causal_attention_in_halves_matches_dense(monkeypatch):
    """From layers.HALVES_FROM positions, causal self-attention runs as two halves (the first half of the
    queries against the first half of the keys): outputs and gradients equal the one dense call. A mask that
    lets the first half read the second (not causal) gets the dense call."""
    torch.manual_seed(0)
    T = layers.HALVES_FROM + 7  # odd: the halves differ in length
    block = TransformerBlock(32, 4, 64)
    pos = torch.arange(T)
    cos, sin = rope_cos_sin(pos, 8, 10000.0)
    x = torch.randn(2, T, 32)
    calls = []
    monkeypatch.setattr(layers, "attend_sliding_window",
                        lambda *args: calls.append(args[-1]) or attend_sliding_window(*args))
    for mask in (causal_mask(pos, pos), torch.rand(1, 1, T, T) > 0.3):
        halves = outputs_and_grads(lambda x: block(x, mask, cos, sin), block, x)
        with monkeypatch.context() as m:
            m.setattr(layers, "HALVES_FROM", 10 ** 9)
            assert_same(halves, outputs_and_grads(lambda x: block(x, mask, cos, sin), block, x))
    assert calls == [-(-T // 2)] * 2  # both masks were offered to the halves, the random one refused there


def test_skipping_the_empty_row_pass_changes_nothing(monkeypatch):
    """attend and attend_few_keys skip their zeroing pass when no query is empty (layers.not_any, CPU eager):
    the same outputs as with the pass, and a query with nothing allowed still gets 0."""
    torch.manual_seed(0)
    q, kv = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    pos = torch.arange(6)
    holed = causal_mask(pos, pos).expand(2, 1, 6, 6).clone()
    holed[1, 0, 3] = False  # query 3 of row 1 may read nothing
    qb, kb = torch.randn(2, 5, 2, 8), torch.randn(2, 7, 2, 8)
    index = torch.randint(0, 7, (2, 5, 3))
    full, some = torch.ones(2, 5, 3, dtype=torch.bool), torch.rand(2, 5, 3) > 0.3
    some[0, 2] = False  # byte 2 of row 0 reads no key
    runs = []
    for skipping in (True, False):
        if not skipping:
            monkeypatch.setattr(layers, "not_any", lambda flags: False)
        runs.append([attend(q, kv, kv, causal_mask(pos, pos)), attend(q, kv, kv, holed),
                     layers.attend_few_keys(qb, kb, kb, index, full), layers.attend_few_keys(qb, kb, kb, index, some)])
    for skipped, masked in zip(*runs):
        torch.testing.assert_close(skipped, masked, atol=0, rtol=0)
    assert torch.all(runs[0][1][1, :, 3] == 0) and torch.all(runs[0][3][0, 2] == 0)


# ---- the whole model ----

def small_blt(**overrides) -> BLT:
    torch.manual_seed(0)
    cfg = dict(patching="space", entropy_dim=32, entropy_layers=1, entropy_heads=2, local_dim=32, local_heads=2,
               encoder_layers=1, decoder_layers=2, local_window=4, hash_buckets=64, global_dim=48, global_layers=2,
               global_heads=2, multiple_of=16)
    return BLT(BLTConfig(**{**cfg, **overrides}))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_whole_model_fast_paths_match_dense(k, monkeypatch):
    """BLT with every fast path (few-pair cross-attention, sliding-window blocks: T = 30 > 4 * window) against
    the same weights with dense attention everywhere, on a ragged batch with padding patches."""
    model = small_blt(cross_attn_k=k)
    rows = [b"a b c d e f g h i j k l m n op", b"abcdefghijklmnopqrstuvwxyz1234"]  # 30 bytes each
    tokens = torch.tensor([tokenize(r) for r in rows])[:, :-1]
    targets = torch.tensor([tokenize(r) for r in rows])[:, 1:]
    lengths = model.patch(tokens)
    assert (lengths[1] == 0).any()  # row 1 has fewer patches: padding

    def run():
        logits, loss = model(tokens, targets, patch_lengths=lengths)
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        return logits, grads

    fast = run()
    monkeypatch.setattr(layers, "attend_few_keys", lambda *args: None)  # the dense path, its mask from the pairs
    monkeypatch.setattr(layers, "attend_few_queries", lambda *args: None)
    monkeypatch.setattr(layers, "attend_sliding_window", lambda *args: None)
    assert_same(fast, run())


# ---- bf16 ----

def test_bf16_training_attention_matches_float32():
    """In bf16 with gradients on CPU, `attend` runs the explicit matmul-softmax path: close to float32, and
    a query with nothing allowed still gets 0 and finite gradients."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 9, 16), torch.randn(2, 2, 11, 16), torch.randn(2, 2, 11, 16)
    mask = torch.rand(2, 1, 9, 11) > 0.4
    mask[0, 0, 4] = False
    want = attend(q, k, v, mask)
    q16, k16, v16 = (x.bfloat16().requires_grad_() for x in (q, k, v))
    got = attend(q16, k16, v16, mask)
    assert got.dtype == torch.bfloat16 and torch.all(got[0, :, 4] == 0)
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)
    got.float().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q16, k16, v16))


def test_no_float32_round_trips_under_bf16_autocast():
    """Under bf16 autocast the RoPE tables, the normed activations and the rotated queries are bf16."""
    block = TransformerBlock(32, 4, 64)
    x = torch.randn(2, 10, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos, sin = rope_cos_sin(torch.arange(10), 8, 10000.0, layers.compute_dtype(x))
        assert cos.dtype == sin.dtype == torch.bfloat16
        normed = block.attention_norm(x)
        assert normed.dtype == torch.bfloat16
        q = block.attention.wq(normed).view(2, 10, 1, 4, 8)  # (B, T, n, H, Dh)
        assert layers.apply_rope(q, cos, sin).dtype == torch.bfloat16
    assert layers.compute_dtype(x) == torch.float32

"""The decoder's one-patch shift and its cross-attention mask (paper §3.3). Byte i predicts byte i+1, so it may
read only global outputs of patches that are complete at i. Every test here grades lesson 6
(exercises.md, `python -m pytest -m lesson6`) and uses the decoder alone; the causality test of the whole model,
also lesson 6, is in tests/test_model.py."""
import pytest
import torch

from blt import cpu_tiny
from decoder import LocalDecoder, decoder_patch_ids
from layers import mask_from_pairs
from patching import patch_ids_from_lengths

pytestmark = pytest.mark.lesson6


def complete_patch_reference(lengths: list[int], seq_len: int) -> list[int]:
    """For each byte i, the last patch that is complete at i (its last position <= i). Padding patches
    (length 0) do not count. Lengths include the next-byte slot, so they sum to seq_len + 1."""
    ends, pos = [], 0
    for n in lengths:
        if n > 0:
            pos += n
            ends.append(pos - 1)  # last position of the patch
    return [sum(end <= i for end in ends) - 1 for i in range(seq_len)]


def test_worked_example():
    # patches {0} {1,2,3} {4,5,6,7} {8 = next-byte slot}: byte 3 closes patch 1, byte 7 closes patch 2
    assert decoder_patch_ids(torch.tensor([[1, 3, 4, 1]]), 8).tolist() == [[0, 0, 0, 1, 1, 1, 1, 2]]


def test_matches_complete_patch_reference_on_ragged_batches():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        T = int(torch.randint(2, 30, (1,), generator=g))
        rows = []
        for _ in range(3):
            lengths, left = [1], T  # BOS is a patch of its own; T more positions (bytes 1..T-1 and the slot)
            while left:
                n = min(left, int(torch.randint(1, 6, (1,), generator=g)))
                lengths.append(n)
                left -= n
            rows.append(lengths)
        P = max(map(len, rows))
        batch = torch.tensor([r + [0] * (P - len(r)) for r in rows])  # right-padded
        got = decoder_patch_ids(batch, T)
        assert got.shape == (3, T)
        for b, r in enumerate(rows):
            assert got[b].tolist() == complete_patch_reference(r, T), (r, T)


def small_decoder(k: int = 2) -> LocalDecoder:
    torch.manual_seed(0)
    cfg = cpu_tiny(local_dim=16, local_heads=2, decoder_layers=2, global_dim=24, cross_attn_k=k, multiple_of=16)
    return LocalDecoder(cfg).eval()


@torch.no_grad()
@pytest.mark.parametrize("k", [1, 2, 3])
def test_cross_attention_mask(k):
    """Byte i attends to the k slots of global output dec_ids[i] and to nothing else. Slot j of o_p is key
    p*k + j (the layout of `slots` in LocalDecoder.forward). The decoder lists those pairs (keys_per_query,
    pairs) instead of building the mask; as a mask they must be exactly this one."""
    dec = small_decoder(k)
    lengths = torch.tensor([[1, 3, 4, 1], [1, 2, 5, 1]])
    dec_ids = decoder_patch_ids(lengths, 8)
    seen = []
    dec.cross_attn[0].register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
    logits = dec(torch.randn(2, 8, 16), torch.randn(2, 4, 24), dec_ids, torch.arange(8))
    assert logits.shape == (2, 8, 260)
    slot_patch = torch.arange(4 * k) // k  # (P*k,)
    want = dec_ids[:, :, None] == slot_patch[None, None, :]  # (B, T, P*k)
    assert seen[0]["keys_per_query"] == k
    assert torch.equal(mask_from_pairs(*seen[0]["pairs"], 4 * k), want)


@torch.no_grad()
def test_global_output_reaches_bytes_from_the_first_reader_on():
    dec = small_decoder()
    h, out = torch.randn(1, 8, 16), torch.randn(1, 4, 24)
    lengths = torch.tensor([[1, 3, 4, 1]])
    dec_ids = decoder_patch_ids(lengths, 8)  # [0, 0, 0, 1, 1, 1, 1, 2]
    base = dec(h, out, dec_ids, torch.arange(8))
    for p, first_reader in [(0, 0), (1, 3), (2, 7)]:
        moved = out.clone()
        moved[0, p] += torch.randn(24)
        diff = (dec(h, moved, dec_ids, torch.arange(8)) - base).abs().amax(-1)[0]  # (T,)
        if first_reader:
            assert diff[:first_reader].max() <= 1e-6, f"o_{p} read before byte {first_reader}"
        assert diff[first_reader] > 1e-4, f"o_{p} not read by byte {first_reader}"
    moved = out.clone()
    moved[0, 3] += 1.0  # o_3 ends with the next-byte slot: no byte may read it
    assert torch.equal(dec(h, moved, dec_ids, torch.arange(8)), base)


@torch.no_grad()
def test_decoder_is_causal_with_a_causal_global_model():
    """The causality test at the decoder's level. A stand-in for encoder + global model: o_j sums byte
    vectors over patches 0..j, so, like the real global model, it has seen ALL of patch j. Changing byte j
    must leave the logits before j alone. Reading the patch that holds byte i (no shift) leaks."""
    dec = small_decoder()
    g = torch.Generator().manual_seed(1)
    byte_state, byte_global = torch.randn(260, 16, generator=g), torch.randn(260, 24, generator=g)
    T = 20
    lengths = torch.tensor([[1, 3, 2, 5, 4, 3, 3]])  # 21 = 20 bytes + the next-byte slot
    patch_ids = patch_ids_from_lengths(lengths, T)

    def logits(tokens, ids_for_decoder):
        per_patch = torch.zeros(1, 7, 24).index_add_(1, patch_ids[0], byte_global[tokens])  # (1, P, D_G)
        return dec(byte_state[tokens], per_patch.cumsum(dim=1), ids_for_decoder, torch.arange(T))

    tokens = torch.randint(4, 260, (1, T), generator=g)
    for ids, should_leak in [(decoder_patch_ids(lengths, T), False), (patch_ids, True)]:
        base, leak = logits(tokens, ids), 0.0
        for j in range(1, T):
            moved = tokens.clone()
            moved[0, j] = 4 + (tokens[0, j] - 4 + 101) % 256
            leak = max(leak, (logits(moved, ids)[:, :j] - base[:, :j]).abs().max().item())
        assert (leak > 1e-3) if should_leak else (leak <= 1e-5), leak


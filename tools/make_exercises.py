"""Course-assignment kit: a student version of this repository, in the spirit of minbpe's exercise.md.

The core of each concept sits between two comment lines in the source, one at each end:

    # --- solution: stage 2: global and monotonic entropy rules (paper §2.3, eq. 4) ---
    ...reference code...
    # --- end solution ---

The student version replaces every such region by one line at the same indentation,

    raise NotImplementedError("stage 2: global and monotonic entropy rules — see paper §2.3, eq. 4")

and keeps everything else: signatures, docstrings, the code around a region, every other file. exercises.md
is the guide; `python -m pytest -m stageN` grades stage N (the tests marked `@pytest.mark.stageN`).

    python tools/make_exercises.py --student OUT           # every stage stripped
    python tools/make_exercises.py --student OUT --stage 3 # only stage 3 (repeatable: hand out one stage at a time)
    python tools/make_exercises.py --teacher OUT           # an unchanged copy, this kit included
    python tools/make_exercises.py --check                 # list the regions; exit 1 on a malformed marker

The files copied are git's tracked and untracked-but-not-ignored files (`git ls-files`); without git, the
tree minus .git, data/, out/, runs/ and caches. The student version leaves out this script and its CI test
(tests/test_exercises.py), which only make sense next to the solutions.
"""
import argparse
import ast
import io
import os
import re
import shutil
import subprocess
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere: the paper modules live at the top of the repository


STAGES = range(1, 9)  # exercises.md: 1 entropy ... 7 bits per byte, 8 the training loop
KIT_FILES = {"tools/make_exercises.py", "tests/test_exercises.py"}  # left out of student versions
# without git, the files to skip
SKIP_TOP = {"data", "out", "runs"}  # top-level folders
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache"}  # folders anywhere
SKIP_SUFFIXES = {".pyc", ".pt"}

START = re.compile(r"# --- solution: stage (?P<stage>\d+): (?P<what>.+) \((?P<ref>paper [^()]+)\) ---")
END = re.compile(r"# --- end solution ---")
ANY_MARKER = re.compile(r"---\s*(end )?solution")


class MarkerError(ValueError):
    pass


@dataclass
class Region:
    path: str  # relative to the repository root
    stage: int
    first: int  # line numbers (1-based) of the start and end markers
    last: int
    indent: str
    what: str  # what to implement
    ref: str  # "paper §2.3, eq. 4"
    function: str  # qualified name of the enclosing function

    @property
    def hint(self) -> str:
        return f"stage {self.stage}: {self.what} — see {self.ref}"

    def replacement(self) -> str:
        return f'{self.indent}raise NotImplementedError("{self.hint}")\n'


def _functions(source: str) -> list[tuple[int, int, str]]:
    """(first line, last line, qualified name) of every function, outer ones first."""
    out = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    out.append((child.lineno, child.end_lineno, name))
                visit(child, name + ".")
    visit(ast.parse(source), "")
    return out


def find_regions(source: str, path: str = "<source>") -> list[Region]:
    """The solution regions of one Python source. Markers are real comments on lines of their own (a marker
    inside a string is text, not a marker). Raises MarkerError on anything malformed."""
    lines = source.splitlines(keepends=True)
    regions, open_start = [], None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT or not ANY_MARKER.search(tok.string):
            continue
        row, col = tok.start
        where = f"{path}:{row}"
        if lines[row - 1][:col].strip():
            raise MarkerError(f"{where}: a marker must be alone on its line")
        start, end = START.fullmatch(tok.string.rstrip()), END.fullmatch(tok.string.rstrip())
        if start:
            if open_start is not None:
                raise MarkerError(f"{where}: solution region opened inside the one at line {open_start[0]}")
            stage = int(start["stage"])
            if stage not in STAGES:
                raise MarkerError(f"{where}: stage {stage} is not one of {STAGES.start}..{STAGES.stop - 1}")
            if '"' in tok.string or "\\" in tok.string:
                raise MarkerError(f"{where}: no quotes or backslashes in a marker (it becomes a string)")
            open_start = (row, lines[row - 1][:col], stage, start["what"], start["ref"])
        elif end:
            if open_start is None:
                raise MarkerError(f"{where}: end of a solution region that was never opened")
            first, indent, stage, what, ref = open_start
            if lines[row - 1][:col] != indent:
                raise MarkerError(f"{where}: end marker indented differently from its start at line {first}")
            if row == first + 1:
                raise MarkerError(f"{where}: empty solution region")
            regions.append(Region(path, stage, first, row, indent, what, ref, ""))
            open_start = None
        else:
            raise MarkerError(f"{where}: malformed marker {tok.string!r}; expected "
                              "'# --- solution: stage N: WHAT (paper §X, eq. Y) ---' or '# --- end solution ---'")
    if open_start is not None:
        raise MarkerError(f"{path}:{open_start[0]}: solution region never closed")
    functions = _functions(source)
    for r in regions:
        # the end marker may follow the function's last statement, which is where the AST says it ends
        enclosing = [name for lo, hi, name in functions if lo < r.first and r.last - 1 <= hi]
        if not enclosing:
            raise MarkerError(f"{path}:{r.first}: a solution region must sit inside a function body")
        r.function = enclosing[-1]  # the innermost
    return regions


def strip_source(source: str, regions: list[Region], stages=None) -> str:
    """Replace each region of the chosen stages (all if None) by its `raise NotImplementedError(hint)`."""
    lines = source.splitlines(keepends=True)
    for r in sorted(regions, key=lambda r: r.first, reverse=True):
        if stages is None or r.stage in stages:
            lines[r.first - 1:r.last] = [r.replacement()]
    return "".join(lines)


def repo_files(root: Path = ROOT) -> list[str]:
    """Paths (relative, '/'-separated) of the files to copy."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout.decode()
        files = [f for f in out.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not (folder == str(root) and d in SKIP_TOP))
            rel = Path(folder).relative_to(root)
            files += [(rel / n).as_posix() for n in names if Path(n).suffix not in SKIP_SUFFIXES]
    return sorted(f for f in files if (root / f).is_file())  # tracked files deleted in the worktree drop out


def _ignored_by_git(path: Path, root: Path) -> bool:
    try:
        return subprocess.run(["git", "-C", str(root), "check-ignore", "-q", str(path.resolve())],
                              capture_output=True).returncode == 0
    except OSError:
        return False


def all_regions(root: Path = ROOT) -> list[Region]:
    regions = []
    for f in repo_files(root):
        if f.endswith(".py") and f not in KIT_FILES:
            regions += find_regions((root / f).read_text(encoding="utf-8"), f)
    return regions


def make_copy(out: Path, student: bool, stages=None, root: Path = ROOT) -> list[Region]:
    """Copy the repository to `out` (which must be empty or absent). student: strip the regions of `stages`
    (all if None) and leave out the kit. Returns the regions stripped."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    if out.resolve().is_relative_to(root.resolve()) and not _ignored_by_git(out, root):
        raise FileExistsError(f"{out} is inside the repository, so the next copy would copy it too; write it "
                              "elsewhere or under an ignored folder such as out/")
    files = repo_files(root)
    by_file: dict[str, list[Region]] = {}
    for r in all_regions(root):
        by_file.setdefault(r.path, []).append(r)
    if student and stages is not None:
        missing = sorted(set(stages) - {r.stage for rs in by_file.values() for r in rs})
        if missing:
            raise MarkerError(f"no solution region for stage(s) {missing}")
    stripped = []
    for f in files:
        if student and f in KIT_FILES:
            continue
        src, dst = root / f, out / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        if student and f in by_file:
            text = src.read_text(encoding="utf-8")
            new = strip_source(text, by_file[f], stages)
            compile(new, f, "exec")  # the student version must stay importable
            dst.write_text(new, encoding="utf-8")
            stripped += [r for r in by_file[f] if stages is None or r.stage in stages]
        else:
            shutil.copyfile(src, dst)
        shutil.copymode(src, dst)
    return stripped


def check(root: Path = ROOT) -> list[Region]:
    """Every marker well formed, every stage has a region, the fully stripped sources compile."""
    regions = all_regions(root)
    missing = sorted(set(STAGES) - {r.stage for r in regions})
    if missing:
        raise MarkerError(f"no solution region for stage(s) {missing}")
    for path in sorted({r.path for r in regions}):
        text = (root / path).read_text(encoding="utf-8")
        compile(strip_source(text, [r for r in regions if r.path == path]), path, "exec")
    return regions


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Make the student (solutions stripped) or teacher (unchanged) version "
                                "of this repository for the course assignments in exercises.md.")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--student", metavar="OUT_DIR", help="write the student version to OUT_DIR")
    mode.add_argument("--teacher", metavar="OUT_DIR", help="write an unchanged copy to OUT_DIR")
    mode.add_argument("--check", action="store_true", help="list the solution regions and check the markers")
    p.add_argument("--stage", type=int, action="append", choices=list(STAGES), metavar="N",
                   help="strip only stage N (repeatable; default: every stage)")
    args = p.parse_args(argv)
    if args.stage and not args.student:
        p.error("--stage goes with --student")
    try:
        if args.check:
            for r in sorted(check(), key=lambda r: (r.stage, r.path, r.first)):
                print(f"stage {r.stage}  {r.path}:{r.first}-{r.last}  {r.function}  ({r.ref})")
            return 0
        if args.teacher:
            make_copy(Path(args.teacher), student=False)
            print(f"teacher version (unchanged) in {args.teacher}")
            return 0
        stripped = make_copy(Path(args.student), student=True, stages=args.stage)
        stages = sorted({r.stage for r in stripped})
        print(f"student version in {args.student}: {len(stripped)} regions stripped, stages {stages}; "
              f"grade a stage with `python -m pytest -m stageN` there (see exercises.md)")
        return 0
    except (MarkerError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

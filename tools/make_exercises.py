"""Course-assignment kit: a student version of this repository, in the spirit of minbpe's exercise.md.

The core of each concept sits between two comment lines in the source, one at each end:

    # --- solution: lesson 2: global and monotonic entropy rules (paper §2.3, eq. 4) ---
    ...reference code...
    # --- end solution ---

The student version replaces every such region by one line at the same indentation,

    raise NotImplementedError("lesson 2: global and monotonic entropy rules — see paper §2.3, eq. 4")

and keeps everything else: signatures, docstrings, the code around a region, every other file. exercises.md
is the guide, and its lesson table is the one list of lessons (number, points, expected time) that this kit
and the grader (tools/grade.py) read; `python -m pytest -m lessonN` grades lesson N (the tests marked
`@pytest.mark.lessonN`).

    python tools/make_exercises.py --student OUT             # every lesson stripped
    python tools/make_exercises.py --student OUT --lesson 3  # only lesson 3 (repeatable: one lesson at a time)
    python tools/make_exercises.py --student OUT --hints brief  # less help in the guide: full (default), brief, none
    python tools/make_exercises.py --teacher OUT             # an unchanged copy, this kit included
    python tools/make_exercises.py --check                   # list the regions; exit 1 on a malformed marker

The files copied are git's tracked and untracked-but-not-ignored files (`git ls-files`); without git, the
tree minus .git, data/, out/, runs/ and caches. The student version leaves out this script, the grader, their
tests and the hidden tests (KIT_FILES), and in its Markdown files the teacher blocks, the hint blocks above the
chosen level, and the table rows that link to a file it leaves out:

    <!-- teacher -->  ...  <!-- end teacher -->        only in the teacher's copy
    <!-- hints: full -->  ...  <!-- end hints -->      kept with --hints full (brief: with brief and full)
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

GUIDE = "exercises.md"
HINT_LEVELS = ("none", "brief", "full")  # least to most; the guide's hint blocks are kept from their level up
# left out of student versions: this kit, the grader, its tests and the hidden tests (folders end with "/")
KIT_FILES = ("tools/make_exercises.py", "tools/grade.py", "tests/test_exercises.py", "hidden_tests/")
# without git, the files to skip
SKIP_TOP = {"data", "out", "runs"}  # top-level folders
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache"}  # folders anywhere
SKIP_SUFFIXES = {".pyc", ".pt"}

START = re.compile(r"# --- solution: lesson (?P<lesson>\d+): (?P<what>.+) \((?P<ref>paper [^()]+)\) ---")
END = re.compile(r"# --- end solution ---")
ANY_MARKER = re.compile(r"---\s*(end )?solution")
# a row of the guide's lesson table: | lesson | concept | what you write | paper | points | time | graded by |
LESSON_ROW = re.compile(r"\| (?P<number>\d+) \| (?P<concept>[^|]+) \|[^|]+\|[^|]+\| (?P<points>\d+) \| "
                        r"(?P<minutes>\d+) min \| `python -m pytest -m lesson(?P=number)` \|")


@dataclass(frozen=True)
class Lesson:
    number: int
    concept: str
    points: int
    minutes: int  # expected time for a student


def read_lessons(root: Path = ROOT) -> list[Lesson]:
    """The lessons of the guide's table, in order. Adding a lesson is a row there, a `lessonN` marker in
    pytest.ini, a solution region and the tests marked with it."""
    lessons = [Lesson(int(m["number"]), m["concept"].strip(), int(m["points"]), int(m["minutes"]))
               for m in LESSON_ROW.finditer((root / GUIDE).read_text(encoding="utf-8"))]
    if [x.number for x in lessons] != list(range(1, len(lessons) + 1)):
        raise MarkerError(f"{GUIDE}: the lesson table must number its lessons 1, 2, ...; found "
                          f"{[x.number for x in lessons]}")
    return lessons


def is_kit_file(path: str) -> bool:
    return any(path == k or (k.endswith("/") and path.startswith(k)) for k in KIT_FILES)


class MarkerError(ValueError):
    pass


LESSONS = [x.number for x in read_lessons()]  # 1, 2, ...: the rows of the guide's lesson table


@dataclass
class Region:
    path: str  # relative to the repository root
    lesson: int
    first: int  # line numbers (1-based) of the start and end markers
    last: int
    indent: str
    what: str  # what to implement
    ref: str  # "paper §2.3, eq. 4"
    function: str  # qualified name of the enclosing function

    @property
    def hint(self) -> str:
        return f"lesson {self.lesson}: {self.what} — see {self.ref}"

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
            lesson = int(start["lesson"])
            if lesson not in LESSONS:
                raise MarkerError(f"{where}: lesson {lesson} is not one of {LESSONS[0]}..{LESSONS[-1]} ({GUIDE})")
            if '"' in tok.string or "\\" in tok.string:
                raise MarkerError(f"{where}: no quotes or backslashes in a marker (it becomes a string)")
            open_start = (row, lines[row - 1][:col], lesson, start["what"], start["ref"])
        elif end:
            if open_start is None:
                raise MarkerError(f"{where}: end of a solution region that was never opened")
            first, indent, lesson, what, ref = open_start
            if lines[row - 1][:col] != indent:
                raise MarkerError(f"{where}: end marker indented differently from its start at line {first}")
            if row == first + 1:
                raise MarkerError(f"{where}: empty solution region")
            regions.append(Region(path, lesson, first, row, indent, what, ref, ""))
            open_start = None
        else:
            raise MarkerError(f"{where}: malformed marker {tok.string!r}; expected "
                              "'# --- solution: lesson N: WHAT (paper §X, eq. Y) ---' or '# --- end solution ---'")
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


def strip_source(source: str, regions: list[Region], lessons=None) -> str:
    """Replace each region of the chosen lessons (all if None) by its `raise NotImplementedError(hint)`."""
    lines = source.splitlines(keepends=True)
    for r in sorted(regions, key=lambda r: r.first, reverse=True):
        if lessons is None or r.lesson in lessons:
            lines[r.first - 1:r.last] = [r.replacement()]
    return "".join(lines)


BLOCK = re.compile(r"^<!-- (?:(?P<teacher>teacher)|hints: (?P<level>\w+)) -->\n(?P<body>.*?)"
                   r"^<!-- end (?P<end>teacher|hints) -->\n", re.M | re.S)
LINK = re.compile(r"\]\((?!https?:|#|mailto:)(?P<target>[^)#\s]+)")


def student_markdown(text: str, hints: str = "full", left_out=is_kit_file, path: str = GUIDE) -> str:
    """A Markdown file as the student version shows it: teacher blocks dropped, hint blocks kept from their
    level up (their marker lines dropped), table rows that link to a left-out file dropped. Raises MarkerError
    on an unknown level, a stray marker, or a link to a left-out file outside a table row."""
    if hints not in HINT_LEVELS:
        raise MarkerError(f"unknown hint level {hints!r}; choose one of {', '.join(HINT_LEVELS)}")

    def block(m):
        kind = "teacher" if m["teacher"] else "hints"
        if m["end"] != kind:
            raise MarkerError(f"{path}: a {kind} block closed by '<!-- end {m['end']} -->'")
        if m["teacher"]:
            return ""
        if m["level"] not in HINT_LEVELS:
            raise MarkerError(f"{path}: unknown hint level {m['level']!r}")
        return m["body"] if HINT_LEVELS.index(hints) >= HINT_LEVELS.index(m["level"]) else ""
    out = BLOCK.sub(block, text)
    if out != text:
        out = re.sub(r"\n{3,}", "\n\n", out)  # a dropped block leaves the blank lines on either side
    if re.search(r"<!-- (teacher|end teacher|hints:|end hints)", out):
        raise MarkerError(f"{path}: a teacher or hints marker without its pair (or nested)")
    folder = Path(path).parent
    lines = []
    for line in out.splitlines(keepends=True):
        targets = [os.path.normpath(folder / m["target"]).replace(os.sep, "/") for m in LINK.finditer(line)]
        if any(left_out(t) or left_out(t + "/") for t in targets):
            if line.startswith("|"):
                continue  # a table row about a left-out file (the README's file map)
            raise MarkerError(f"{path}: links to a file the student version leaves out: {line.strip()}")
        lines.append(line)
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
        if f.endswith(".py") and not is_kit_file(f):
            regions += find_regions((root / f).read_text(encoding="utf-8"), f)
    return regions


def make_copy(out: Path, student: bool, lessons=None, root: Path = ROOT, hints: str = "full") -> list[Region]:
    """Copy the repository to `out` (which must be empty or absent). student: strip the regions of `lessons`
    (all if None), leave out the kit, and show the Markdown files as student_markdown does with `hints`.
    Returns the regions stripped."""
    out = Path(out)
    if hints not in HINT_LEVELS:
        raise MarkerError(f"unknown hint level {hints!r}; choose one of {', '.join(HINT_LEVELS)}")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    if out.resolve().is_relative_to(root.resolve()) and not _ignored_by_git(out, root):
        raise FileExistsError(f"{out} is inside the repository, so the next copy would copy it too; write it "
                              "elsewhere or under an ignored folder such as out/")
    files = repo_files(root)
    by_file: dict[str, list[Region]] = {}
    for r in all_regions(root):
        by_file.setdefault(r.path, []).append(r)
    if student and lessons is not None:
        missing = sorted(set(lessons) - {r.lesson for rs in by_file.values() for r in rs})
        if missing:
            raise MarkerError(f"no solution region for lesson(s) {missing}")
    stripped = []
    for f in files:
        if student and is_kit_file(f):
            continue
        src, dst = root / f, out / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        if student and f in by_file:
            text = src.read_text(encoding="utf-8")
            new = strip_source(text, by_file[f], lessons)
            compile(new, f, "exec")  # the student version must stay importable
            dst.write_text(new, encoding="utf-8")
            stripped += [r for r in by_file[f] if lessons is None or r.lesson in lessons]
        elif student and f.endswith(".md"):
            dst.write_text(student_markdown(src.read_text(encoding="utf-8"), hints, path=f), encoding="utf-8")
        else:
            shutil.copyfile(src, dst)
        shutil.copymode(src, dst)
    return stripped


def check(root: Path = ROOT) -> list[Region]:
    """Every marker well formed, every lesson has a region, the fully stripped sources compile, and the
    Markdown files make a student version at every hint level."""
    regions = all_regions(root)
    missing = sorted(set(LESSONS) - {r.lesson for r in regions})
    if missing:
        raise MarkerError(f"no solution region for lesson(s) {missing}")
    for path in sorted({r.path for r in regions}):
        text = (root / path).read_text(encoding="utf-8")
        compile(strip_source(text, [r for r in regions if r.path == path]), path, "exec")
    for f in repo_files(root):
        if f.endswith(".md") and not is_kit_file(f):
            for level in HINT_LEVELS:
                student_markdown((root / f).read_text(encoding="utf-8"), level, path=f)
    return regions


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Make the student (solutions stripped) or teacher (unchanged) version "
                                "of this repository for the course lessons in exercises.md.")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--student", metavar="OUT_DIR", help="write the student version to OUT_DIR")
    mode.add_argument("--teacher", metavar="OUT_DIR", help="write an unchanged copy to OUT_DIR")
    mode.add_argument("--check", action="store_true", help="list the solution regions and check the markers")
    p.add_argument("--lesson", type=int, action="append", choices=LESSONS, metavar="N",
                   help="strip only lesson N (repeatable; default: every lesson)")
    p.add_argument("--hints", choices=HINT_LEVELS, default="full",
                   help="how much of the guide's help the student version keeps (default: full)")
    args = p.parse_args(argv)
    if args.lesson and not args.student:
        p.error("--lesson goes with --student")
    if args.hints != "full" and not args.student:
        p.error("--hints goes with --student")
    try:
        if args.check:
            for r in sorted(check(), key=lambda r: (r.lesson, r.path, r.first)):
                print(f"lesson {r.lesson}  {r.path}:{r.first}-{r.last}  {r.function}  ({r.ref})")
            return 0
        if args.teacher:
            make_copy(Path(args.teacher), student=False)
            print(f"teacher version (unchanged) in {args.teacher}")
            return 0
        stripped = make_copy(Path(args.student), student=True, lessons=args.lesson, hints=args.hints)
        lessons = sorted({r.lesson for r in stripped})
        print(f"student version in {args.student}: {len(stripped)} regions stripped, lessons {lessons}, "
              f"{args.hints} hints; grade a lesson with `python -m pytest -m lessonN` there (see exercises.md)")
        return 0
    except (MarkerError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""Grade a student's copy of the course (exercises.md): every lesson's tests, visible and hidden, and a score table.

    python tools/grade.py STUDENT_DIR                     # the table
    python tools/grade.py STUDENT_DIR --json result.json  # ... and the result for an autograder (`--json -`: stdout)
    python tools/grade.py STUDENT_DIR --lesson 3          # only lesson 3 (repeatable)

The student's files are copied into a scratch folder (the student's copy is only read), with this repository's
tests/, pytest.ini and hidden tests (hidden_tests/) in place of the student's tests: a student's edits to the
tests do not count, only their code. Then one pytest process runs the tests marked lesson1, lesson2, ... and a
plugin records each test's lesson and outcome. A lesson earns its points (the lesson table of exercises.md, read
by tools/make_exercises.py) when every one of its tests passes; the JSON lists every test for partial credit.
Exit status 0 whenever grading ran, whatever the score; 2 for a folder that is not a copy of the course.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_exercises as kit  # noqa: E402

ROOT = kit.ROOT
HIDDEN = ROOT / "hidden_tests"
MODULES = ("entropy_model.py", "patching.py", "encoder.py", "train.py")  # a copy of the course has these

# Loaded into the pytest process from outside the scratch copy (-p): one JSON line per test as it finishes, so
# that a run cut short by the timeout still reports what ran, and one per collection error.
PLUGIN = '''
import json, os, re

_out = open(os.environ["GRADE_REPORT"], "a", encoding="utf-8")
_lessons, _done = {}, set()


def _write(record):
    _out.write(json.dumps(record) + "\\n")
    _out.flush()


def pytest_collectreport(report):
    if report.failed:
        _write({"collection_error": report.nodeid, "message": report.longreprtext[-2000:]})


def pytest_collection_finish(session):
    for item in session.items:
        lessons = sorted({int(m.name[6:]) for m in item.iter_markers() if re.fullmatch(r"lesson[0-9]+", m.name)})
        _lessons[item.nodeid] = lessons
        _write({"test": item.nodeid, "lessons": lessons, "outcome": "collected"})


def pytest_runtest_logreport(report):
    if report.nodeid in _done or (report.passed and report.when != "teardown"):
        return
    if report.failed or report.skipped or report.when == "teardown":
        _done.add(report.nodeid)
        outcome = "passed" if report.passed else "skipped" if report.skipped else "failed"
        message = "" if report.passed else report.longreprtext[-2000:]
        _write({"test": report.nodeid, "lessons": _lessons.get(report.nodeid, []), "outcome": outcome,
                "message": message})
'''


class GradeError(Exception):
    pass


def student_files(student: Path) -> list[str]:
    """The student's files to grade: everything but their tests, the kit, data, outputs and caches."""
    out = []
    for folder, dirs, names in os.walk(student):
        rel = Path(folder).relative_to(student)
        top = rel == Path(".")
        dirs[:] = sorted(d for d in dirs if d not in kit.SKIP_DIRS and not (top and d in {*kit.SKIP_TOP, "tests"}))
        for n in names:
            f = (rel / n).as_posix()
            if Path(n).suffix not in kit.SKIP_SUFFIXES and not kit.is_kit_file(f) and f != "pytest.ini":
                out.append(f)
    return sorted(out)


def build_scratch(student: Path, scratch: Path):
    """The student's files, with this repository's tests, pytest.ini and hidden tests."""
    for f in student_files(student):
        (scratch / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(student / f, scratch / f)
    for f in kit.repo_files(ROOT):
        if f == "pytest.ini" or (f.startswith("tests/") and not kit.is_kit_file(f)):
            (scratch / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / f, scratch / f)
    for path in sorted(HIDDEN.glob("test_*.py")):  # flat into tests/: the tests' conftest and helpers apply
        shutil.copyfile(path, scratch / "tests" / path.name)


def lesson_files(folder: Path) -> list[str]:
    """The test files that mark tests with a lesson."""
    return sorted(f"tests/{p.name}" for p in folder.glob("test_*.py")
                  if "pytest.mark.lesson" in p.read_text(encoding="utf-8"))


def run_tests(scratch: Path, lessons: list[int], work: Path, timeout: float) -> tuple[dict, list, str]:
    """pytest on the lesson tests in the scratch copy. Returns {test: (lessons, outcome, message)}, the
    collection errors [(file, message)], and pytest's output tail."""
    report = work / "report.jsonl"
    (work / "grade_plugin.py").write_text(PLUGIN, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
               GRADE_REPORT=str(report), PYTHONPATH=os.pathsep.join(filter(None, [str(work),
                                                                                  os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "pytest", "-q", "--tb=short", "-p", "grade_plugin", "-p", "no:cacheprovider",
               "-p", "no:benchmark", "-p", "no:hypothesispytest",  # plugins the lesson tests do not use
               "-m", " or ".join(f"lesson{n}" for n in lessons), f"--basetemp={work / 'tmp'}",
               *lesson_files(scratch / "tests")]
    try:
        proc = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout)
        output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        output = f"timed out after {timeout:g} s\n" + (e.stdout or b"").decode(errors="replace")[-3000:]
    tests, errors = {}, []
    if report.exists():
        for line in report.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            if "collection_error" in r:
                errors.append((r["collection_error"], r["message"]))
            elif r["outcome"] == "collected":
                tests[r["test"]] = (r["lessons"], "not run", "did not finish (timeout or crash)")
            else:
                tests[r["test"]] = (r["lessons"], r["outcome"], r["message"])
    return tests, errors, output[-3000:]


def score(tests: dict, errors: list, lessons: list[kit.Lesson], scratch: Path) -> list[dict]:
    """One row per lesson: tests, passed, points, and what failed."""
    marked = {}  # a collection error in a file fails every lesson that file marks
    for f in lesson_files(scratch / "tests"):
        text = (scratch / f).read_text(encoding="utf-8")
        marked[f] = {x.number for x in lessons if f"pytest.mark.lesson{x.number}" in text}
    rows = []
    for lesson in lessons:
        mine = {t: r for t, r in tests.items() if lesson.number in r[0]}
        broken = [(f, m) for f, m in errors if lesson.number in marked.get(f, set()) or not f.startswith("tests/")]
        passed = sum(r[1] == "passed" for r in mine.values())
        failed = [{"test": t, "outcome": r[1], "message": r[2]} for t, r in mine.items() if r[1] != "passed"]
        failed.sort(key=lambda f: any(f["test"].startswith(f"tests/{p.name}") for p in HIDDEN.glob("test_*.py")))
        failed += [{"test": f, "outcome": "collection error", "message": m} for f, m in broken]
        full = bool(mine) and not failed
        rows.append({"lesson": lesson.number, "concept": lesson.concept, "tests": len(mine), "passed": passed,
                     "points": lesson.points if full else 0, "max_points": lesson.points,
                     "minutes": lesson.minutes, "failed": failed})
    return rows


def table(rows: list[dict]) -> str:
    width = max(len(r["concept"]) for r in rows)
    lines = [f"{'lesson':<7} {'concept':<{width}}  {'tests passed':>12}  {'points':>6}  {'of':>3}"]
    for r in rows:
        lines.append(f"{r['lesson']:<7} {r['concept']:<{width}}  {r['passed']:>5} / {r['tests']:<4}  "
                     f"{r['points']:>6}  {r['max_points']:>3}")
    passed, tests = sum(r["passed"] for r in rows), sum(r["tests"] for r in rows)
    points, most = sum(r["points"] for r in rows), sum(r["max_points"] for r in rows)
    lines.append(f"{'total':<7} {'':<{width}}  {passed:>5} / {tests:<4}  {points:>6}  {most:>3}")
    return "\n".join(lines)


def first_line(message: str) -> str:
    """The line of a failure that says what went wrong (pytest's `E ` lines), for the table's notes."""
    said = [line[1:].strip() for line in message.splitlines() if line.startswith("E ")]
    return (said[0] if said else message.strip().splitlines()[-1] if message.strip() else "")[:160]


def grade(student: Path, lessons: list[int] | None = None, timeout: float = 900.0) -> dict:
    student = Path(student)
    if not student.is_dir():
        raise GradeError(f"{student}: not a folder")
    missing = [m for m in MODULES if not (student / m).is_file()]
    if missing:
        raise GradeError(f"{student}: not a copy of the course (no {', '.join(missing)})")
    chosen = [x for x in kit.read_lessons() if lessons is None or x.number in lessons]
    with tempfile.TemporaryDirectory(prefix="blt-grade-") as tmp:
        work = Path(tmp)
        scratch = work / "copy"
        scratch.mkdir()
        try:
            build_scratch(student, scratch)
        except OSError as e:
            raise GradeError(f"cannot copy {e.filename or student}: {e.strerror or e}")
        tests, errors, output = run_tests(scratch, [x.number for x in chosen], work, timeout)
        rows = score(tests, errors, chosen, scratch)
    if not tests and not errors:
        raise GradeError(f"pytest ran no test in the copy of {student}:\n{output}")
    return {"student": str(student), "lessons": rows, "points": sum(r["points"] for r in rows),
            "max_points": sum(r["max_points"] for r in rows)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Grade a student's copy of the course: every lesson's tests (visible "
                                "and hidden) and a score table.")
    p.add_argument("student", metavar="STUDENT_DIR", help="the student's copy of the repository")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON to FILE ('-': standard output, "
                   "and the table to standard error)")
    p.add_argument("--lesson", type=int, action="append", choices=kit.LESSONS, metavar="N",
                   help="grade only lesson N (repeatable; default: every lesson)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole run (default 900)")
    args = p.parse_args(argv)
    try:
        result = grade(Path(args.student), args.lesson, args.timeout)
    except GradeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = table(result["lessons"])
    notes = [f"  lesson {r['lesson']}: {f['test']}: {first_line(f['message']) or f['outcome']}"
             + (f" (and {len(r['failed']) - 1} more)" if len(r["failed"]) > 1 else "")
             for r in result["lessons"] for f in r["failed"][:1]]
    report = text + ("\n\nthe first failure of each lesson that lost points:\n" + "\n".join(notes) if notes else "")
    print(report, file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json == "-":
        print(json.dumps(result, indent=1))
    elif args.json:
        try:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        except OSError as e:
            print(f"error: cannot write {args.json}: {e.strerror or e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

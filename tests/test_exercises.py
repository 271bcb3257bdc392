"""The course kit (make_exercises.py, exercises.md, and the tests marked `@pytest.mark.stageN`).

A test grades stage N when it carries the mark stageN (pytest.ini lists the marks); the marks sit on the
module tests, next to the tests of the same code that grade no stage. Fast checks of the markers, the
stripping and the copies, then one end-to-end check that runs `pytest -m stageN` in generated copies, each in
a pytest subprocess (a few minutes on 2 busy cores), and reads each test's stage from its marks:
  * the student version (every stage stripped), collecting every test module: none fails to import, and
    every stage test fails with NotImplementedError;
  * for N = 2..last, a copy with stages N..last stripped: stage N-1's solution is back in and its tests pass
    while every later stage is still missing; stage N's tests fail with stage N's own NotImplementedError (so
    no stage's tests depend on a later stage);
  * the teacher version: every stage test passes.
"""
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tools import make_exercises as kit

REPO = Path(__file__).resolve().parent.parent
STAGES = list(kit.STAGES)


# ---- markers and stripping ----

SYNTHETIC = '''"""Module docstring that shows a marker as text:
    # --- solution: stage 2: not a region, it is inside a string (paper §1) ---
"""


def whole_body(x):
    """Docstring stays."""
    # --- solution: stage 2: double it (paper §2.1, eq. 1) ---
    y = 2 * x
    return y
    # --- end solution ---


class Thing:
    def method(self, x):
        x = x + 1
        # --- solution: stage 3: square it (paper §3) ---
        x = x * x
        # --- end solution ---
        return x
'''


def test_regions_and_hints_on_a_synthetic_module():
    regions = kit.find_regions(SYNTHETIC, "synthetic.py")
    assert [(r.stage, r.function, len(r.indent)) for r in regions] == [(2, "whole_body", 4), (3, "Thing.method", 8)]
    assert regions[0].hint == "stage 2: double it — see paper §2.1, eq. 1"
    namespace = {}
    exec(compile(kit.strip_source(SYNTHETIC, regions), "synthetic.py", "exec"), namespace)
    assert namespace["whole_body"].__doc__ == "Docstring stays."
    with pytest.raises(NotImplementedError, match="stage 2: double it — see paper §2.1, eq. 1"):
        namespace["whole_body"](3)
    with pytest.raises(NotImplementedError, match="stage 3: square it"):
        namespace["Thing"]().method(3)
    # only the chosen stages are stripped; the others keep their code (and their markers)
    namespace = {}
    exec(compile(kit.strip_source(SYNTHETIC, regions, stages={3}), "synthetic.py", "exec"), namespace)
    assert namespace["whole_body"](3) == 6
    assert kit.strip_source(SYNTHETIC, regions, stages=set()) == SYNTHETIC


@pytest.mark.parametrize("source, message", [
    ("def f():\n    # --- solution: stage 1: x (paper §1) ---\n    return 1\n", "never closed"),
    ("def f():\n    return 1\n    # --- end solution ---\n", "never opened"),
    ("def f():\n    # --- solution: stage 1: x (paper §1) ---\n    # --- solution: stage 1: y (paper §1) ---\n"
     "    return 1\n    # --- end solution ---\n    # --- end solution ---\n", "inside the one"),
    ("def f():\n    # --- solution: stage 1: x (paper §1) ---\n    return 1\n  # --- end solution ---\n", "indented"),
    ("def f():\n    # --- solution: stage 1: x ---\n    return 1\n    # --- end solution ---\n", "malformed"),
    ("def f():\n    # --- solution: stage 9: x (paper §1) ---\n    return 1\n    # --- end solution ---\n", "stage 9"),
    ("def f():\n    return 1  # --- end solution ---\n", "alone on its line"),
    ("# --- solution: stage 1: x (paper §1) ---\nX = 1\n# --- end solution ---\n", "inside a function"),
    ("def f():\n    # --- solution: stage 1: x (paper §1) ---\n    # --- end solution ---\n", "empty"),
])
def test_malformed_markers_are_refused(source, message):
    with pytest.raises(kit.MarkerError, match=message):
        kit.find_regions(source, "bad.py")


def test_repository_regions_cover_every_stage():
    regions = kit.check()
    assert sorted({r.stage for r in regions}) == STAGES
    for r in regions:
        assert re.fullmatch(r"stage \d: [^\"\\]+ — see paper §\d[^\"\\]*", r.hint), r.hint
        assert r.last - r.first <= 15, f"{r.path}:{r.first}: keep solution regions small"


# ---- copies ----

def test_teacher_copy_is_unchanged_and_student_copy_differs_only_in_regions(tmp_path):
    files = kit.repo_files()
    assert "tools/make_exercises.py" in files and "exercises.md" in files and "pytest.ini" in files
    assert not any(f.startswith(("data/", "out/")) or "__pycache__" in f for f in files)
    kit.make_copy(tmp_path / "teacher", student=False)
    for f in files:
        assert (tmp_path / "teacher" / f).read_bytes() == (REPO / f).read_bytes(), f
    stripped = kit.make_copy(tmp_path / "student", student=True)
    by_file = {}
    for r in stripped:
        by_file.setdefault(r.path, []).append(r)
    for f in files:
        copy = tmp_path / "student" / f
        if f in kit.KIT_FILES:
            assert not copy.exists(), f
        elif f in by_file:
            text = copy.read_text(encoding="utf-8")
            original = (REPO / f).read_text(encoding="utf-8")
            assert text == kit.strip_source(original, by_file[f])
            assert "--- solution" not in text and "NotImplementedError" in text
        else:
            assert copy.read_bytes() == (REPO / f).read_bytes(), f
    # one stage at a time
    only = kit.make_copy(tmp_path / "stage3", student=True, stages={3})
    assert {r.stage for r in only} == {3}
    assert "stage 3:" in (tmp_path / "stage3" / "encoder.py").read_text(encoding="utf-8")
    assert (tmp_path / "stage3" / "decoder.py").read_bytes() == (REPO / "decoder.py").read_bytes()


def test_copy_without_git_skips_data_outputs_and_caches(tmp_path):
    kit.make_copy(tmp_path / "teacher", student=False)  # under tmp_path: not a git repository
    for junk in ("data/corpus.bin", "out/blt.pt", "tests/__pycache__/x.pyc", "runs/log.txt", "model.pt"):
        (tmp_path / "teacher" / junk).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "teacher" / junk).write_text("junk")
    (tmp_path / "teacher" / "tests" / "data").mkdir()
    (tmp_path / "teacher" / "tests" / "data" / "fixture.txt").write_text("kept: only the top-level data/ is skipped")
    files = kit.repo_files(tmp_path / "teacher")
    assert sorted(files) == sorted(kit.repo_files() + ["tests/data/fixture.txt"])
    stripped = kit.make_copy(tmp_path / "student", student=True, root=tmp_path / "teacher")
    assert {r.stage for r in stripped} == set(STAGES)


def test_command_line(tmp_path, capsys):
    assert kit.main(["--check"]) == 0
    assert "stage 6" in capsys.readouterr().out
    assert kit.main(["--student", str(tmp_path / "s"), "--stage", "2", "--stage", "5"]) == 0
    assert "stages [2, 5]" in capsys.readouterr().out
    assert kit.main(["--student", str(tmp_path / "s")]) == 1  # refuses a folder that is not empty
    assert "not empty" in capsys.readouterr().err
    assert kit.main(["--student", str(REPO / "student-copy")]) == 1  # would be copied into the next copy
    assert "inside the repository" in capsys.readouterr().err and not (REPO / "student-copy").exists()
    for bad in (["--student", str(tmp_path / "t"), "--stage", str(STAGES[-1] + 1)],
                ["--teacher", str(tmp_path / "t"), "--stage", "2"]):
        with pytest.raises(SystemExit):
            kit.main(bad)


def test_guide_readme_and_markers_are_wired_up():
    guide = (REPO / "exercises.md").read_text(encoding="utf-8")
    for n in STAGES:
        assert f"python -m pytest -m stage{n}" in guide, n
    for r in kit.check():
        assert r.function.split(".")[-1] in guide, r.function
    assert "exercises.md" in (REPO / "README.md").read_text(encoding="utf-8")
    ini = (REPO / "pytest.ini").read_text()
    assert all(f"stage{n}:" in ini for n in STAGES)
    # every stage marks tests, and its "Grade:" line in the guide names exactly the files that hold its marks
    marks = stage_marks()
    assert sorted(marks) == STAGES, marks
    grades = {int(n): set(re.findall(r"tests/(test_\w+\.py)", files))
              for n, files in re.findall(r"Grade: `python -m pytest -m stage(\d+)` \(([^)]*)\)", guide)}
    assert grades == marks


def stage_marks(root: Path = REPO) -> dict[int, set[str]]:
    """stage -> the test files that mark tests with it (`@pytest.mark.stageN`, or a module's `pytestmark`)."""
    marks = {}
    for path in sorted((root / "tests").glob("test_*.py")):
        if f"tests/{path.name}" not in kit.KIT_FILES:
            for n in re.findall(r"pytest\.mark\.stage(\d+)\b", path.read_text(encoding="utf-8")):
                marks.setdefault(int(n), set()).add(path.name)
    return marks


# ---- the stage tests in generated copies ----

# A pytest plugin, loaded from outside the copy (`-p`), that records for every test its stage marks, its outcome
# and its failure text, and every collection error, as JSON in $STAGE_REPORT. The stage of a test is its
# `@pytest.mark.stageN` (or a module's `pytestmark`), not the name of its file.
REPORT_PLUGIN = """
import json, os, re

_tests, _errors = {}, []


def pytest_collection_finish(session):
    for item in session.items:
        stages = sorted({int(m.name[5:]) for m in item.iter_markers() if re.fullmatch(r"stage[0-9]+", m.name)})
        _tests[item.nodeid] = {"stages": stages, "outcome": "passed", "message": ""}


def pytest_collectreport(report):
    if report.failed:
        _errors.append(f"{report.nodeid}: {report.longreprtext[-3000:]}")


def pytest_runtest_logreport(report):
    test = _tests.get(report.nodeid)
    if test is None or test["outcome"] != "passed" or report.passed:
        return
    if report.skipped:
        test["outcome"] = "skipped"
    else:
        test["outcome"] = "failure" if report.when == "call" else "error"
    test["message"] = report.longreprtext


def pytest_sessionfinish(session):
    with open(os.environ["STAGE_REPORT"], "w") as f:
        json.dump({"tests": _tests, "collection_errors": _errors}, f)
"""


def marked_test_files(root: Path) -> list[str]:
    """The test files that hold a stage mark (pytest.mark.stageN)."""
    return sorted(str(p.relative_to(root)) for p in (root / "tests").glob("test_*.py")
                  if re.search(r"pytest\.mark\.stage\d", p.read_text(encoding="utf-8")))


def run_stage_tests(root: Path, stages: list[int], work: Path, files: list[str] | None = None
                    ) -> tuple[subprocess.CompletedProcess, dict]:
    """pytest -m 'stageA or stageB' in the copy at root, in a subprocess, on `files` (["tests"]: as a
    student runs it, every module imported, so none may fail to import in a student version) or by default on
    the files that hold stage marks (faster). Returns the process and {test id: (stage, outcome, message)}; a
    collection error comes back as the test id "<collection>"."""
    report = work / "stage_report.json"
    plugin_dir = work / "plugin"
    plugin_dir.mkdir(parents=True, exist_ok=True)
    (plugin_dir / "stage_report.py").write_text(REPORT_PLUGIN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", STAGE_REPORT=str(report),
               PYTHONPATH=os.pathsep.join([str(plugin_dir), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--tb=short", "-m", " or ".join(f"stage{n}" for n in stages),
         *(files or marked_test_files(root)), "-p", "stage_report",
         # plugins the stage tests do not use cost a second per run
         "-p", "no:cacheprovider", "-p", "no:benchmark", "-p", "no:hypothesispytest", f"--basetemp={work / 'tmp'}"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600)
    results = {}
    if report.exists():
        found = json.loads(report.read_text())
        for test, r in found["tests"].items():
            stage = r["stages"][0] if len(r["stages"]) == 1 else tuple(r["stages"]) or None
            results[test] = (stage, r["outcome"], r["message"])
        if found["collection_errors"]:
            results["<collection>"] = (None, "error", "\n".join(found["collection_errors"]))
    return proc, results


def check_run(name: str, proc, results: dict, expect: dict[int, str]) -> list[str]:
    """expect: stage -> "pass", "stub" (fails with that stage's own NotImplementedError) or "stub-any"
    (fails with some stage's NotImplementedError). Returns the problems found."""
    problems = []
    output = proc.stdout + proc.stderr
    if (proc.returncode not in (0, 1) or "errors during collection" in output or "ImportError" in output
            or "<collection>" in results):
        problems.append(f"{name}: pytest exit {proc.returncode}, collection or import error:\n{output[-3000:]}"
                        + results.get("<collection>", (None, None, ""))[2][-3000:])
        return problems
    for n, want in expect.items():
        cases = {t: r for t, r in results.items() if r[0] == n}
        if not cases:
            problems.append(f"{name}: no stage {n} test ran")
        for test, (_, outcome, message) in cases.items():
            if want == "pass" and outcome != "passed":
                problems.append(f"{name}: {test} should pass, {outcome}:\n{message[-1500:]}")
            elif want.startswith("stub"):
                hint = "NotImplementedError: stage " + ("" if want == "stub-any" else f"{n}:")
                if outcome != "failure" or hint not in message:
                    problems.append(f"{name}: {test} should fail with '{hint}', {outcome}:\n{message[-1500:]}")
    unexpected = sorted(t for t, r in results.items() if r[0] not in expect)
    if unexpected:
        problems.append(f"{name}: tests of unselected stages ran: {unexpected}")
    return problems


def test_stage_tests_in_student_and_teacher_versions(tmp_path):
    last = STAGES[-1]
    # the student version collects every test module, as `python -m pytest -m stageN` does there
    jobs = [("student", dict(student=True), STAGES, {1: "stub", **{n: "stub-any" for n in STAGES[1:]}}, ["tests"])]
    for n in STAGES[1:]:  # stages n..last stripped: n-1 goes green on its own, n fails with its own stub
        later = set(range(n, last + 1))
        jobs.append((f"stages {n}-{last} stripped", dict(student=True, stages=later), [n - 1, n],
                     {n - 1: "pass", n: "stub"}, None))
    jobs.append(("teacher", dict(student=False), STAGES, {n: "pass" for n in STAGES}, None))

    def run(job):
        name, copy_args, stages, expect, files = job
        work = tmp_path / re.sub(r"\W+", "_", name)
        kit.make_copy(work / "repo", **copy_args)
        proc, results = run_stage_tests(work / "repo", stages, work, files)
        return check_run(name, proc, results, expect)

    with ThreadPoolExecutor(max_workers=2) as pool:
        problems = [p for found in pool.map(run, jobs) for p in found]
    assert not problems, "\n\n".join(problems)


# ---- stage 8: the recipe test catches a broken training loop ----

LOOP_STAGE = 8  # the training loop
RECIPE_TEST = "tests/test_training_loop.py::test_train_loop_follows_the_recipe"
# what a student may get wrong in train.py's train_loop -> (a text found on exactly one line of the stage 8
# region, what replaces it); None replaces the whole line by `pass`
MUTATIONS = {
    "no zero_grad": (".zero_grad(", None),
    "no clipping": ("clip_grad_norm_(", None),
    "no learning-rate update": ('["lr"] = ', None),
    "loss not divided among micro-batches": (" / len(micro_batches)", ""),
}


def mutate(source: str, needle: str, replacement: str | None) -> str:
    """train.py with one line of its stage 8 region (the training step) changed."""
    [region] = [r for r in kit.find_regions(source, "train.py") if r.stage == LOOP_STAGE]
    lines = source.splitlines(keepends=True)
    hits = [i for i in range(region.first, region.last - 1) if needle in lines[i]]  # 0-based, inside the markers
    assert len(hits) == 1, f"{needle!r} should be on exactly one line of train.py's stage 8 region"
    line = lines[hits[0]]
    if replacement is None:
        lines[hits[0]] = line[:len(line) - len(line.lstrip())] + "pass\n"
    else:
        lines[hits[0]] = line.replace(needle, replacement)
    mutated = "".join(lines)
    compile(mutated, "train.py", "exec")
    return mutated


def test_recipe_test_fails_for_a_broken_training_loop(tmp_path):
    """Stage 8's recipe test passes with train.py as it is, and fails (an assertion, not a crash) when the
    training step forgets to zero the gradients, to clip them, to set the learning rate, or to divide the loss
    among the micro-batches. Each in a teacher copy, in a pytest subprocess."""
    source = (REPO / "train.py").read_text(encoding="utf-8")
    jobs = [("unchanged", source)] + [(name, mutate(source, *change)) for name, change in MUTATIONS.items()]

    def run(job):
        name, text = job
        work = tmp_path / re.sub(r"\W+", "_", name)
        kit.make_copy(work / "repo", student=False)
        (work / "repo" / "train.py").write_text(text, encoding="utf-8")
        proc, results = run_stage_tests(work / "repo", [LOOP_STAGE], work, files=[RECIPE_TEST])
        found = {t: r for t, r in results.items() if t == RECIPE_TEST}
        if len(found) != 1:
            output = (proc.stdout + proc.stderr)[-3000:]
            return [f"{name}: {RECIPE_TEST} did not run once (exit {proc.returncode}):\n{output}"]
        [(stage, outcome, message)] = found.values()
        if stage != LOOP_STAGE:
            return [f"{name}: {RECIPE_TEST} is marked stage {stage}, not {LOOP_STAGE}"]
        if name == "unchanged" and outcome != "passed":
            return [f"{name}: {RECIPE_TEST} should pass, {outcome}:\n{message[-1500:]}"]
        failed_an_assertion = outcome == "failure" and re.search(r"^E +(AssertionError\b|assert )", message, re.M)
        if name != "unchanged" and not failed_an_assertion:
            return [f"{name}: {RECIPE_TEST} should fail an assertion, {outcome}:\n{message[-1500:]}"]
        return []

    with ThreadPoolExecutor(max_workers=2) as pool:
        problems = [p for found in pool.map(run, jobs) for p in found]
    assert not problems, "\n\n".join(problems)

"""The course kit (make_exercises.py, exercises.md, and the tests marked `@pytest.mark.lessonN`).

A test grades lesson N when it carries the mark lessonN (pytest.ini lists the marks); the marks sit on the
module tests, next to the tests of the same code that grade no lesson. Fast checks of the markers, the
stripping and the copies, then one end-to-end check that runs `pytest -m lessonN` in generated copies, each in
a pytest subprocess (a few minutes on 2 busy cores), and reads each test's lesson from its marks:
  * the student version (every lesson stripped), collecting every test module: none fails to import, and
    every lesson test fails with NotImplementedError;
  * for N = 2..last, a copy with lessons N..last stripped: lesson N-1's solution is back in and its tests pass
    while every later lesson is still missing; lesson N's tests fail with lesson N's own NotImplementedError (so
    no lesson's tests depend on a later lesson);
The teacher version passing every lesson test is checked by the grader's test below (full marks), with the
student version (no points) and a version with one planted mistake per lesson (every lesson loses its points).
"""
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tools import make_exercises as kit

REPO = Path(__file__).resolve().parent.parent
LESSONS = list(kit.LESSONS)


# ---- markers and stripping ----

SYNTHETIC = '''"""Module docstring that shows a marker as text:
    # --- solution: lesson 2: not a region, it is inside a string (paper §1) ---
"""


def whole_body(x):
    """Docstring stays."""
    # --- solution: lesson 2: double it (paper §2.1, eq. 1) ---
    y = 2 * x
    return y
    # --- end solution ---


class Thing:
    def method(self, x):
        x = x + 1
        # --- solution: lesson 3: square it (paper §3) ---
        x = x * x
        # --- end solution ---
        return x
'''


def test_regions_and_hints_on_a_synthetic_module():
    regions = kit.find_regions(SYNTHETIC, "synthetic.py")
    assert [(r.lesson, r.function, len(r.indent)) for r in regions] == [(2, "whole_body", 4), (3, "Thing.method", 8)]
    assert regions[0].hint == "lesson 2: double it — see paper §2.1, eq. 1"
    namespace = {}
    exec(compile(kit.strip_source(SYNTHETIC, regions), "synthetic.py", "exec"), namespace)
    assert namespace["whole_body"].__doc__ == "Docstring stays."
    with pytest.raises(NotImplementedError, match="lesson 2: double it — see paper §2.1, eq. 1"):
        namespace["whole_body"](3)
    with pytest.raises(NotImplementedError, match="lesson 3: square it"):
        namespace["Thing"]().method(3)
    # only the chosen lessons are stripped; the others keep their code (and their markers)
    namespace = {}
    exec(compile(kit.strip_source(SYNTHETIC, regions, lessons={3}), "synthetic.py", "exec"), namespace)
    assert namespace["whole_body"](3) == 6
    assert kit.strip_source(SYNTHETIC, regions, lessons=set()) == SYNTHETIC


@pytest.mark.parametrize("source, message", [
    ("def f():\n    # --- solution: lesson 1: x (paper §1) ---\n    return 1\n", "never closed"),
    ("def f():\n    return 1\n    # --- end solution ---\n", "never opened"),
    ("def f():\n    # --- solution: lesson 1: x (paper §1) ---\n    # --- solution: lesson 1: y (paper §1) ---\n"
     "    return 1\n    # --- end solution ---\n    # --- end solution ---\n", "inside the one"),
    ("def f():\n    # --- solution: lesson 1: x (paper §1) ---\n    return 1\n  # --- end solution ---\n", "indented"),
    ("def f():\n    # --- solution: lesson 1: x ---\n    return 1\n    # --- end solution ---\n", "malformed"),
    ("def f():\n    # --- solution: lesson 99: x (paper §1) ---\n    return 1\n    # --- end solution ---\n",
     "lesson 99"),
    ("def f():\n    return 1  # --- end solution ---\n", "alone on its line"),
    ("# --- solution: lesson 1: x (paper §1) ---\nX = 1\n# --- end solution ---\n", "inside a function"),
    ("def f():\n    # --- solution: lesson 1: x (paper §1) ---\n    # --- end solution ---\n", "empty"),
])
def test_malformed_markers_are_refused(source, message):
    with pytest.raises(kit.MarkerError, match=message):
        kit.find_regions(source, "bad.py")


def test_repository_regions_cover_every_lesson():
    regions = kit.check()
    assert sorted({r.lesson for r in regions}) == LESSONS
    for r in regions:
        assert re.fullmatch(r"lesson \d: [^\"\\]+ — see paper §\d[^\"\\]*", r.hint), r.hint
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
        if kit.is_kit_file(f):
            assert not copy.exists(), f
        elif f.endswith(".md"):  # teacher blocks, hint markers and rows about left-out files gone
            text = copy.read_text(encoding="utf-8")
            assert text == kit.student_markdown((REPO / f).read_text(encoding="utf-8"), "full", path=f)
            assert not re.search(r"<!-- (end )?(teacher|hints)", text) and "For teachers" not in text, f
        elif f in by_file:
            text = copy.read_text(encoding="utf-8")
            original = (REPO / f).read_text(encoding="utf-8")
            assert text == kit.strip_source(original, by_file[f])
            assert "--- solution" not in text and "NotImplementedError" in text
        else:
            assert copy.read_bytes() == (REPO / f).read_bytes(), f
    # one lesson at a time
    only = kit.make_copy(tmp_path / "lesson3", student=True, lessons={3})
    assert {r.lesson for r in only} == {3}
    assert "lesson 3:" in (tmp_path / "lesson3" / "encoder.py").read_text(encoding="utf-8")
    assert (tmp_path / "lesson3" / "decoder.py").read_bytes() == (REPO / "decoder.py").read_bytes()


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
    assert {r.lesson for r in stripped} == set(LESSONS)


def test_command_line(tmp_path, capsys):
    assert kit.main(["--check"]) == 0
    assert "lesson 6" in capsys.readouterr().out
    assert kit.main(["--student", str(tmp_path / "s"), "--lesson", "2", "--lesson", "5"]) == 0
    assert "lessons [2, 5]" in capsys.readouterr().out
    assert kit.main(["--student", str(tmp_path / "s")]) == 1  # refuses a folder that is not empty
    assert "not empty" in capsys.readouterr().err
    assert kit.main(["--student", str(REPO / "student-copy")]) == 1  # would be copied into the next copy
    assert "inside the repository" in capsys.readouterr().err and not (REPO / "student-copy").exists()
    for bad in (["--student", str(tmp_path / "t"), "--lesson", str(LESSONS[-1] + 1)],
                ["--teacher", str(tmp_path / "t"), "--lesson", "2"]):
        with pytest.raises(SystemExit):
            kit.main(bad)


def test_guide_readme_and_markers_are_wired_up():
    guide = (REPO / "exercises.md").read_text(encoding="utf-8")
    for n in LESSONS:
        assert f"python -m pytest -m lesson{n}" in guide, n
    for r in kit.check():
        assert r.function.split(".")[-1] in guide, r.function
    assert "exercises.md" in (REPO / "README.md").read_text(encoding="utf-8")
    ini = (REPO / "pytest.ini").read_text()
    assert sorted(int(n) for n in re.findall(r"^\s+lesson(\d+):", ini, re.M)) == LESSONS  # the guide's table
    assert sum(x.points for x in kit.read_lessons()) == 100 and all(x.minutes > 0 for x in kit.read_lessons())
    # every lesson marks tests, and its "Grade:" line in the guide names exactly the files that hold its marks
    marks = lesson_marks()
    assert sorted(marks) == LESSONS, marks
    grades = {int(n): set(re.findall(r"tests/(test_\w+\.py)", files))
              for n, files in re.findall(r"Grade: `python -m pytest -m lesson(\d+)` \(([^)]*)\)", guide)}
    assert grades == marks


def test_student_markdown_hint_levels_teacher_blocks_and_links():
    text = ("# Guide\n\nAlways.\n<!-- hints: brief -->\nBrief and full.\n<!-- end hints -->\n"
            "<!-- hints: full -->\nFull only.\n<!-- end hints -->\n<!-- teacher -->\n## For teachers\n"
            "See [the kit](tools/make_exercises.py).\n<!-- end teacher -->\n"
            "| file | what |\n|---|---|\n| [`tools/grade.py`](tools/grade.py) | the grader |\n"
            "| [`blt.py`](blt.py) | the model |\n")
    full = kit.student_markdown(text, "full", path="README.md")
    assert full == ("# Guide\n\nAlways.\nBrief and full.\nFull only.\n"
                    "| file | what |\n|---|---|\n| [`blt.py`](blt.py) | the model |\n")
    assert kit.student_markdown(text, "brief", path="README.md") == full.replace("Full only.\n", "")
    assert kit.student_markdown(text, "none", path="README.md") == full.replace("Full only.\n", "").replace(
        "Brief and full.\n", "")
    for bad, message in [("See [it](hidden_tests/test_hidden_lessons.py).\n", "leaves out"),
                         ("<!-- teacher -->\nx\n", "without its pair"),
                         ("<!-- hints: lots -->\nx\n<!-- end hints -->\n", "unknown hint level"),
                         ("<!-- teacher -->\nx\n<!-- end hints -->\n", "closed by")]:
        with pytest.raises(kit.MarkerError, match=message):
            kit.student_markdown(bad, "full")
    with pytest.raises(kit.MarkerError, match="unknown hint level"):
        kit.student_markdown(text, "some")


def test_student_copy_reads_as_written_for_a_student(tmp_path, capsys):
    """No teacher section, no link to a file it lacks, and less of the guide's help at each lower hint level."""
    guides = {}
    for level in kit.HINT_LEVELS:
        assert kit.main(["--student", str(tmp_path / level), "--hints", level]) == 0
        copy = tmp_path / level
        for md in copy.rglob("*.md"):
            text = md.read_text(encoding="utf-8")
            assert "For teachers" not in text and not re.search(r"<!-- (end )?(teacher|hints)", text), md
            for target in kit.LINK.findall(text):
                assert (md.parent / target).exists(), f"{md.relative_to(copy)} links to {target}, not in the copy"
            for kit_file in kit.KIT_FILES:
                assert kit_file not in text, f"{md.relative_to(copy)} names {kit_file}, not in the copy"
        guides[level] = (copy / "exercises.md").read_text(encoding="utf-8")
    assert len(guides["none"]) < len(guides["brief"]) < len(guides["full"])
    assert kit.main(["--student", str(tmp_path / "default")]) == 0
    assert (tmp_path / "default" / "exercises.md").read_text(encoding="utf-8") == guides["full"]  # the default
    assert "task.batch(corpus.train, step)" in guides["brief"] and "pairs=pairs)" in guides["full"]
    assert "pairs=pairs)" not in guides["brief"] and "scatter_reduce" not in guides["none"]
    for n in LESSONS:  # what to write, the targets and the grading command stay at every level
        assert f"Grade: `python -m pytest -m lesson{n}`" in guides["none"], n
    assert guides["none"].count("Checkable targets") == len(LESSONS)
    with pytest.raises(SystemExit):
        kit.main(["--teacher", str(tmp_path / "t"), "--hints", "none"])


def test_repository_test_command_skips_copies_made_inside_it(tmp_path):
    """With the repository's pytest.ini, `python -m pytest` collects tests/ only: a student copy under out/
    (with a tests/ of the same file names) would otherwise stop it with "import file mismatch"."""
    shutil.copyfile(REPO / "pytest.ini", tmp_path / "pytest.ini")
    for folder in (tmp_path / "tests", tmp_path / "out" / "student" / "tests"):
        folder.mkdir(parents=True)
        (folder / "test_same_name.py").write_text("def test_one():\n    pass\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "1 test collected" in proc.stdout, proc.stdout + proc.stderr
    assert "out/student" not in proc.stdout


def lesson_marks(root: Path = REPO) -> dict[int, set[str]]:
    """lesson -> the test files that mark tests with it (`@pytest.mark.lessonN`, or a module's `pytestmark`)."""
    marks = {}
    for path in sorted((root / "tests").glob("test_*.py")):
        if not kit.is_kit_file(f"tests/{path.name}"):
            for n in re.findall(r"pytest\.mark\.lesson(\d+)\b", path.read_text(encoding="utf-8")):
                marks.setdefault(int(n), set()).add(path.name)
    return marks


# ---- the lesson tests in generated copies ----

# A pytest plugin, loaded from outside the copy (`-p`), that records for every test its lesson marks, its outcome
# and its failure text, and every collection error, as JSON in $LESSON_REPORT. The lesson of a test is its
# `@pytest.mark.lessonN` (or a module's `pytestmark`), not the name of its file.
REPORT_PLUGIN = """
import json, os, re

_tests, _errors = {}, []


def pytest_collection_finish(session):
    for item in session.items:
        lessons = sorted({int(m.name[6:]) for m in item.iter_markers() if re.fullmatch(r"lesson[0-9]+", m.name)})
        _tests[item.nodeid] = {"lessons": lessons, "outcome": "passed", "message": ""}


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
    with open(os.environ["LESSON_REPORT"], "w") as f:
        json.dump({"tests": _tests, "collection_errors": _errors}, f)
"""


def marked_test_files(root: Path) -> list[str]:
    """The test files that hold a lesson mark (pytest.mark.lessonN)."""
    return sorted(str(p.relative_to(root)) for p in (root / "tests").glob("test_*.py")
                  if re.search(r"pytest\.mark\.lesson\d", p.read_text(encoding="utf-8")))


def run_lesson_tests(root: Path, lessons: list[int], work: Path, files: list[str] | None = None
                    ) -> tuple[subprocess.CompletedProcess, dict]:
    """pytest -m 'lessonA or lessonB' in the copy at root, in a subprocess, on `files` (["tests"]: as a
    student runs it, every module imported, so none may fail to import in a student version) or by default on
    the files that hold lesson marks (faster). Returns the process and {test id: (lesson, outcome, message)}; a
    collection error comes back as the test id "<collection>"."""
    report = work / "lesson_report.json"
    plugin_dir = work / "plugin"
    plugin_dir.mkdir(parents=True, exist_ok=True)
    (plugin_dir / "lesson_report.py").write_text(REPORT_PLUGIN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", LESSON_REPORT=str(report),
               PYTHONPATH=os.pathsep.join([str(plugin_dir), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--tb=short", "-m", " or ".join(f"lesson{n}" for n in lessons),
         *(files or marked_test_files(root)), "-p", "lesson_report",
         # plugins the lesson tests do not use cost a second per run
         "-p", "no:cacheprovider", "-p", "no:benchmark", "-p", "no:hypothesispytest", f"--basetemp={work / 'tmp'}"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600)
    results = {}
    if report.exists():
        found = json.loads(report.read_text())
        for test, r in found["tests"].items():
            lesson = r["lessons"][0] if len(r["lessons"]) == 1 else tuple(r["lessons"]) or None
            results[test] = (lesson, r["outcome"], r["message"])
        if found["collection_errors"]:
            results["<collection>"] = (None, "error", "\n".join(found["collection_errors"]))
    return proc, results


def check_run(name: str, proc, results: dict, expect: dict[int, str]) -> list[str]:
    """expect: lesson -> "pass", "stub" (fails with that lesson's own NotImplementedError) or "stub-any"
    (fails with some lesson's NotImplementedError). Returns the problems found."""
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
            problems.append(f"{name}: no lesson {n} test ran")
        for test, (_, outcome, message) in cases.items():
            if want == "pass" and outcome != "passed":
                problems.append(f"{name}: {test} should pass, {outcome}:\n{message[-1500:]}")
            elif want.startswith("stub"):
                hint = "NotImplementedError: lesson " + ("" if want == "stub-any" else f"{n}:")
                if outcome != "failure" or hint not in message:
                    problems.append(f"{name}: {test} should fail with '{hint}', {outcome}:\n{message[-1500:]}")
    unexpected = sorted(t for t, r in results.items() if r[0] not in expect)
    if unexpected:
        problems.append(f"{name}: tests of unselected lessons ran: {unexpected}")
    return problems


def test_lesson_tests_in_student_versions(tmp_path):
    last = LESSONS[-1]
    # the student version collects every test module, as `python -m pytest -m lessonN` does there
    jobs = [("student", dict(student=True), LESSONS, {1: "stub", **{n: "stub-any" for n in LESSONS[1:]}}, ["tests"])]
    for n in LESSONS[1:]:  # lessons n..last stripped: n-1 goes green on its own, n fails with its own stub
        later = set(range(n, last + 1))
        jobs.append((f"lessons {n}-{last} stripped", dict(student=True, lessons=later), [n - 1, n],
                     {n - 1: "pass", n: "stub"}, None))

    def run(job):
        name, copy_args, lessons, expect, files = job
        work = tmp_path / re.sub(r"\W+", "_", name)
        kit.make_copy(work / "repo", **copy_args)
        proc, results = run_lesson_tests(work / "repo", lessons, work, files)
        return check_run(name, proc, results, expect)

    with ThreadPoolExecutor(max_workers=2) as pool:
        problems = [p for found in pool.map(run, jobs) for p in found]
    assert not problems, "\n\n".join(problems)


# ---- lesson 8: the recipe test catches a broken training loop ----

LOOP_LESSON = 8  # the training loop
RECIPE_TEST = "tests/test_training_loop.py::test_train_loop_follows_the_recipe"
STEP_TEST = ("tests/test_training_loop.py::"
             "test_micro_batches_come_from_the_task_batch_and_only_the_last_forward_averages")
# what a student may get wrong in train.py's train_loop -> (a text found on exactly one line of the lesson 8
# region, what replaces it, the test that must catch it); None replaces the whole line by `pass`
MUTATIONS = {
    "no zero_grad": (".zero_grad(", None, RECIPE_TEST),
    "no clipping": ("clip_grad_norm_(", None, RECIPE_TEST),
    "no learning-rate update": ('["lr"] = ', None, RECIPE_TEST),
    "loss not divided among micro-batches": (" / len(micro_batches)", "", RECIPE_TEST),
    "byte windows for the BPE baseline": ("task.batch(corpus.train, step)",
                                          "get_batch(corpus.train, tc.batch_size, tc.seq_len, tc.seed, step, "
                                          "DIST.rows(tc.batch_size))", STEP_TEST),
    "gradients averaged on every micro-batch": ("now=i == len(micro_batches) - 1", "now=True", STEP_TEST),
}


def mutate(source: str, needle: str, replacement: str | None) -> str:
    """train.py with one line of its lesson 8 region (the training step) changed."""
    [region] = [r for r in kit.find_regions(source, "train.py") if r.lesson == LOOP_LESSON]
    lines = source.splitlines(keepends=True)
    hits = [i for i in range(region.first, region.last - 1) if needle in lines[i]]  # 0-based, inside the markers
    assert len(hits) == 1, f"{needle!r} should be on exactly one line of train.py's lesson 8 region"
    line = lines[hits[0]]
    if replacement is None:
        lines[hits[0]] = line[:len(line) - len(line.lstrip())] + "pass\n"
    else:
        lines[hits[0]] = line.replace(needle, replacement)
    mutated = "".join(lines)
    compile(mutated, "train.py", "exec")
    return mutated


def test_recipe_test_fails_for_a_broken_training_loop(tmp_path):
    """Lesson 8's recipe test and its test of the step's batch and DDP's no_sync pass with train.py as it is,
    and fail (an assertion, not a crash) when the training step forgets to zero the gradients, to clip them, to
    set the learning rate, or to divide the loss among the micro-batches (the recipe test), or reads byte
    windows where the BPE baseline needs token windows, or averages gradients on every micro-batch (the step
    test). Each in a teacher copy, in a pytest subprocess."""
    source = (REPO / "train.py").read_text(encoding="utf-8")
    jobs = [("unchanged", source, [RECIPE_TEST, STEP_TEST])]
    jobs += [(name, mutate(source, needle, new), [test]) for name, (needle, new, test) in MUTATIONS.items()]

    def run(job):
        name, text, tests = job
        work = tmp_path / re.sub(r"\W+", "_", name)
        kit.make_copy(work / "repo", student=False)
        (work / "repo" / "train.py").write_text(text, encoding="utf-8")
        proc, results = run_lesson_tests(work / "repo", [LOOP_LESSON], work, files=tests)
        problems = []
        for test in tests:
            found = {t: r for t, r in results.items() if t == test}
            if len(found) != 1:
                output = (proc.stdout + proc.stderr)[-3000:]
                problems.append(f"{name}: {test} did not run once (exit {proc.returncode}):\n{output}")
                continue
            [(lesson, outcome, message)] = found.values()
            failed_an_assertion = outcome == "failure" and re.search(r"^E +(AssertionError\b|assert )", message,
                                                                     re.M)
            if lesson != LOOP_LESSON:
                problems.append(f"{name}: {test} is marked lesson {lesson}, not {LOOP_LESSON}")
            elif name == "unchanged" and outcome != "passed":
                problems.append(f"{name}: {test} should pass, {outcome}:\n{message[-1500:]}")
            elif name != "unchanged" and not failed_an_assertion:
                problems.append(f"{name}: {test} should fail an assertion, {outcome}:\n{message[-1500:]}")
        return problems

    with ThreadPoolExecutor(max_workers=2) as pool:
        problems = [p for found in pool.map(run, jobs) for p in found]
    assert not problems, "\n\n".join(problems)


# ---- the grader: no points for the student version, full marks for the teacher's, none for planted mistakes ----

# lesson -> (file, [(text on one line of that lesson's solution region, the mistake)]): mistakes a student makes,
# chosen so that each breaks its own lesson and none of the later ones (a later lesson's points are lost to its
# own tests, not to an earlier mistake)
PLANTED = {
    1: ("entropy_model.py", [("p = F.softmax(logits.float(), dim=-1)", "p = F.softmax(logits, dim=-1)"),  # bf16
                             ("return -torch.special.xlogy(p, p).sum(dim=-1)",
                              "return (-torch.special.xlogy(p, p).sum(dim=-1)).float()")]),
    2: ("patching.py", [("starts[:, 1:] = entropies > threshold", "starts[:, 1:] = entropies >= threshold")]),
    3: ("encoder.py", [("windows = padded.unfold(1, n, 1)", "windows = padded.unfold(1, n, 1).flip(-1)")]),
    4: ("encoder.py", [("patches = queries + self.cross_attn(", "patches = self.cross_attn(")]),
    5: ("global_transformer.py", [("causal_mask(positions, positions)", "causal_mask(positions, positions, 4)")]),
    6: ("decoder.py", [("patch_ids_from_lengths(patch_lengths[:, 1:], seq_len)",
                        "patch_ids_from_lengths(patch_lengths, seq_len)")]),
    7: ("blt.py", [("return nats_sum / (math.log(2) * n_bytes)", "return nats_sum / n_bytes")]),
    8: ("train.py", [("""            with task.sync_gradients(now=i == len(micro_batches) - 1):
                loss = task.loss(x[part], y[part]) / len(micro_batches)""",
                      """            loss = task.loss(x[part], y[part]) / len(micro_batches)
            with task.sync_gradients(now=i == len(micro_batches) - 1):""")]),
}


def plant_mistakes(root: Path):
    """One mistake per lesson, each inside that lesson's solution region of the copy at root."""
    for lesson, (path, changes) in PLANTED.items():
        text = (root / path).read_text(encoding="utf-8")
        regions = [r for r in kit.find_regions(text, path) if r.lesson == lesson]
        lines = text.splitlines(keepends=True)
        for old, new in changes:
            inside = ["".join(lines[r.first:r.last - 1]) for r in regions]
            assert sum(region.count(old) for region in inside) == 1, f"lesson {lesson}: {old!r} not once in {path}"
            assert text.count(old) == 1, f"{old!r} elsewhere in {path} too"
            text = text.replace(old, new)
            lines = text.splitlines(keepends=True)
        compile(text, path, "exec")
        (root / path).write_text(text, encoding="utf-8")


def test_grader_scores_student_teacher_and_planted_copies(tmp_path, capsys):
    """tools/grade.py on three copies, each graded once (their pytest runs side by side): the student version
    scores nothing, the teacher version full marks, and the version with one planted mistake per lesson loses
    every lesson's points, each to failed tests (not to a missing solution). Each prints its score table."""
    from tools import grade
    assert set(PLANTED) == set(LESSONS), "plant one mistake for every lesson"
    kit.make_copy(tmp_path / "student", student=True)
    kit.make_copy(tmp_path / "teacher", student=False)
    kit.make_copy(tmp_path / "planted", student=False)
    plant_mistakes(tmp_path / "planted")
    names = ["student", "teacher", "planted"]
    with ThreadPoolExecutor(max_workers=3) as pool:
        codes = list(pool.map(lambda n: grade.main([str(tmp_path / n), "--json", str(tmp_path / f"{n}.json")]), names))
    assert codes == [0, 0, 0]
    out = capsys.readouterr().out
    assert len(re.findall(r"^total\s+\d+ / \d+\s+\d+\s+100$", out, re.M)) == 3, out
    results = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in names}
    lessons = {n: {r["lesson"]: r for r in results[n]["lessons"]} for n in names}
    assert sorted(lessons["teacher"]) == LESSONS
    problems = []
    for n in LESSONS:
        student, teacher, planted = lessons["student"][n], lessons["teacher"][n], lessons["planted"][n]
        if not (teacher["tests"] > 0 and teacher["passed"] == teacher["tests"] and teacher["points"] > 0):
            problems.append(f"teacher, lesson {n}: {teacher['passed']}/{teacher['tests']}, {teacher['failed'][:1]}")
        if student["points"] or student["passed"] or student["tests"] != teacher["tests"]:
            problems.append(f"student, lesson {n}: {student['passed']}/{student['tests']}, {student['points']} points")
        if planted["points"] or not planted["failed"] or planted["tests"] != teacher["tests"]:
            problems.append(f"planted, lesson {n}: {planted['passed']}/{planted['tests']}, {planted['points']} points")
        stubs = [f["test"] for f in planted["failed"] if "NotImplementedError" in f["message"]]
        if stubs:
            problems.append(f"planted, lesson {n}: failed as a missing solution: {stubs}")
    assert not problems, "\n".join(problems)
    assert results["teacher"]["points"] == results["teacher"]["max_points"] == 100
    assert results["student"]["points"] == results["planted"]["points"] == 0


def test_grader_refuses_what_is_not_a_copy(tmp_path, capsys):
    from tools import grade
    assert grade.main([str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert grade.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "not a copy of the course" in err and len(err.strip().splitlines()) == 1

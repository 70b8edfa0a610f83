"""The assessment on real nbgrader: the released notebook hides what it must, and a class of ten known submissions
autogrades to exactly the scores each must get (the reference solution with its two DeepSpeed jobs run through Slurm,
a blank one, a partly correct one, an endless loop, edited and deleted tests, a damaged file, a kernel that dies).
Grading the class once (a module fixture) keeps the suite short; each test reads what it needs from that run."""

from __future__ import annotations

import copy
import html
import re
import subprocess
import sys
import time

import nbformat
import pytest

from labs_lib.grading import course as C

# s per non-job cell while autograding here: the slowest, setup's imports, takes ~3 s; the endless loop costs this much
CELL_TIMEOUT = 10
CLASS_BUDGET_S = 600  # the stated time for a class of 10 on 2 cores (docs/grader-guide.md)

ANSWERS = ["q1_answer", "q2_answer", "q3_answer", "q4_answer", "q5_answer", "q6_answer", "q7_answer", "q8_answer",
           "q9_answer", "job_a_answer", "job_b_answer"]
NUMBERS, CODE = ANSWERS[:4], ANSWERS[4:9]
WRONG = {
    "q3_answer": "kv_cache_mb = 2 * 24 * 1024 * 2048 * 2 / 1e6  # forgot that tp=2 splits the heads",
    "q6_answer": "def warmup_forwards(stage, stages, micro_batches):\n    return stages - stage - 1  # no min()",
    "q8_answer": "def top_k_gating(logits, k):\n    return logits.softmax(-1).topk(k, dim=-1)  # not renormalised",
}
# (the submission, its expected autograded points out of 90; None: it cannot be graded)
EXPECTED = {"reference": 90, "blank": 0, "partial": 20, "endless": 60, "edited": 60, "numbers_only": 20,
            "code_only": 45, "wrong_job": 5, "corrupt": None, "kernel_dies": None}


def gid(cell) -> str | None:
    return cell.metadata.get("nbgrader", {}).get("grade_id")


def solution_of(cell) -> str:
    """A source cell's solution as a learner would write it (nbgrader's markers dropped)."""
    return "\n".join(line for line in cell.source.splitlines() if "### BEGIN SOLUTION" not in line
                     and "### END SOLUTION" not in line)


def submission(release, source, answers=(), custom=None, drop=()):
    """The released notebook with ``answers`` filled from the source, ``custom`` {grade_id: code} written over
    any cell (answers or tests), and the cells in ``drop`` deleted."""
    nb = copy.deepcopy(release)
    sources = {gid(c): c for c in source.cells}
    for cell in nb.cells:
        if gid(cell) in answers:
            cell.source = solution_of(sources[gid(cell)])
        if gid(cell) in (custom or {}):
            cell.source = custom[gid(cell)]
    nb.cells = [c for c in nb.cells if gid(c) not in drop]
    return nb


def class_of_ten(release, source) -> dict:
    return {
        "reference": submission(release, source, ANSWERS),
        "blank": release,
        "partial": submission(release, source, ["q1_answer", "q2_answer", "q5_answer"], WRONG),
        "endless": submission(release, source, [a for a in NUMBERS + CODE if a != "q2_answer"],
                              {"q2_answer": "while True:\n    pass"}),
        "edited": submission(release, source, NUMBERS + CODE,
                             {"q3_answer": WRONG["q3_answer"], "q3_test": "pass  # the learner's 'test'"},
                             drop=["q4_test"]),
        "numbers_only": submission(release, source, NUMBERS),
        "code_only": submission(release, source, CODE),
        "wrong_job": submission(release, source, ["q1_answer"], {
            "job_a_answer": 'job_a_config = P.example_config("zero2.json")\njob_a_settings = {}'}),
        "kernel_dies": submission(release, source, ANSWERS[:2], {"q3_answer": "import os\nos._exit(1)"}),
    }


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """A fresh course, its release, a class of ten collected from a zip, autograded once (timed)."""
    monkey = pytest.MonkeyPatch()
    monkey.setenv("LABS_PROFILE", "ci")
    monkey.setenv("LABS_CELL_TIMEOUT", str(CELL_TIMEOUT))
    monkey.delenv("LABS_COURSE_DIR", raising=False)
    base = tmp_path_factory.mktemp("course")
    monkey.setenv("LABS_GRADEBOOK", str(base / "gradebook.db"))
    root = C.course_root(base / "course")
    released = C.release(root)
    release = nbformat.read(released, as_version=4)
    source = nbformat.read(root / "source" / C.ASSIGNMENT / C.NOTEBOOK, as_version=4)
    inbox = base / "inbox"
    for name, nb in class_of_ten(release, source).items():
        (inbox / name).mkdir(parents=True)
        nbformat.write(nb, inbox / name / C.NOTEBOOK)
    (inbox / "corrupt").mkdir()
    (inbox / "corrupt" / C.NOTEBOOK).write_text('{"cells": [ this is not JSON')
    archive = subprocess.run([sys.executable, "-m", "zipfile", "-c", str(base / "class.zip"), str(inbox)], check=True)
    assert archive.returncode == 0
    collected = C.collect(base / "class.zip", root)
    start = time.monotonic()
    outcomes = C.autograde(root)
    seconds = time.monotonic() - start
    yield dict(root=root, release=released, source=source, collected=collected, outcomes=outcomes,
               seconds=seconds, base=base)
    monkey.undo()


# ------------------------------------------------------------------------------------------------- the release
def test_points_add_up_to_the_total_and_the_pass_mark_is_stated():
    source = nbformat.read(C.COURSE_SOURCE / "source" / C.ASSIGNMENT / C.NOTEBOOK, as_version=4)
    points = [c.metadata["nbgrader"].get("points", 0) for c in source.cells if c.metadata["nbgrader"]["grade"]]
    assert sum(points) == C.TOTAL_POINTS
    ids = [gid(c) for c in source.cells]
    assert len(ids) == len(set(ids)) and None not in ids, "every cell needs its own grade_id"
    assert f"Pass mark: {C.PASS_MARK} points" in source.cells[0].source


@pytest.mark.slow
@pytest.mark.slurm
def test_released_notebook_has_no_solution_and_no_hidden_test(graded):
    text = graded["release"].read_text()
    for secret in ("BEGIN SOLUTION", "HIDDEN TESTS", "hidden=True", "all_reduce(x_shard @ weight_shard.t())",
                   "min(stages - stage - 1", "13e9 * (2 + (2 + 12) / 64)", '"stage": 3, "offload_optimizer"'):
        assert secret not in text, f"the student version leaks {secret!r}"
    release = nbformat.read(graded["release"], as_version=4)
    stubs = [c for c in release.cells if c.metadata["nbgrader"].get("solution")]
    assert len(stubs) == len(ANSWERS) + 1
    assert all("YOUR CODE HERE" in c.source or "YOUR ANSWER HERE" in c.source for c in stubs)


# ----------------------------------------------------------------------------------------------- the class
@pytest.mark.slow
@pytest.mark.slurm
def test_a_class_of_ten_autogrades_within_the_stated_time(graded):
    assert sorted(graded["collected"]) == sorted(EXPECTED)
    assert sorted(graded["outcomes"]) == sorted(EXPECTED)
    assert graded["seconds"] < CLASS_BUDGET_S, f"the class took {graded['seconds']:.0f} s"


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.parametrize("student", [s for s, points in EXPECTED.items() if points is not None])
def test_each_submission_gets_exactly_its_expected_score(graded, student):
    outcome = graded["outcomes"][student]
    assert outcome.error is None, outcome.error
    assert outcome.score == EXPECTED[student], f"{student}: {outcome.score} points, expected {EXPECTED[student]}"
    assert outcome.max_score == C.TOTAL_POINTS


@pytest.mark.slow
@pytest.mark.slurm
def test_broken_notebooks_get_a_clear_error_while_the_others_are_graded(graded):
    corrupt, dead = graded["outcomes"]["corrupt"], graded["outcomes"]["kernel_dies"]
    assert corrupt.score is None and "is not a notebook (invalid JSON)" in corrupt.error
    assert dead.score is None and "could not grade this notebook" in dead.error


@pytest.mark.slow
@pytest.mark.slurm
def test_edited_and_deleted_tests_are_graded_with_the_originals(graded):
    autograded = nbformat.read(graded["root"] / "autograded" / "edited" / C.ASSIGNMENT / C.NOTEBOOK, as_version=4)
    cells = {gid(c): c for c in autograded.cells}
    assert "Q.check_number" in cells["q3_test"].source and "q4_test" in cells
    assert cells["q4_test"].outputs == [] or all(o.get("output_type") != "error" for o in cells["q4_test"].outputs)


@pytest.mark.slow
@pytest.mark.slurm
def test_manual_points_feedback_grades_csv_and_certificates(graded, tmp_path):
    root = graded["root"]
    with pytest.raises(ValueError, match="worth 0 to 10 points"):
        C.grade_manually(root, "reference", 11)
    C.grade_manually(root, "reference", 8)
    reference = C.scores(root)["reference"]
    assert reference.score == 98 and reference.passed and not reference.needs_manual_grade
    feedback = C.feedback(root)
    assert {p.parts[-3] for p in feedback} >= {"reference", "partial", "blank"}
    for page in feedback:
        text = html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))  # the code as shown, highlighting removed
        assert "Q.check_number(" in text and "HIDDEN TESTS" not in text and "hidden=True" not in text, page
    partial = html.unescape(re.sub(r"<[^>]+>", "", (root / "feedback" / "partial" / C.ASSIGNMENT /
                                                      "assessment.html").read_text()))
    assert "AssertionError: kv_cache_mb: not within 1% of the expected value" in partial  # the hint, as the check says
    rows = C.export_grades(root, tmp_path / "grades.csv").read_text().splitlines()
    scores = {r.split(",")[3]: float(r.split(",")[9]) for r in rows[1:]}
    assert scores["reference"] == 98 and scores["partial"] == 20 and scores["blank"] == 0
    certificates = C.certificates(root, tmp_path / "certificates")
    assert sorted(certificates) == ["reference"], "only a score at or above the pass mark earns a certificate"
    html_path, pdf_path = certificates["reference"]
    text = html_path.read_text()
    assert "reference" in text and "98 of 100 points" in text and "Tensor parallelism" in text
    assert re.search(r"\d{4}-\d{2}-\d{2}", text) and pdf_path.read_bytes().startswith(b"%PDF")


def test_command_line_bad_input_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "labs_lib.grading", "--course", str(tmp_path / "c"), "collect",
                             str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: no submissions at") and len(result.stderr.splitlines()) == 1

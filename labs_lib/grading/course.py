"""The grader's workflow on real nbgrader: one function (and one command) per step.

    root = course_root()                  # assessment/ (the committed course), or $LABS_COURSE_DIR prepared from it
    release(root)                         # the student version: release/assessment/assessment.ipynb
    collect("inbox/", root)               # submissions (a folder or a zip: <student>/assessment.ipynb or
                                          # <student>.ipynb) -> submitted/<student>/assessment/
    autograde(root)                       # every submission; {student: Outcome}; a broken one never stops the rest
    feedback(root); export_grades(root, "grades.csv"); scores(root)

nbgrader runs as a child process in the course root, with assessment/nbgrader_config.py (kernel pinned, a time limit
per cell, the gradebook at $LABS_GRADEBOOK). Before autograding, each submission is read: one that is not a
notebook is reported by name and left out; test cells a learner deleted are put back from the source (nbgrader
itself restores the ones that were edited).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbformat.reader import NotJSONError

from labs_lib.core.paths import PROJECT_ROOT

ASSIGNMENT = "assessment"
NOTEBOOK = "assessment.ipynb"
COURSE_SOURCE = PROJECT_ROOT / "assessment"  # nbgrader_config.py and source/assessment/assessment.ipynb
TOTAL_POINTS = 100
PASS_MARK = 70


class GradingError(RuntimeError):
    """A grading step failed; the message says which step and why, with nbgrader's log tail."""


@dataclass
class Outcome:
    """One learner's autograding: the score so far (manual points count once graded), or why there is none."""
    student: str
    score: float | None = None
    max_score: float = TOTAL_POINTS
    needs_manual_grade: bool = False
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.score is not None and self.score >= PASS_MARK


# ------------------------------------------------------------------------------------------------ the course root
def course_root(root: str | Path | None = None) -> Path:
    """The course folder: ``root``, else $LABS_COURSE_DIR, else the committed assessment/. A folder other than
    assessment/ gets the configuration and the source copied in (the source afresh each time)."""
    root = Path(root or os.environ.get("LABS_COURSE_DIR") or COURSE_SOURCE).resolve()
    if root != COURSE_SOURCE.resolve():
        root.mkdir(parents=True, exist_ok=True)
        shutil.copy2(COURSE_SOURCE / "nbgrader_config.py", root / "nbgrader_config.py")
        shutil.rmtree(root / "source", ignore_errors=True)
        shutil.copytree(COURSE_SOURCE / "source", root / "source")
    return root


def _with_interpreter_bin() -> dict[str, str]:
    """os.environ with this interpreter's bin folder on PATH: nbgrader's gradebook runs the ``alembic`` command (and
    the kernel it starts must be this environment's) even when the virtual environment is not activated."""
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    return dict(os.environ)


def nbgrader(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``nbgrader *args`` in the course root; GradingError with the log's tail when it fails and ``check``."""
    result = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=root, capture_output=True, text=True,
                            env=_with_interpreter_bin())
    if check and result.returncode != 0:
        raise GradingError(f"nbgrader {args[0]} failed (exit {result.returncode}):\n" + _tail(result))
    return result


def _tail(result: subprocess.CompletedProcess, lines: int = 30) -> str:
    return "\n".join((result.stdout + result.stderr).splitlines()[-lines:])


def release(root: Path) -> Path:
    """The student version (solutions replaced by stubs, hidden tests removed); returns its notebook's path."""
    nbgrader(root, "generate_assignment", ASSIGNMENT, "--force")
    return root / "release" / ASSIGNMENT / NOTEBOOK


# ------------------------------------------------------------------------------------------------------ collecting
def student_id(name: str) -> str:
    """A folder or file name as an nbgrader student id (letters, digits, ``_ . -``)."""
    sid = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).stem if name.endswith(".ipynb") else name).strip("._")
    if not sid:
        raise ValueError(f"cannot make a student id of {name!r}: name the submission after the learner")
    return sid


def _submissions(folder: Path) -> dict[str, Path]:
    """student id -> the submission's folder (holding assessment.ipynb) or notebook file."""
    found = {}
    for entry in sorted(folder.iterdir()):
        if entry.is_dir() and any(entry.glob("*.ipynb")):
            found[student_id(entry.name)] = entry
        elif entry.suffix == ".ipynb":
            found[student_id(entry.name)] = entry
    return found


def _unwrap(folder: Path) -> Path:
    """The class folder inside an unpacked zip: the zip's one top folder when it holds several submissions."""
    inner = [p for p in folder.iterdir() if not p.name.startswith("__MACOSX")]
    if len(inner) == 1 and inner[0].is_dir():
        held = list(inner[0].glob("*.ipynb")) + [d for d in inner[0].iterdir() if d.is_dir() and any(d.glob("*.ipynb"))]
        if len(held) > 1 or any(p.is_dir() for p in held):
            return inner[0]
    return folder


def collect(source: str | Path, root: Path) -> list[str]:
    """Copy every submission in ``source`` (a folder, or a .zip of one) to submitted/<student>/assessment/, the
    notebook named assessment.ipynb; returns the student ids. A folder per learner keeps its other files."""
    source = Path(source)
    if not source.exists():
        raise ValueError(f"no submissions at {source}: give a folder (or .zip) of <student>/assessment.ipynb or "
                         "<student>.ipynb")
    with tempfile.TemporaryDirectory() as unpacked:
        if source.suffix == ".zip":
            with zipfile.ZipFile(source) as z:
                z.extractall(unpacked)
            source = _unwrap(Path(unpacked))
        found = _submissions(source)
        if not found:
            raise ValueError(f"no notebooks in {source}: expected <student>/assessment.ipynb or <student>.ipynb")
        for sid, entry in found.items():
            dest = root / "submitted" / sid / ASSIGNMENT
            shutil.rmtree(dest, ignore_errors=True)
            if entry.is_dir():
                shutil.copytree(entry, dest)
                notebooks = sorted(dest.glob("*.ipynb"))
                if not (dest / NOTEBOOK).exists():
                    notebooks[0].rename(dest / NOTEBOOK)
            else:
                dest.mkdir(parents=True)
                shutil.copy2(entry, dest / NOTEBOOK)
            (dest / "timestamp.txt").write_text(_timestamp(dest / NOTEBOOK))
    return sorted(found)


def _timestamp(path: Path) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f %Z")


# ----------------------------------------------------------------------------------------------------- autograding
def read_submission(path: Path) -> nbformat.NotebookNode:
    """The submitted notebook, or ValueError saying plainly why it cannot be graded."""
    try:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
    except (json.JSONDecodeError, NotJSONError):
        raise ValueError(f"{path.name} is not a notebook (invalid JSON): the file was damaged on the way; ask the "
                         "learner to hand it in again") from None
    except Exception as e:  # noqa: BLE001  (nbformat raises several kinds: each means the same to the grader)
        raise ValueError(f"{path.name} is not a valid notebook ({type(e).__name__}: {str(e)[:200]}): ask the "
                         "learner to hand it in again") from None
    return nb


def restore_test_cells(nb: nbformat.NotebookNode, source: nbformat.NotebookNode) -> int:
    """Put back every locked cell of the source (tests, the job cells, the texts) that ``nb`` lost, after the cell
    that precedes it in the source; returns how many. (Edited ones nbgrader restores itself, by checksum.)"""
    def gid(cell):
        return cell.metadata.get("nbgrader", {}).get("grade_id")

    present = {gid(c) for c in nb.cells if gid(c)}
    restored = 0
    for i, cell in enumerate(source.cells):
        grading = cell.metadata.get("nbgrader", {})
        if gid(cell) in present or grading.get("solution") or not grading.get("locked"):
            continue
        before = [gid(c) for c in source.cells[:i] if gid(c) in present]
        at = 1 + next((j for j, c in enumerate(nb.cells) if gid(c) == before[-1]), -1) if before else 0
        nb.cells.insert(at, nbformat.from_dict(json.loads(json.dumps(cell))))
        present.add(gid(cell))
        restored += 1
    return restored


def _prepare(root: Path) -> dict[str, str]:
    """Read every submission; returns {student: error} for those that cannot be graded (the rest are repaired)."""
    source = nbformat.read(root / "source" / ASSIGNMENT / NOTEBOOK, as_version=4)
    broken = {}
    for folder in sorted((root / "submitted").glob(f"*/{ASSIGNMENT}")):
        sid, path = folder.parent.name, folder / NOTEBOOK
        try:
            nb = read_submission(path)
        except ValueError as e:
            broken[sid] = str(e)
            continue
        if restore_test_cells(nb, source):
            nbformat.write(nb, path)
    return broken


def autograde(root: Path) -> dict[str, Outcome]:
    """Autograde every collected submission (nbgrader autograde, with the source's tests); a submission that is not a
    notebook, or whose kernel died, gets an Outcome with the error and the others are graded all the same."""
    if not (root / "release" / ASSIGNMENT / NOTEBOOK).exists():
        release(root)  # registers the assignment and its tests in the gradebook
    broken = _prepare(root)
    args = ["autograde", ASSIGNMENT, "--force", "--create"]
    if broken:
        args.append("--CourseDirectory.student_id_exclude=" + ",".join(sorted(broken)))
    result = nbgrader(root, *args, check=False)
    outcomes = scores(root)
    for sid, error in broken.items():
        outcomes[sid] = Outcome(sid, error=error)
    failed = re.findall(r"There was an error processing assignment '[^']*' for student '([^']*)'", result.stderr)
    for sid in failed:
        outcomes[sid] = Outcome(sid, error="nbgrader could not grade this notebook (its kernel died or it could "
                                           f"not be run): see the autograde log\n{_tail(result, 15)}")
    if result.returncode != 0 and not failed:
        raise GradingError("nbgrader autograde failed:\n" + _tail(result))
    return dict(sorted(outcomes.items()))


def scores(root: Path) -> dict[str, Outcome]:
    """Every autograded learner's score from the gradebook (manual points included once a grader gave them)."""
    from nbgrader.api import Gradebook, MissingEntry

    outcomes = {}
    with Gradebook(_db_url(root)) as gb:
        for student in gb.students:
            try:
                sub = gb.find_submission(ASSIGNMENT, student.id)
            except MissingEntry:
                continue
            outcomes[student.id] = Outcome(student.id, sub.score, sub.max_score, bool(sub.needs_manual_grade))
    return outcomes


def gradebook_url(root: Path) -> str:
    """The course's SQLite gradebook: $LABS_GRADEBOOK, else gradebook.db in the course root (nbgrader_config.py
    reads it here too)."""
    return "sqlite:///" + os.environ.get("LABS_GRADEBOOK", str(Path(root) / "gradebook.db"))


def _db_url(root: Path) -> str:
    _with_interpreter_bin()  # the Gradebook runs alembic
    return gradebook_url(root)


def grade_manually(root: Path, student: str, points: float, grade_id: str = "explain") -> None:
    """Give a learner's manually graded answer its points (what nbgrader's formgrader does in the browser)."""
    from nbgrader.api import Gradebook, MissingEntry

    with Gradebook(_db_url(root)) as gb:
        try:
            grade = gb.find_grade(grade_id, Path(NOTEBOOK).stem, ASSIGNMENT, student)
        except MissingEntry:
            raise ValueError(f"no autograded answer {grade_id!r} for student {student!r}: autograde first") from None
        if not 0 <= points <= grade.max_score:
            raise ValueError(f"{grade_id} is worth 0 to {grade.max_score:g} points, not {points:g}")
        grade.manual_score = points
        grade.needs_manual_grade = False
        gb.db.commit()


def feedback(root: Path) -> list[Path]:
    """nbgrader's HTML feedback for every autograded learner; returns the files."""
    nbgrader(root, "generate_feedback", ASSIGNMENT, "--force")
    return sorted((root / "feedback").glob(f"*/{ASSIGNMENT}/*.html"))


def export_grades(root: Path, csv_path: str | Path) -> Path:
    """nbgrader's grade export (one row per learner and assignment) as CSV."""
    csv_path = Path(csv_path).resolve()
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    nbgrader(root, "export", f"--CsvExportPlugin.to={csv_path}")
    return csv_path


def learner_names(root: Path) -> dict[str, str]:
    """student id -> the name a certificate shows: first and last name from the gradebook (``nbgrader db student
    import``), else the id."""
    from nbgrader.api import Gradebook

    with Gradebook(_db_url(root)) as gb:
        return {s.id: " ".join(n for n in (s.first_name, s.last_name) if n) or s.id for s in gb.students}


def certificates(root: Path, out_dir: str | Path) -> dict[str, tuple[Path, Path]]:
    """A certificate (HTML and PDF) for every learner whose score reaches the pass mark; {student: (html, pdf)}."""
    from labs_lib.grading.certificate import write_certificate

    names = learner_names(root)
    return {sid: write_certificate(out_dir, names.get(sid, sid), o.score, o.max_score, PASS_MARK)
            for sid, o in scores(root).items() if o.passed}


def validate(notebook: str | Path, root: Path) -> str:
    """nbgrader validate: run the notebook top to bottom with its visible tests; returns nbgrader's report."""
    result = nbgrader(root, "validate", str(Path(notebook).resolve()), check=False)
    if not result.stdout.strip():  # the report goes to stdout; nothing there: validate itself failed
        raise GradingError("nbgrader validate could not run the notebook:\n" + _tail(result))
    return result.stdout.strip()


def self_check(notebook: str | Path, name: str, root: Path, certificate_dir: str | Path) -> Outcome:
    """Self-paced mode: grade one learner's notebook with the hidden tests in a course of their own, write the
    feedback and, from the pass mark, the certificate. The explanation (manually graded) counts 0 here."""
    notebook = Path(notebook)
    read_submission(notebook)  # a clear error for a damaged file, before anything runs
    sid = student_id(name)
    with tempfile.TemporaryDirectory() as inbox:
        shutil.copy2(notebook, Path(inbox) / f"{sid}.ipynb")
        collect(inbox, root)
    outcome = autograde(root).get(sid, Outcome(sid, error="not graded"))
    if outcome.error is None:
        feedback(root)
        if outcome.passed:
            from labs_lib.grading.certificate import write_certificate

            write_certificate(certificate_dir, name, outcome.score, outcome.max_score, PASS_MARK)
    return outcome

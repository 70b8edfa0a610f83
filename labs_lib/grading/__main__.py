"""The grader's and the learner's commands (docs/grader-guide.md).

    python -m labs_lib.grading release                      # the student version, in <course>/release/
    python -m labs_lib.grading collect SUBMISSIONS          # a folder or .zip of <student>/assessment.ipynb or
                                                            # <student>.ipynb
    python -m labs_lib.grading autograde                    # every collected submission; a table of scores
    python -m labs_lib.grading grade-manual STUDENT POINTS  # the explanation's points (or use nbgrader's formgrader)
    python -m labs_lib.grading feedback                     # HTML feedback per learner, in <course>/feedback/
    python -m labs_lib.grading export [--to grades.csv]
    python -m labs_lib.grading certificates [--out DIR]     # HTML + PDF for each learner at or above the pass mark
    python -m labs_lib.grading student-copy [--to notebooks/assessment/assessment.ipynb]   # a learner's copy
    python -m labs_lib.grading validate NOTEBOOK            # the visible tests, as a learner checks before handing in
    python -m labs_lib.grading self-check NOTEBOOK --name "Ada Lovelace"   # self-paced: hidden tests, certificate

``--course DIR`` (or LABS_COURSE_DIR) picks the course folder; default assessment/. Bad input exits 2 with one line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from labs_lib.core.paths import PROJECT_ROOT
from labs_lib.grading import course as C

BUILD = Path(os.environ.get("LABS_BUILD_DIR", PROJECT_ROOT / "build"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m labs_lib.grading", description=__doc__.split("\n\n")[0])
    p.add_argument("--course", help="course folder (default: $LABS_COURSE_DIR, else assessment/)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("release", help="generate the student version")
    sub.add_parser("collect", help="copy submissions into the course").add_argument("submissions")
    sub.add_parser("autograde", help="autograde every collected submission")
    manual = sub.add_parser("grade-manual", help="points for the manually graded explanation")
    manual.add_argument("student")
    manual.add_argument("points", type=float)
    sub.add_parser("feedback", help="HTML feedback for every autograded learner")
    sub.add_parser("export", help="grades as CSV").add_argument("--to", default="grades.csv")
    sub.add_parser("certificates", help="certificates for those who passed").add_argument(
        "--out", default=None, help="folder (default: <course>/certificates)")
    copy = sub.add_parser("student-copy", help="a learner's copy of the student version (never overwrites one)")
    copy.add_argument("--to", default=str(PROJECT_ROOT / "notebooks" / "assessment" / C.NOTEBOOK))
    sub.add_parser("validate", help="run a notebook's visible tests").add_argument("notebook")
    self_check = sub.add_parser("self-check", help="self-paced: grade your own notebook, with your certificate")
    self_check.add_argument("notebook")
    self_check.add_argument("--name", required=True, help="your name, as the certificate shows it")
    return p


def print_table(outcomes: dict[str, C.Outcome]) -> None:
    print(f"{'student':24} {'score':>9}  result")
    for sid, o in outcomes.items():
        if o.error:
            print(f"{sid:24} {'-':>9}  NOT GRADED: {o.error.splitlines()[0]}")
        else:
            manual = " (explanation not graded yet)" if o.needs_manual_grade else ""
            print(f"{sid:24} {o.score:>5g}/{o.max_score:g}  {'passed' if o.passed else 'below the pass mark'}{manual}")


def run(args: argparse.Namespace) -> int:
    if args.command == "self-check":
        root = C.course_root(args.course or BUILD / "assessment_self")
        outcome = C.self_check(args.notebook, args.name, root, BUILD / "certificates")
        print_table({outcome.student: outcome})
        if outcome.passed:
            print(f"certificate: {BUILD / 'certificates'}; feedback: {root / 'feedback' / outcome.student}")
        return 0 if outcome.error is None else 1
    root = C.course_root(args.course)
    if args.command == "release":
        print(C.release(root))
    elif args.command == "collect":
        print("collected:", ", ".join(C.collect(args.submissions, root)))
    elif args.command == "autograde":
        outcomes = C.autograde(root)
        print_table(outcomes)
        return 1 if any(o.error for o in outcomes.values()) else 0
    elif args.command == "grade-manual":
        C.grade_manually(root, args.student, args.points)
        print_table({args.student: C.scores(root)[args.student]})
    elif args.command == "feedback":
        print("\n".join(str(p) for p in C.feedback(root)))
    elif args.command == "export":
        print(C.export_grades(root, args.to))
    elif args.command == "certificates":
        for sid, (html, pdf) in C.certificates(root, args.out or root / "certificates").items():
            print(f"{sid}: {html} {pdf}")
    elif args.command == "student-copy":
        to = Path(args.to)
        if to.exists():
            print(f"{to} exists: your work stays as it is (delete it for a fresh copy)")
            return 0
        to.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(C.release(root), to)
        print(f"your assessment: {to}")
    elif args.command == "validate":
        print(C.validate(args.notebook, root))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, C.GradingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""nbgrader's configuration for the workshop's assessment course (this folder is the course root).

Graders use ``python -m labs_lib.grading`` (or the Makefile's grade-* targets; docs/grader-guide.md); plain
``cd assessment && nbgrader generate_assignment assessment`` works too. A copy of this file in another folder makes
that folder a course root (the grading commands do that for LABS_COURSE_DIR).

    LABS_GRADEBOOK       the SQLite gradebook (default: gradebook.db in the course root)
    LABS_CELL_TIMEOUT    seconds a cell may run while autograding (default 120): an endless loop costs its
                         question, not the run. The practical part's job cells (grade ids run_*) get
                         LABS_JOB_TIMEOUT (default 900): they train on a cluster.
"""

import os
from pathlib import Path

from labs_lib.grading.course import gradebook_url

c = get_config()  # noqa: F821  (nbgrader's config loader defines it)

root = Path(__file__).resolve().parent
c.CourseDirectory.root = str(root)
c.CourseDirectory.course_id = "model-parallelism"
c.CourseDirectory.db_url = gradebook_url(root)

c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"

c.Execute.kernel_name = "python3"
c.Execute.timeout = int(os.environ.get("LABS_CELL_TIMEOUT", "120"))
c.Execute.startup_timeout = 120
JOB_TIMEOUT = int(os.environ.get("LABS_JOB_TIMEOUT", "900"))


def cell_timeout(cell):
    """Seconds this cell may run: the job cells train on a cluster, every other cell gets the cell timeout."""
    grade_id = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id", "")
    return JOB_TIMEOUT if grade_id.startswith("run_") else c.Execute.timeout


c.Execute.timeout_func = cell_timeout

# Feedback shows each learner their graded notebook without the hidden tests' code (nbgrader leaves it in otherwise),
# in the test cells and in their tracebacks: a failed test shows its check's message (labs_lib.grading.feedback)
c.GenerateFeedback.preprocessors = ["nbgrader.preprocessors.GetGrades", "nbgrader.preprocessors.ClearHiddenTests",
                                    "labs_lib.grading.feedback.ShortErrors",
                                    "nbconvert.preprocessors.CSSHTMLHeaderPreprocessor"]

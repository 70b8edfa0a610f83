"""grading: the assessment and its certificate, on real nbgrader (the course lives in assessment/).

questions.py    the assessment's numeric and implementation questions: the checks its test cells call (visible and
                hidden), expected values computed here from labs_lib.estimates and the labs' references
practical.py    the practical part: the learner's DeepSpeed jobs through labs_lib.jobs.launch (Slurm), graded from
                their own outputs (resolved config, each rank's bytes, the losses)
course.py       the grader's workflow: course root, release, collect (folder or zip), autograde (damaged notebooks
                reported, deleted test cells restored), scores, manual grades, feedback, CSV export, certificates,
                validate, self-paced grading
certificate.py  certificates of completion as HTML and PDF
feedback.py     the feedback's failed tests as their checks' messages (no traceback quoting hidden tests)

The command line: ``python -m labs_lib.grading {release,collect,autograde,grade-manual,feedback,export,
certificates,validate,self-check,student-copy}`` (see __main__.py; the Makefile's grade-* and assess-* targets call
it; docs/grader-guide.md walks through it).
"""

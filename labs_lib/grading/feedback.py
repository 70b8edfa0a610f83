"""What a learner's feedback shows of a failed test: the check's message, not the test cell's traceback.

nbgrader's feedback is the autograded notebook as HTML. A failed test cell's output is a traceback that quotes the
lines around the failure, hidden tests included; :class:`ShortErrors` (in assessment/nbgrader_config.py's
``GenerateFeedback.preprocessors``) replaces each graded cell's error output with its last line, e.g.
``AssertionError: q1: not within 1% of the expected value: check the units the question asks for``, which is the
hint the check was written to give.
"""

from __future__ import annotations

from nbconvert.preprocessors import Preprocessor
from traitlets import Bool


class ShortErrors(Preprocessor):
    """Error outputs of graded (test) cells reduced to ``ename: evalue``."""

    enabled = Bool(True)  # nbconvert's preprocessors are off unless enabled; listing this one means it is wanted

    def preprocess_cell(self, cell, resources, index):
        if cell.get("metadata", {}).get("nbgrader", {}).get("grade") and cell.cell_type == "code":
            for output in cell.get("outputs", []):
                if output.get("output_type") == "error":
                    output["traceback"] = [f"{output.get('ename', 'Error')}: {output.get('evalue', '')}"]
        return cell, resources

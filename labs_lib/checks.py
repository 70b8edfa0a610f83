"""Immediate checks for the notebooks' exercises.

An unanswered exercise (``None`` or ``...``) prints a hint and lets the notebook run on, so a learner can run
everything first and come back; a wrong answer raises ``AssertionError`` with the hint; a right one says so.
"""

from __future__ import annotations

import math


def check(name: str, answer, expected, rtol: float = 1e-3, hint: str = "") -> bool:
    """Compare a learner's answer with the expected value (numbers within ``rtol``, anything else by ==)."""
    if answer is None or answer is Ellipsis:
        print(f"⏳ {name}: not answered yet. {hint}".rstrip())
        return False
    if isinstance(expected, (int, float)) and isinstance(answer, (int, float)):
        ok = math.isclose(answer, expected, rel_tol=rtol, abs_tol=0.0 if expected else rtol)
    else:
        ok = answer == expected
    if not ok:
        raise AssertionError(f"❌ {name}: got {answer!r}, which is not right. {hint}".rstrip())
    print(f"✅ {name}: correct ({answer!r})")
    return True

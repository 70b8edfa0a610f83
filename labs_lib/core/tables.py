"""Rows of dicts as a plain-text table, for notebooks and benchmark scripts (no pandas needed)."""

from __future__ import annotations


def format_table(rows: list[dict], digits: int = 2) -> str:
    """The rows as aligned columns, floats with ``digits`` decimals."""
    if not rows:
        return ""
    cols = list(rows[0])
    cells = [[f"{r[c]:,.{digits}f}" if isinstance(r[c], float) else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)

"""Certificates of completion, as HTML and PDF (matplotlib draws the PDF: no other dependency).

    write_certificate("build/certificates", "Ada Lovelace", score=84, max_score=100)   # -> (html path, pdf path)

A certificate names the learner, the date, the score against the pass mark and the labs of the workshop (read from
the notebooks' titles, so a new lab shows up without touching this file).
"""

from __future__ import annotations

import html
import re
from datetime import date
from pathlib import Path

from labs_lib.core.paths import lab_notebooks

COURSE = "Model Parallelism — Building and Deploying Large Neural Networks"


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "learner"


def certificate_html(name: str, score: float, max_score: float, pass_mark: float, when: date,
                     labs: list[str]) -> str:
    items = "".join(f"<li>{html.escape(lab)}</li>" for lab in labs)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Certificate of completion: {html.escape(name)}</title>
<style>body{{font-family:Georgia,serif;max-width:46em;margin:3em auto;text-align:center;border:6px double #345;
padding:2em}} h1{{letter-spacing:.08em}} ul{{text-align:left;display:inline-block}} .name{{font-size:2em}}</style>
</head><body>
<h1>Certificate of completion</h1>
<p>This certifies that</p>
<p class="name">{html.escape(name)}</p>
<p>completed the workshop<br><strong>{html.escape(COURSE)}</strong></p>
<p>and passed its assessment with <strong>{score:g} of {max_score:g} points</strong> (pass mark {pass_mark:g})
on {when.isoformat()}.</p>
<p>Labs:</p><ul>{items}</ul>
</body></html>
"""


def _draw_pdf(path: Path, name: str, score: float, max_score: float, pass_mark: float, when: date,
              labs: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11.69, 8.27))  # A4 landscape
    fig.patches.append(matplotlib.patches.Rectangle((0.03, 0.04), 0.94, 0.92, transform=fig.transFigure,
                                                    fill=False, linewidth=4, edgecolor="#334455"))
    lines = [(0.86, "Certificate of completion", 30, "bold"), (0.77, "This certifies that", 14, "normal"),
             (0.69, name, 28, "bold"), (0.61, "completed the workshop", 14, "normal"), (0.56, COURSE, 16, "bold"),
             (0.49, f"and passed its assessment with {score:g} of {max_score:g} points (pass mark {pass_mark:g}) "
                    f"on {when.isoformat()}.", 13, "normal")]
    for y, text, size, weight in lines:
        fig.text(0.5, y, text, ha="center", va="center", fontsize=size, fontweight=weight, family="serif")
    columns = [labs[: (len(labs) + 1) // 2], labs[(len(labs) + 1) // 2:]]
    for x, column in zip((0.12, 0.52), columns):
        for i, lab in enumerate(column):
            fig.text(x, 0.40 - i * 0.045, "• " + lab, fontsize=10, family="serif")
    fig.savefig(path, format="pdf")


def write_certificate(out_dir: str | Path, name: str, score: float, max_score: float, pass_mark: float,
                      when: date | None = None) -> tuple[Path, Path]:
    """Write ``<name>.html`` and ``<name>.pdf`` into ``out_dir``; returns both paths."""
    when = when or date.today()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labs = [f"{number} {title}" for number, title, _ in lab_notebooks()]
    stem = out_dir / _file_stem(name)
    html_path, pdf_path = stem.with_suffix(".html"), stem.with_suffix(".pdf")
    html_path.write_text(certificate_html(name, score, max_score, pass_mark, when, labs))
    _draw_pdf(pdf_path, name, score, max_score, pass_mark, when, labs)
    return html_path, pdf_path

"""A run folder: what every job writes and every notebook reads back.

    out/metrics.jsonl   one JSON object per logged step (read_metrics, append_metrics, truncate_metrics)
    out/config.json     the resolved settings (write_json)
    out/job.log         the job's output (labs_lib.jobs.launch)
    out/...             the job's own results (checkpoints/, trace/, pipeline_rank<r>.json, run.json, ...)

JSON files are written atomically (a reader never sees half a file); metrics are appended a line at a time and read
back whole lines only, so a notebook can follow a running job.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

METRICS = "metrics.jsonl"


def read_metrics(out: str | Path) -> list[dict]:
    """The records a run wrote to ``metrics.jsonl``, oldest first (empty before its first one; a line still being
    written is left out)."""
    path = Path(out) / METRICS
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.split("\n")[:-1]  # whole lines only: the last one may be half written
    return [json.loads(line) for line in lines if line.strip()]


def append_metrics(out: str | Path, record: dict) -> None:
    with open(Path(out) / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(out: str | Path, last_step: int) -> None:
    """Keep the records up to ``last_step`` (a resumed run trains the later steps again); none when 0."""
    path = Path(out) / METRICS
    kept = [r for r in read_metrics(out) if r["step"] <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def write_json(path: str | Path, obj, indent: int | None = 1) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (a temporary file renamed into place)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent))
    os.replace(tmp, path)


def read_json(path: str | Path):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no {path.name} in {path.parent}: has the job run? (see its job.log)")
    return json.loads(path.read_text())


def fresh_run_dir(out: str | Path, resume: bool = False) -> Path:
    """The run folder, emptied first unless ``resume`` (a new run never resumes stale checkpoints by mistake)."""
    out = Path(out).resolve()
    if not resume and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out

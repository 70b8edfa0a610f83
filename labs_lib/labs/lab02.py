"""Lab 02 (notebooks/02_profiling.ipynb): reading back what a profiled training job wrote into its run folder.

    top_operators(run, rank=0, n=12)    the rank's top operators (trace/ops_rank<r>.json), as table rows
    breakdown_rows(traces)              compute / communication / overlap / idle of every profiled step of every rank
"""

from __future__ import annotations

from pathlib import Path

from labs_lib.core.runs import read_json
from labs_lib.measure.trace import step_breakdown


def top_operators(run: str | Path, rank: int = 0, n: int = 12) -> list[dict]:
    """The ``n`` operators with the most self time on ``rank``, as the profiler wrote them, in table rows."""
    ops = read_json(Path(run) / "trace" / f"ops_rank{rank}.json")
    return [{"operator": o["name"][:40], "calls": o["calls"], "self ms": o["self_ms"], "GFLOP": o["flops"] / 1e9}
            for o in ops[:n]]


def breakdown_rows(traces: dict[int, Path]) -> list[dict]:
    """One row per rank and profiled step (milliseconds) from ``{rank: trace file}``
    (:func:`labs_lib.measure.trace.trace_files`)."""
    return [{"rank": rank, **step} for rank, path in traces.items() for step in step_breakdown(path)]

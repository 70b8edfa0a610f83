"""Lab 02 (notebooks/02_profiling.ipynb): reading back what a profiled training job wrote into its run folder.

    top_operators(run, rank=0, n=12)    the rank's top operators (trace/ops_rank<r>.json), as table rows
    breakdown_rows(traces)              compute / communication / overlap / idle of every profiled step of every rank
    check_bottleneck(answer, trace); check_flops_per_token(answer, model)   the exercises' checks
"""

from __future__ import annotations

from pathlib import Path

from labs_lib.core.runs import read_json
from labs_lib.labs.checks import check
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


# ------------------------------------------------------------------------------------------------ exercise checks

def step_shares(trace: str | Path) -> dict[str, float]:
    """Rank's last profiled step, in ms: compute, exposed communication (comm - overlap), idle."""
    last = step_breakdown(trace)[-1]
    return {"compute": last["compute_ms"], "exposed communication": last["comm_ms"] - last["overlap_ms"],
            "idle": last["idle_ms"]}


def check_bottleneck(answer, trace: str | Path) -> bool:
    shares = step_shares(trace)
    return check("bottleneck of rank 0's step", answer, max(shares, key=shares.get),
                 hint='answer "compute", "exposed communication" or "idle": the largest part of the step',
                 more="compare compute_ms, comm_ms - overlap_ms and idle_ms in the table above")


def check_flops_per_token(answer, model) -> bool:
    cfg = model.config
    expected = 6 * model.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    return check("FLOPs per token", answer, expected,
                 hint="6 FLOPs per parameter per token (forward 2, backward 4), plus attention's scores and sums",
                 more="6 * model.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size")

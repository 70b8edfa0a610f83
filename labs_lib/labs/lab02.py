"""Lab 02 (notebooks/02_profiling.ipynb): reading back what a profiled training job wrote into its run folder.

    top_operators(run, rank=0, n=12)    the rank's top operators (trace/ops_rank<r>.json), as table rows
    breakdown_rows(traces)              compute / communication / overlap / idle of every profiled step of every rank
    step_intervals(trace)               per profiled step: its compute and communication intervals (microseconds)
    check_bottleneck(answer, trace)     exercise 1: the largest part of rank 0's last profiled step
    check_exposed_communication(fn, traces)   exercise 2: the learner's exposed communication of a step, against
                                        step_breakdown on every profiled step of every rank (and a worked example)
    check_flops_per_token(answer, model)      exercise 3: 6N + 12·L·h·s
    start_tensorboard(logdir)           a TensorBoard server over the runs (stopped at the latest when the kernel exits)
    tensorboard_view(server, run)       what that server shows of a run: its Scalars tags, its PyTorch Profiler trace
"""

from __future__ import annotations

import atexit
import json
import math
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from labs_lib.core.runs import read_json
from labs_lib.labs.checks import check
from labs_lib.measure.tensorboard import Server, serve
from labs_lib.measure.trace import step_breakdown, step_windows


def top_operators(run: str | Path, rank: int = 0, n: int = 12) -> list[dict]:
    """The ``n`` operators with the most self time on ``rank``, as the profiler wrote them, in table rows."""
    ops = read_json(Path(run) / "trace" / f"ops_rank{rank}.json")
    return [{"operator": o["name"][:40], "calls": o["calls"], "self ms": o["self_ms"], "GFLOP": o["flops"] / 1e9}
            for o in ops[:n]]


def breakdown_rows(traces: dict[int, Path]) -> list[dict]:
    """One row per rank and profiled step (milliseconds) from ``{rank: trace file}``
    (:func:`labs_lib.measure.trace.trace_files`)."""
    return [{"rank": rank, **step} for rank, path in traces.items() for step in step_breakdown(path)]


def step_intervals(trace: str | Path) -> list[tuple[list, list]]:
    """Per profiled step of one rank's trace: (compute, communication), each a sorted list of disjoint (start, end)
    intervals in microseconds, cut to the step (what :func:`~labs_lib.measure.trace.step_breakdown` measures)."""
    return [(compute, comm) for _, _, _, compute, comm in step_windows(trace)]


# ------------------------------------------------------------------------------------------------ TensorBoard

def start_tensorboard(logdir: str | Path) -> Server:
    """:func:`~labs_lib.measure.tensorboard.serve` on a free port; ``server.stop()`` ends it, and the kernel's exit
    does too (a notebook that fails or restarts leaves no server behind)."""
    server = serve(logdir)
    atexit.register(server.stop)
    return server


def _get(server: Server, path: str, **query):
    url = f"{server.url}/data/plugin/{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())


def tensorboard_view(server: Server, run: str | Path, timeout_s: float = 30.0) -> list[dict]:
    """What ``server`` (over a folder that holds ``run``) shows of the run, asked over its HTTP API, one row per tab:
    the Scalars tab's tags of ``<run>/tensorboard`` and the PyTorch Profiler tab's workers (one per rank's trace) and
    views of ``<run>/trace``. TensorBoard finds runs lazily: polls until both are there, up to ``timeout_s``."""
    name = Path(run).resolve().relative_to(server.logdir).as_posix()
    scalars, trace = f"{name}/tensorboard", f"{name}/trace"
    tags, workers = [], []
    deadline = time.monotonic() + timeout_s
    while True:
        tags = tags or sorted(_get(server, "scalars/tags").get(scalars, {}))
        if not workers and trace in _get(server, "pytorch_profiler/runs")["runs"]:
            workers = _get(server, "pytorch_profiler/workers", run=trace, view="Overview")
        if (tags and workers) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if not (tags and workers):
        raise TimeoutError(f"TensorBoard at {server.url} showed no {'scalars' if not tags else 'trace'} of {name} "
                           f"within {timeout_s:.0f} s; see {server.log}")
    views = _get(server, "pytorch_profiler/views", run=trace)
    return [{"tab": "Scalars", "run": scalars, "shows": ", ".join(tags)},
            {"tab": "PyTorch Profiler", "run": trace, "shows": f"workers {', '.join(workers)}; views "
                                                               f"{', '.join(views)}"}]


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


# Exercise 2: a worked example (a step of 100 µs: compute 0-40 and 60-100, an all-reduce on gloo's thread 30-70,
# of which 20 µs run while nothing computes), then every profiled step of the run's own traces.
EXPOSED = "exposed communication of a step"
_EXAMPLE_EVENTS = [{"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#1", "ts": 0, "dur": 100, "tid": 1},
                   {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 40, "tid": 1},
                   {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 60, "dur": 40, "tid": 1},
                   {"ph": "X", "cat": "user_annotation", "name": "gloo:all_reduce", "ts": 30, "dur": 40, "tid": 2}]
_EXPOSED_MORE = ("exposed = 0; for each (cs, ce) in comm: hidden = sum(max(0, min(ce, e) - max(cs, s)) for s, e in "
                 "compute); exposed += (ce - cs) - hidden. Return exposed / 1e3 (the trace counts microseconds)")


def _exposed_cases(traces: dict[int, Path]):
    """(which step, compute, comm, expected exposed ms), one at a time: the worked example's step, then every rank's
    profiled steps."""
    with tempfile.TemporaryDirectory() as tmp:
        example = Path(tmp) / "example.pt.trace.json"
        example.write_text(json.dumps({"traceEvents": _EXAMPLE_EVENTS}))
        for label, path in [("the worked example", example)] + [(f"rank {r}", p) for r, p in sorted(traces.items())]:
            for (compute, comm), row in zip(step_intervals(path), step_breakdown(path)):
                yield f"{label}, {row['step']}", compute, comm, row["comm_ms"] - row["overlap_ms"]


def _exposed_diagnosis(got: float, want: float, comm: list) -> str:
    comm_ms = sum(e - s for s, e in comm) / 1e3
    if math.isclose(got, want * 1e3, rel_tol=1e-6):
        return "right, but in microseconds (the trace's unit): return milliseconds"
    if math.isclose(got, comm_ms, rel_tol=1e-6) or math.isclose(got, comm_ms * 1e3, rel_tol=1e-6):
        return ("that is all of the communication: subtract the part of it that runs while compute runs (the "
                "overlap is hidden: it costs no step time)")
    return ("for every communication interval, take away the time that compute intervals cover inside it; what is "
            "left, summed, is the exposed communication")


def check_exposed_communication(fn, traces: dict[int, Path]) -> bool:
    """Exercise 2: ``fn(compute, comm) -> ms``, the communication time during which nothing computes, for one step's
    intervals (microseconds). Checked on a worked example, then on every profiled step of ``traces`` ({rank: trace
    file}) against :func:`~labs_lib.measure.trace.step_breakdown`'s ``comm_ms - overlap_ms``."""
    hint = "communication time minus the part of it that compute covers, in ms"
    if fn is None or fn is Ellipsis:
        return check(EXPOSED, None, None, hint=hint, more=_EXPOSED_MORE)
    steps = 0
    for label, compute, comm, want in _exposed_cases(traces):
        steps += 1
        got = fn([tuple(i) for i in compute], [tuple(i) for i in comm])
        if got is None or got is Ellipsis:
            return check(EXPOSED, None, None, hint=hint, more=_EXPOSED_MORE)
        if not isinstance(got, (int, float)):
            return check(EXPOSED, False, True, hint=f"{label}: return a number of milliseconds, got {got!r}",
                         more=_EXPOSED_MORE)
        if not math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6):
            example = f"compute {compute}, comm {comm} (µs): " if label.startswith("the worked") else ""
            return check(EXPOSED, False, True, more=_EXPOSED_MORE,
                         hint=f"{label}: {example}expected {want:.4g} ms, got {got:.4g}; "
                              f"{_exposed_diagnosis(got, want, comm)}")
    check(EXPOSED, True, True, hint=hint, more=_EXPOSED_MORE)
    print(f"   the worked example and all {steps - 1} profiled steps of {len(traces)} ranks agree with "
          "step_breakdown")
    return True


def check_flops_per_token(answer, model) -> bool:
    cfg = model.config
    expected = 6 * model.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    return check("FLOPs per token", answer, expected,
                 hint="6 FLOPs per parameter per token (forward 2, backward 4), plus attention's scores and sums",
                 more="6 * model.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size")

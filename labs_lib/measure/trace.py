"""Where training time goes: torch.profiler traces, top operators, the compute / communication split, collectives.

    python -m labs_lib.train --profile ci --out build/runs/prof --trace-steps 3      # one process
    torchrun --standalone --nproc-per-node=2 -m labs_lib.train --profile ci --out build/runs/prof --trace-steps 3

writes ``trace/rank<r>.*.pt.trace.json`` (Chrome / Perfetto / TensorBoard's profiler plugin) and
``trace/ops_rank<r>.json`` (the top operators with self time, calls and FLOPs) for every rank. Then::

    step_breakdown(trace_file)   # per profiled step: compute, communication, their overlap, idle
    collectives(trace_file)      # the collectives a rank launched in a profiled step, with shapes
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

# Names of collective operations in traces: c10d's operators, the backends' own spans (gloo's run on its worker
# threads) and NCCL kernels.
COMM_MARKERS = ("nccl", "gloo:", "c10d::", "record_param_comms")


@contextlib.contextmanager
def profile_steps(out_dir: str | Path, rank: int = 0, wait: int = 1, warmup: int = 1, active: int = 3,
                  cuda: bool | None = None):
    """A ``torch.profiler`` session over training steps; call ``prof.step()`` after each step.

    Skips ``wait`` steps, warms up for ``warmup``, records ``active``; then writes the rank's Chrome trace and its
    top-operator table (``ops_rank<r>.json``) to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() if cuda is None else cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    write_trace = tensorboard_trace_handler(str(out_dir), worker_name=f"rank{rank}")

    def on_ready(prof):
        write_trace(prof)
        (out_dir / f"ops_rank{rank}.json").write_text(json.dumps(top_ops(prof, 30), indent=1))

    with profile(activities=activities, schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1),
                 on_trace_ready=on_ready, record_shapes=True, with_flops=True) as prof:
        yield prof


def top_ops(prof, n: int = 15) -> list[dict]:
    """The ``n`` operators with the most self time: name, calls, self and total time (ms), FLOPs."""
    use_cuda = any(getattr(e, "self_device_time_total", 0) for e in prof.key_averages())
    key = "self_device_time_total" if use_cuda else "self_cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:n]
    return [{"name": e.key, "calls": e.count, "self_ms": getattr(e, key) / 1e3,
             "total_ms": (e.device_time_total if use_cuda else e.cpu_time_total) / 1e3, "flops": e.flops or 0}
            for e in rows]


def trace_files(trace_dir: str | Path) -> dict[int, Path]:
    """{rank: newest Chrome trace file} in a trace folder."""
    found: dict[int, Path] = {}
    for path in sorted(glob.glob(str(Path(trace_dir) / "rank*.pt.trace.json")), key=lambda p: Path(p).stat().st_mtime):
        rank = int(Path(path).name.split(".")[0].removeprefix("rank"))
        found[rank] = Path(path)
    return dict(sorted(found.items()))


def is_comm(name: str) -> bool:
    lowered = name.lower()
    return any(marker in lowered for marker in COMM_MARKERS)


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in intervals)


def clip_intervals(intervals, start: float, end: float) -> list[tuple[float, float]]:
    """The parts of ``(start, end)`` intervals that fall inside one window (a step), in order."""
    return [(max(s, start), min(e, end)) for s, e in intervals if e > start and s < end]


def _intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length where two unions of intervals overlap."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def timeline(trace_path: str | Path) -> dict:
    """Compute and communication intervals (microseconds) and the profiled steps of one rank's trace.

    On a GPU trace the work is the device kernels (NCCL kernels are communication). On a CPU trace, compute is the
    operators on the training thread and communication the collectives, including the time the backend's worker
    threads (gloo) spend on them while the training thread computes or waits."""
    events = [e for e in json.loads(Path(trace_path).read_text())["traceEvents"] if e.get("ph") == "X"]
    steps = [e for e in events if e["name"].startswith("ProfilerStep#")]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    if kernels:
        work = kernels
    else:
        main_tid = steps[0]["tid"] if steps else None
        work = [e for e in events if (e.get("cat") == "cpu_op" and e["tid"] == main_tid) or is_comm(e["name"])]
    compute = _union([(e["ts"], e["ts"] + e["dur"]) for e in work if not is_comm(e["name"])])
    comm = _union([(e["ts"], e["ts"] + e["dur"]) for e in work if is_comm(e["name"])])
    return {"steps": [(e["name"], e["ts"], e["ts"] + e["dur"]) for e in steps], "compute": compute, "comm": comm}


def collectives(trace_path: str | Path, step: int = 0) -> list[dict]:
    """The collectives one rank launched in profiled step ``step``, in order: c10d's operator name without the
    namespace (``allreduce_``, ``_allgather_base_``, ...), the tensor's shape and its number of elements. Needs a
    trace recorded with shapes (``profile_steps`` does)."""
    events = [e for e in json.loads(Path(trace_path).read_text())["traceEvents"] if e.get("ph") == "X"]
    steps = sorted((e for e in events if e["name"].startswith("ProfilerStep#")), key=lambda e: e["ts"])
    if not steps:
        raise ValueError(f"{trace_path} has no profiled step (ProfilerStep#): was it written by profile_steps?")
    start, end = steps[step]["ts"], steps[step]["ts"] + steps[step]["dur"]
    calls = sorted((e for e in events if e["name"].startswith("c10d::") and start <= e["ts"] < end),
                   key=lambda e: e["ts"])
    rows = []
    for e in calls:
        dims = (e.get("args", {}).get("Input Dims") or [[]])[0]
        shape = dims[0] if dims and isinstance(dims[0], list) else dims  # a TensorList's first tensor
        rows.append({"op": e["name"].removeprefix("c10d::"), "shape": tuple(shape), "numel": math.prod(shape)})
    return rows


def step_windows(trace_path: str | Path) -> list[tuple[str, float, float, list, list]]:
    """Per profiled step of one rank's trace: ``(name, start, end, compute, comm)``, the last two sorted disjoint
    ``(start, end)`` intervals in microseconds cut to the step."""
    tl = timeline(trace_path)
    return [(name, start, end, clip_intervals(tl["compute"], start, end), clip_intervals(tl["comm"], start, end))
            for name, start, end in tl["steps"]]


def step_breakdown(trace_path: str | Path) -> list[dict]:
    """Per profiled step (milliseconds): total, compute, communication, overlap of the two, and idle.

    ``compute + comm - overlap + idle == total``: exposed communication is ``comm - overlap``."""
    rows = []
    for name, start, end, compute, comm in step_windows(trace_path):
        overlap = _intersection(compute, comm)
        busy = _length(compute) + _length(comm) - overlap
        rows.append({"step": name, "total_ms": (end - start) / 1e3, "compute_ms": _length(compute) / 1e3,
                     "comm_ms": _length(comm) / 1e3, "overlap_ms": overlap / 1e3,
                     "idle_ms": (end - start - busy) / 1e3})
    return rows


def collective_share(trace_path: str | Path, markers: tuple[str, ...]) -> float:
    """The share of the profiled steps' time in which a collective whose name contains one of ``markers`` (e.g.
    ``("alltoall", "all_to_all")``) ran, on one rank's trace (the backend's worker threads included)."""
    events = [e for e in json.loads(Path(trace_path).read_text())["traceEvents"] if e.get("ph") == "X"]
    steps = [(e["ts"], e["ts"] + e["dur"]) for e in events if e["name"].startswith("ProfilerStep#")]
    if not steps:
        raise ValueError(f"{trace_path} has no profiled step (ProfilerStep#): was it written by profile_steps?")
    chosen = _union([(e["ts"], e["ts"] + e["dur"]) for e in events
                     if is_comm(e["name"]) and any(m in e["name"].lower() for m in markers)])
    inside = sum(_length(clip_intervals(chosen, start, end)) for start, end in steps)
    return inside / sum(end - start for start, end in steps)

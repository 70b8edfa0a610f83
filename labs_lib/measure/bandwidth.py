"""All-reduce bandwidth against message size, measured the way nccl-tests' all_reduce_perf measures it.

    torchrun --standalone --nproc-per-node=2 -m labs_lib.measure.bandwidth --out build/runs/bw     # one node
    ... -m labs_lib.measure.bandwidth --out build/runs/bw --collectives all_reduce reduce_scatter all_gather
    sbatch --nodes=2 slurm/train_gpt.sbatch ...   # via labs_lib.jobs.launch("labs_lib.measure.bandwidth", ...)

For each message size: a few warm-up all-reduces, then ``--iters`` timed ones; the time of a size is the slowest
rank's mean (an all-reduce ends on every rank only when the last one has its result; the mean, not the median,
because on CPUs shared with other processes the descheduled iterations are part of what a job pays). As in nccl-tests
(doc/PERFORMANCE.md): algorithm bandwidth algbw = bytes / time, bus bandwidth busbw = algbw · 2(n − 1)/n, the
rate each link of a ring all-reduce carries, comparable across rank counts and with a link's data-sheet speed.

``--collectives`` adds reduce-scatter and all-gather (reduce_scatter_perf, all_gather_perf): the size is the whole
tensor (the reduce-scatter's input, the all-gather's output) and busbw = algbw · (n − 1)/n, since each rank sends
and receives (n − 1)/n of it. On NVLink / InfiniBand the three reach about the same busbw; gloo's reduce-scatter and
all-gather are slower per byte than its all-reduce, which is why the planner's CPU preset fits each on its own.

Writes ``out/bandwidth.json`` ({"world_size", "backend", "nodes", "rows": [{bytes, time_s, algbw, busbw}]}: the
all-reduce's; and "collectives": {name: rows} for every collective measured) and one metrics.jsonl record per
collective and size (``step`` = its index, for the launcher's progress bar).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from labs_lib.core.config import parse_job_args
from labs_lib.core.dist import all_gather_single, cleanup, init_distributed, print0, reduce_scatter_single
from labs_lib.core.runs import append_metrics, write_json

DEFAULT_SIZES = [2**k for k in range(10, 25, 2)]  # 1 KiB .. 16 MiB, every factor of 4
COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather")


def bus_factor(collective: str, world_size: int) -> float:
    """nccl-tests' busbw / algbw: 2(n − 1)/n for an all-reduce, (n − 1)/n for a reduce-scatter or all-gather."""
    if world_size < 2:
        return 1.0
    return (2 if collective == "all_reduce" else 1) * (world_size - 1) / world_size


def bus_bandwidth(algbw: float, world_size: int, collective: str = "all_reduce") -> float:
    """nccl-tests' bus bandwidth: algbw · 2(n − 1)/n for an all-reduce, algbw · (n − 1)/n for the other two."""
    return algbw * bus_factor(collective, world_size)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m labs_lib.measure.bandwidth", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for bandwidth.json and metrics.jsonl")
    p.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES, help="message sizes in bytes")
    p.add_argument("--iters", type=int, default=40, help="timed all-reduces per size")
    p.add_argument("--warmup", type=int, default=3, help="untimed all-reduces per size first")
    p.add_argument("--collectives", nargs="+", choices=COLLECTIVES, default=["all_reduce"],
                   help="what to time at every size (all_reduce is always measured: its rows are the link's)")
    p.add_argument("--no-progress", action="store_true", help="accepted like every job module's (no bar here)")
    return p


def check_args(argv: list[str], world_size: int) -> int:
    """The pre-launch check (labs_lib.jobs.launch): returns the number of records the job writes."""
    a = parse_job_args(build_parser(), argv)
    if world_size < 2:
        raise ValueError("an all-reduce bandwidth needs at least 2 ranks: launch it with 2 or more")
    if a.iters < 1 or min(a.sizes) < 4:
        raise ValueError("--iters must be >= 1 and every --sizes value >= 4 bytes (one float32)")
    return len(a.sizes) * len(_collectives(a))


def _collectives(args) -> list[str]:
    return ["all_reduce"] + [c for c in dict.fromkeys(args.collectives) if c != "all_reduce"]


def _operation(collective: str, nbytes: int, world_size: int, device: torch.device):
    """The collective on a float32 tensor of ``nbytes`` (rounded to whole shards), as a call without arguments."""
    shard = max(nbytes // 4 // world_size, 1)
    whole = torch.ones(shard * world_size if collective != "all_reduce" else max(nbytes // 4, 1), device=device)
    if collective == "all_reduce":
        return lambda: dist.all_reduce(whole)
    part = torch.ones(shard, device=device)
    if collective == "reduce_scatter":
        return lambda: reduce_scatter_single(part, whole)
    return lambda: all_gather_single(whole, part)


def time_collective(collective: str, nbytes: int, iters: int, warmup: int, device: torch.device) -> float:
    """Seconds per ``collective`` of ``nbytes`` (float32), the slowest rank's mean over ``iters``: the mean, as
    nccl-tests reports it, because a training job pays for the slow iterations too."""
    run = _operation(collective, nbytes, dist.get_world_size(), device)
    for _ in range(warmup):
        run()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = torch.tensor([(time.perf_counter() - start) / iters], dtype=torch.float64, device=device)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return seconds.item()


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    info = init_distributed()
    out = Path(a.out)
    if info.world_size < 2:
        raise SystemExit("an all-reduce bandwidth needs at least 2 ranks: run it under torchrun or Slurm")
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", os.environ.get("SLURM_NNODES", 1)))
    measured, step = {}, 0
    for collective in _collectives(a):
        rows = measured[collective] = []
        for nbytes in a.sizes:
            seconds = time_collective(collective, nbytes, a.iters, a.warmup, info.device)
            algbw = nbytes / seconds
            row = {"bytes": nbytes, "time_s": seconds, "algbw": algbw,
                   "busbw": bus_bandwidth(algbw, info.world_size, collective)}
            rows.append(row)
            step += 1
            if info.is_main:
                append_metrics(out, {"step": step, "collective": collective, **row})
            print0(f"{collective:>14} {nbytes:>10,d} B  {seconds * 1e6:10.1f} us  algbw {algbw / 1e9:7.3f} GB/s  "
                   f"busbw {row['busbw'] / 1e9:7.3f} GB/s")
    if info.is_main:
        write_json(out / "bandwidth.json", {"world_size": info.world_size, "backend": info.backend,
                                            "nodes": nodes, "rows": measured["all_reduce"],
                                            "collectives": measured})
    cleanup()


if __name__ == "__main__":
    main()

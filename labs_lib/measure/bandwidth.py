"""All-reduce bandwidth against message size, measured the way nccl-tests' all_reduce_perf measures it.

    torchrun --standalone --nproc-per-node=2 -m labs_lib.measure.bandwidth --out build/runs/bw     # one node
    sbatch --nodes=2 slurm/train_gpt.sbatch ...   # via labs_lib.jobs.launch("labs_lib.measure.bandwidth", ...)

For each message size: a few warm-up all-reduces, then ``--iters`` timed ones; the time of a size is the slowest
rank's mean (an all-reduce ends on every rank only when the last one has its result; the mean, not the median,
because on CPUs shared with other processes the descheduled iterations are part of what a job pays). As in nccl-tests
(doc/PERFORMANCE.md): algorithm bandwidth algbw = bytes / time, bus bandwidth busbw = algbw · 2(n − 1)/n, the
rate each link of a ring all-reduce carries, comparable across rank counts and with a link's data-sheet speed.

Writes ``out/bandwidth.json`` ({"world_size", "backend", "nodes", "rows": [{bytes, time_s, algbw, busbw}]}) and
one metrics.jsonl record per size (``step`` = its index, for the launcher's progress bar).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from labs_lib.core.config import parse_job_args
from labs_lib.core.dist import cleanup, init_distributed, print0
from labs_lib.core.runs import append_metrics, write_json

DEFAULT_SIZES = [2**k for k in range(10, 25, 2)]  # 1 KiB .. 16 MiB, every factor of 4


def bus_bandwidth(algbw: float, world_size: int) -> float:
    """nccl-tests' bus bandwidth of an all-reduce: algbw · 2(n − 1)/n."""
    return algbw * 2 * (world_size - 1) / world_size if world_size > 1 else algbw


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m labs_lib.measure.bandwidth", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for bandwidth.json and metrics.jsonl")
    p.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES, help="message sizes in bytes")
    p.add_argument("--iters", type=int, default=40, help="timed all-reduces per size")
    p.add_argument("--warmup", type=int, default=3, help="untimed all-reduces per size first")
    p.add_argument("--no-progress", action="store_true", help="accepted like every job module's (no bar here)")
    return p


def check_args(argv: list[str], world_size: int) -> int:
    """The pre-launch check (labs_lib.jobs.launch): returns the number of records the job writes."""
    a = parse_job_args(build_parser(), argv)
    if world_size < 2:
        raise ValueError("an all-reduce bandwidth needs at least 2 ranks: launch it with 2 or more")
    if a.iters < 1 or min(a.sizes) < 4:
        raise ValueError("--iters must be >= 1 and every --sizes value >= 4 bytes (one float32)")
    return len(a.sizes)


def time_all_reduce(nbytes: int, iters: int, warmup: int, device: torch.device) -> float:
    """Seconds per all-reduce of ``nbytes`` (float32), the slowest rank's mean over ``iters``: the mean, as
    nccl-tests reports it, because a training job pays for the slow iterations too."""
    tensor = torch.ones(max(nbytes // 4, 1), dtype=torch.float32, device=device)
    for _ in range(warmup):
        dist.all_reduce(tensor)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(tensor)
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
    rows = []
    for i, nbytes in enumerate(a.sizes):
        seconds = time_all_reduce(nbytes, a.iters, a.warmup, info.device)
        algbw = nbytes / seconds
        row = {"bytes": nbytes, "time_s": seconds, "algbw": algbw, "busbw": bus_bandwidth(algbw, info.world_size)}
        rows.append(row)
        if info.is_main:
            append_metrics(out, {"step": i + 1, **row})
        print0(f"{nbytes:>10,d} B  {seconds * 1e6:10.1f} us  algbw {algbw / 1e9:7.3f} GB/s  "
               f"busbw {row['busbw'] / 1e9:7.3f} GB/s")
    if info.is_main:
        write_json(out / "bandwidth.json", {"world_size": info.world_size, "backend": info.backend,
                                            "nodes": nodes, "rows": rows})
    cleanup()


if __name__ == "__main__":
    main()

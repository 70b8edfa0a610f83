"""Collective bandwidth against message size, measured the way nccl-tests' all_reduce_perf measures it.

    torchrun --standalone --nproc-per-node=2 -m labs_lib.measure.bandwidth --out build/runs/bw     # one node
    ... -m labs_lib.measure.bandwidth --out build/runs/bw --collectives all_reduce reduce_scatter all_gather send_recv
    torchrun --standalone --nproc-per-node=4 -m labs_lib.measure.bandwidth --out build/runs/bw --group-size 2 \
        --compute-between-s 0.002    # two pairs at once on 2 cores, each collective after 2 ms of compute
    sbatch --nodes=2 slurm/train_gpt.sbatch ...   # via labs_lib.jobs.launch("labs_lib.measure.bandwidth", ...)

For each message size: a few warm-up all-reduces, then ``--iters`` timed ones; the time of a size is the slowest
rank's mean (an all-reduce ends on every rank only when the last one has its result; the mean, not the median,
because on CPUs shared with other processes the descheduled iterations are part of what a job pays). As in nccl-tests
(doc/PERFORMANCE.md): algorithm bandwidth algbw = bytes / time, bus bandwidth busbw = algbw · 2(n − 1)/n, the
rate each link of a ring all-reduce carries, comparable across rank counts and with a link's data-sheet speed.

``--collectives`` adds reduce-scatter, all-gather (reduce_scatter_perf, all_gather_perf: the size is the whole
tensor, the reduce-scatter's input and the all-gather's output, and busbw = algbw · (n − 1)/n, since each rank sends
and receives (n − 1)/n of it) and send/recv (sendrecv_perf: every rank sends the tensor to the next and receives one
from the previous, busbw = algbw), the pipeline's transfer. On NVLink / InfiniBand the first three reach about the
same busbw; gloo's reduce-scatter and all-gather are slower per byte than its all-reduce, which is why the
planner's CPU preset fits each on its own.

Two options measure a collective as a training job pays for it, not as a tight loop does:

- ``--compute-between-s S``: every rank computes for about S seconds (one-thread matmuls) before each timed
  collective, as a step computes between two, and only the collective is timed. On a CPU, where the ranks' gloo
  threads sleep while the main thread computes, this adds the wake-up cost a tight loop never pays.
- ``--group-size G``: the ranks measure in groups of G consecutive ranks, all groups at once (ranks 0-1, 2-3, ...):
  with more ranks than cores, each collective waits for its peers to get a core, as a tensor-parallel pair of a
  4-rank job on 2 cores does.

Writes ``out/bandwidth.json`` ({"world_size", "group_size", "compute_between_s", "backend", "nodes", "rows":
[{bytes, time_s, algbw, busbw}]}: the all-reduce's; and "collectives": {name: rows} for every collective
measured) and one metrics.jsonl record per collective and size (``step`` = its index, for the launcher's progress
bar).
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
COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "send_recv")


def bus_factor(collective: str, world_size: int) -> float:
    """nccl-tests' busbw / algbw: 2(n − 1)/n for an all-reduce, (n − 1)/n for a reduce-scatter or all-gather, 1 for
    send/recv."""
    if world_size < 2 or collective == "send_recv":
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
    p.add_argument("--compute-between-s", type=float, default=0.0,
                   help="seconds of compute before each timed collective, not timed itself (0: a tight loop)")
    p.add_argument("--group-size", type=int, default=0,
                   help="measure in groups of this many consecutive ranks, all at once (0: one group of all)")
    p.add_argument("--no-progress", action="store_true", help="accepted like every job module's (no bar here)")
    return p


def check_args(argv: list[str], world_size: int) -> int:
    """The pre-launch check (labs_lib.jobs.launch): returns the number of records the job writes."""
    a = parse_job_args(build_parser(), argv)
    if world_size < 2:
        raise ValueError("an all-reduce bandwidth needs at least 2 ranks: launch it with 2 or more")
    if a.iters < 1 or min(a.sizes) < 4:
        raise ValueError("--iters must be >= 1 and every --sizes value >= 4 bytes (one float32)")
    if a.compute_between_s < 0:
        raise ValueError("--compute-between-s must be >= 0")
    group = a.group_size or world_size
    if group < 2 or world_size % group:
        raise ValueError(f"--group-size {a.group_size} must be >= 2 and divide the {world_size} ranks: launch a "
                         f"multiple of it, or leave it out (one group of all the ranks)")
    return len(a.sizes) * len(_collectives(a))


def _collectives(args) -> list[str]:
    return ["all_reduce"] + [c for c in dict.fromkeys(args.collectives) if c != "all_reduce"]


def _operation(collective: str, nbytes: int, group, device: torch.device):
    """The collective on a float32 tensor of ``nbytes`` (rounded to whole shards) over ``group``, as a call."""
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    shard = max(nbytes // 4 // n, 1)
    whole = torch.ones(shard * n if collective in ("reduce_scatter", "all_gather") else max(nbytes // 4, 1),
                       device=device)
    if collective == "all_reduce":
        return lambda: dist.all_reduce(whole, group=group)
    if collective == "send_recv":  # to the next rank of the group, from the previous one (a ring shift)
        received = torch.empty_like(whole)

        def send_recv():
            ops = [dist.P2POp(dist.isend, whole, group=group, group_peer=(rank + 1) % n),
                   dist.P2POp(dist.irecv, received, group=group, group_peer=(rank - 1) % n)]
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        return send_recv
    part = torch.ones(shard, device=device)
    if collective == "reduce_scatter":
        return lambda: reduce_scatter_single(part, whole, group=group)
    return lambda: all_gather_single(whole, part, group=group)


def compute_for(seconds: float, device: torch.device):
    """A call that computes for about ``seconds`` (one-thread 128 x 128 matmuls; the same count on every rank: the
    slowest rank's estimate), or None for 0."""
    if seconds <= 0:
        return None
    a = torch.randn(128, 128, device=device)
    start = time.perf_counter()
    for _ in range(20):
        a @ a
    count = torch.tensor([seconds / ((time.perf_counter() - start) / 20)], dtype=torch.float64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MIN)  # the slowest rank's estimate: fewest matmuls per second
    matmuls = max(1, round(count.item()))

    def compute():
        for _ in range(matmuls):
            a @ a
    return compute


def _mean_seconds(call, compute, iters: int, device: torch.device) -> float:
    """This rank's mean seconds of ``call`` over ``iters``, after a barrier: the whole loop timed (nccl-tests' way),
    or with ``compute``, each call after it and only the call timed (a subtraction of compute timed apart would let
    the compute's own jitter make a small message's time near zero or negative)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda _: None)
    dist.barrier()
    if compute is None:
        start = time.perf_counter()
        for _ in range(iters):
            call()
        sync(device)
        return (time.perf_counter() - start) / iters
    total = 0.0
    for _ in range(iters):
        compute()
        sync(device)
        start = time.perf_counter()
        call()
        sync(device)
        total += time.perf_counter() - start
    return total / iters


def time_collective(collective: str, nbytes: int, iters: int, warmup: int, device: torch.device, group=None,
                    compute=None) -> float:
    """Seconds per ``collective`` of ``nbytes`` (float32) over ``group``, the slowest rank's mean over ``iters``: the
    mean, as nccl-tests reports it, because a training job pays for the slow iterations too. With ``compute``
    (:func:`compute_for`), every collective follows it, as in a training step (waking the ranks' threads and waiting
    for the slowest peer's compute count; the compute itself does not)."""
    run = _operation(collective, nbytes, group, device)
    for _ in range(warmup):
        run()
    seconds = torch.tensor([_mean_seconds(run, compute, iters, device)], dtype=torch.float64, device=device)
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
    size = a.group_size or info.world_size
    # this rank's group of ``size`` consecutive ranks (ranks 0-1, 2-3, ...), or the whole world
    group = dist.new_subgroups(size)[0] if size < info.world_size else None
    compute = compute_for(a.compute_between_s, info.device)
    measured, step = {}, 0
    for collective in _collectives(a):
        rows = measured[collective] = []
        for nbytes in a.sizes:
            seconds = time_collective(collective, nbytes, a.iters, a.warmup, info.device, group, compute)
            algbw = nbytes / seconds
            row = {"bytes": nbytes, "time_s": seconds, "algbw": algbw,
                   "busbw": bus_bandwidth(algbw, size, collective)}
            rows.append(row)
            step += 1
            if info.is_main:
                append_metrics(out, {"step": step, "collective": collective, **row})
            print0(f"{collective:>14} {nbytes:>10,d} B  {seconds * 1e6:10.1f} us  algbw {algbw / 1e9:7.3f} GB/s  "
                   f"busbw {row['busbw'] / 1e9:7.3f} GB/s")
    if info.is_main:
        write_json(out / "bandwidth.json", {"world_size": info.world_size, "group_size": size,
                                            "compute_between_s": a.compute_between_s, "backend": info.backend,
                                            "nodes": nodes, "rows": measured["all_reduce"],
                                            "collectives": measured})
    cleanup()


if __name__ == "__main__":
    main()

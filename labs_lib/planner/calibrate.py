"""Measure this machine the way a GPU node is measured, and keep it as the planner's ``local`` cluster preset.

    python -m labs_lib.planner.calibrate            # measure (about a minute) and save; prints the preset
    python -m labs_lib.planner.calibrate --show     # the saved one (measured first if there is none)
    local_cluster()                                 # the ClusterSpec the planner uses for --gpu local

What is measured, and what a GPU cluster's data sheet gives instead:

- **all-reduce bus bandwidth against message size** (labs_lib.measure.bandwidth, nccl-tests' busbw), within one
  simulated node (2 ranks on node1) and across the two (1 rank on each), as real jobs through labs_lib.jobs.launch.
  A straight line through time = latency + bytes·2(n−1)/n / busbw over the sizes gives the two numbers the planner
  uses per link (least squares, weighted so that small and large messages count alike); reduce-scatter and
  all-gather (reduce_scatter_perf, all_gather_perf) get a line each, since gloo's run slower per byte than its
  all-reduce: the planner times ZeRO's and sequence parallelism's collectives with their own;
- **matmul FLOP/s** on one thread at several sizes (the GEMM benchmark): the peak is the largest;
- **the GPT's training step at several micro-batches** (labs_lib.measure.throughput), both measured by one rank
  per core at once (labs_lib.measure.compute as a job), since a rank of a real job never has the machine alone:
  a step of b sequences takes layers·overhead + b·(FLOPs per sequence)/(peak·efficiency). The fit gives the
  compute efficiency (what share of the GEMM peak a small model's matmuls reach) and the fixed cost per layer and
  micro-batch (operator dispatch and Python, the CPU's version of kernel-launch overhead), which a GPU hides.

Every process of a local job shares this machine's cores (the simulated nodes are one host), so the preset says
``shared_cores``: the planner divides the cores' compute between the ranks. Saved in
``build/cache/planner/local.json``; delete it (or pass ``--force``) to measure again.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch

from labs_lib.core import paths
from labs_lib.core.config import GPTConfig
from labs_lib.core.runs import read_json, write_json
from labs_lib.measure.bandwidth import COLLECTIVES, DEFAULT_SIZES, bus_factor

# The model the step costs are measured on: the benchmarks' and lab 07's small GPT (ci vocabulary and sequence).
CALIBRATION_MODEL = GPTConfig(vocab_size=512, block_size=64, n_layer=8, n_head=8, n_embd=128)
GEMM_SIZES = (128, 256, 512, 1024)
STEP_MICRO_BATCHES = (1, 2, 4, 8)
LOCAL_NODES, LOCAL_RANKS_PER_NODE = 2, 4  # the local Slurm cluster the labs use: 2 simulated nodes x 4 ranks


def calibration_path() -> Path:
    return paths.cache_dir() / "planner" / "local.json"


def fit_link(rows: list[dict], world_size: int, collective: str = "all_reduce") -> tuple[float, float]:
    """(latency s, bus bandwidth B/s) of ``time = latency + bytes·f / busbw`` through the measured rows (f = 2(n−1)/n
    for an all-reduce, (n−1)/n for a reduce-scatter or all-gather), least squares on relative error (each row
    weighted by 1/time², so 1 KiB counts as much as 16 MiB)."""
    factor = bus_factor(collective, world_size)
    xs = [r["bytes"] * factor for r in rows]
    ts = [r["time_s"] for r in rows]
    ws = [1 / t**2 for t in ts]
    sw = sum(ws)
    mx, mt = sum(w * x for w, x in zip(ws, xs)) / sw, sum(w * t for w, t in zip(ws, ts)) / sw
    slope = (sum(w * (x - mx) * (t - mt) for w, x, t in zip(ws, xs, ts))
             / sum(w * (x - mx) ** 2 for w, x in zip(ws, xs)))
    latency = max(mt - slope * mx, 0.0)
    return latency, 1 / slope if slope > 0 else float("inf")


def fit_step_costs(rows: list[dict], cfg: GPTConfig, peak: float) -> tuple[float, float]:
    """(compute efficiency, seconds of fixed cost per layer and micro-batch) from one-process step times
    ``{"micro_batch", "step_s"}``: step = layers·overhead + b·flops_per_sequence / (peak·efficiency)."""
    from labs_lib.models.gpt import GPT

    with torch.device("meta"):
        flops_per_sequence = GPT(cfg).flops_per_token() * cfg.block_size  # 6N + 12Lhs: forward and backward
    bs = [r["micro_batch"] for r in rows]
    ts = [r["step_s"] for r in rows]
    mb, mt = statistics.fmean(bs), statistics.fmean(ts)
    slope = sum((b - mb) * (t - mt) for b, t in zip(bs, ts)) / sum((b - mb) ** 2 for b in bs)
    intercept = max(mt - slope * mb, 0.0)
    return flops_per_sequence / (slope * peak), intercept / cfg.n_layer


def measure_links(runs: Path, progress: bool = True) -> dict:
    """All-reduce, reduce-scatter and all-gather rows within a node (2 ranks, one node) and across nodes (1 rank on
    each of 2), as real jobs; each collective's fit too (the all-reduce's is the link's)."""
    from labs_lib.jobs.launch import launch

    links = {}
    for name, nodes, per_node in (("intra_node", 1, 2), ("inter_node", 2, 1)):
        out = runs / f"allreduce_{name}"
        launch("labs_lib.measure.bandwidth", ["--collectives", *COLLECTIVES], out, nodes=nodes,
               nproc_per_node=per_node, progress=progress, desc=f"collectives {name.replace('_', '-')}")
        measured = read_json(out / "bandwidth.json")
        world = measured["world_size"]
        fits = {c: dict(zip(("latency_s", "busbw"), fit_link(rows, world, c)))
                for c, rows in measured["collectives"].items()}
        links[name] = {"rows": measured["rows"], "world_size": world, **fits["all_reduce"],
                       "collectives": {c: {**fit, "rows": measured["collectives"][c]} for c, fit in fits.items()}}
    return links


def measure_compute(runs: Path, progress: bool = True) -> dict:
    """GEMM FLOP/s by size and the calibration GPT's step time by micro-batch, measured by one rank per core at
    once (labs_lib.measure.compute as a job: each rank of a local job shares the machine with the others), averaged
    over the ranks; then the peak, the efficiency and the per-layer cost fitted from them."""
    from labs_lib.jobs.launch import launch

    m = CALIBRATION_MODEL
    out = runs / "compute"
    args = ["--gemm-sizes", *map(str, GEMM_SIZES), "--micro-batches", *map(str, STEP_MICRO_BATCHES),
            "--n-layer", str(m.n_layer), "--n-head", str(m.n_head), "--n-embd", str(m.n_embd),
            "--block-size", str(m.block_size), "--vocab-size", str(m.vocab_size)]
    ranks = os.cpu_count() or 1
    launch("labs_lib.measure.compute", args, out, nodes=1, nproc_per_node=ranks, progress=progress,
           desc="compute, every core busy")
    per_rank = [read_json(out / f"compute_rank{r}.json") for r in range(ranks)]
    gemm = [{"size": n, "flops": statistics.fmean(p["gemm"][i]["flops"] for p in per_rank)}
            for i, n in enumerate(GEMM_SIZES)]
    steps = [{"micro_batch": b, "step_s": statistics.fmean(p["steps"][i]["step_s"] for p in per_rank)}
             for i, b in enumerate(STEP_MICRO_BATCHES)]
    peak = max(r["flops"] for r in gemm)
    efficiency, overhead = fit_step_costs(steps, m, peak)
    return {"gemm": gemm, "steps": steps, "peak_flops": peak, "compute_efficiency": efficiency,
            "layer_overhead_s": overhead, "compute_ranks": ranks}


def calibrate(progress: bool = True) -> dict:
    """Measure links and compute, save them (:func:`calibration_path`) and return the saved record."""
    runs = paths.runs_dir() / "calibrate"
    record = {"links": measure_links(runs, progress), **measure_compute(runs, progress), "cores": os.cpu_count(),
              "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
              "message_sizes": DEFAULT_SIZES}
    calibration_path().parent.mkdir(parents=True, exist_ok=True)
    write_json(calibration_path(), record)
    return record


def load_calibration(measure_if_missing: bool = True, progress: bool = False) -> dict:
    path = calibration_path()
    if path.exists():
        return read_json(path)
    if not measure_if_missing:
        raise FileNotFoundError(f"{path} does not exist: run python -m labs_lib.planner.calibrate first")
    return calibrate(progress)


def local_cluster(measure_if_missing: bool = True):
    """This machine as a cluster preset: 2 simulated nodes x 4 ranks, each rank a "GPU" with an equal share of the
    memory, the measured links and compute, all ranks sharing the machine's cores."""
    from labs_lib.planner.plan import ClusterSpec

    c = load_calibration(measure_if_missing)
    gpus = LOCAL_NODES * LOCAL_RANKS_PER_NODE
    intra, inter = c["links"]["intra_node"], c["links"]["inter_node"]
    # reduce-scatter and all-gather each with their own fit (gloo's are slower per byte than its all-reduce); a
    # calibration saved before they were measured has none, and the planner uses the all-reduce's for them
    collectives = {name: ((intra["collectives"][name]["latency_s"], intra["collectives"][name]["busbw"]),
                          (inter["collectives"][name]["latency_s"], inter["collectives"][name]["busbw"]))
                   for name in COLLECTIVES[1:] if name in intra.get("collectives", {})}
    return ClusterSpec(name="local", gpus=gpus, gpus_per_node=LOCAL_RANKS_PER_NODE,
                       memory_bytes=c["memory_bytes"] / gpus, peak_flops=c["peak_flops"],
                       intra_node_busbw=intra["busbw"], inter_node_busbw=inter["busbw"],
                       latency_s=max(intra["latency_s"], inter["latency_s"]),
                       compute_efficiency=c["compute_efficiency"], shared_cores=c["cores"],
                       layer_overhead_s=c["layer_overhead_s"], collectives=collectives or None)


def main(argv: list[str] | None = None) -> None:
    from labs_lib.core.tables import format_table

    p = argparse.ArgumentParser(prog="python -m labs_lib.planner.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--force", action="store_true", help="measure again even if a calibration is saved")
    p.add_argument("--show", action="store_true", help="print the saved calibration (measure if there is none)")
    a = p.parse_args(argv)
    record = calibrate() if a.force or not (a.show or calibration_path().exists()) else load_calibration()
    for name, link in record["links"].items():
        for collective, fit in link.get("collectives", {"all_reduce": link}).items():
            print(f"{name} {collective}: latency {fit['latency_s'] * 1e6:.0f} us, busbw {fit['busbw'] / 1e9:.3f} GB/s")
        print(format_table([{"bytes": r["bytes"], "time us": r["time_s"] * 1e6, "busbw GB/s": r["busbw"] / 1e9}
                            for r in link["rows"]], digits=3))
    print(f"matmul peak {record['peak_flops'] / 1e9:.1f} GFLOP/s (1 thread); the GPT's matmuls reach "
          f"{record['compute_efficiency']:.0%} of it, plus {record['layer_overhead_s'] * 1e3:.2f} ms per layer and "
          f"micro-batch; {record['cores']} cores shared by all ranks; saved in {calibration_path()}")


if __name__ == "__main__":
    main()

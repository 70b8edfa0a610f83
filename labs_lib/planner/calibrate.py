"""Measure this machine the way a GPU node is measured, and keep it as the planner's ``local`` cluster preset.

    python -m labs_lib.planner.calibrate            # measure (about a minute) and save; prints the preset
    python -m labs_lib.planner.calibrate --show     # the saved one (measured first if there is none)
    local_cluster()                                 # the ClusterSpec the planner uses for --gpu local

What is measured, and what a GPU cluster's data sheet gives instead:

- **collective bus bandwidth against message size** (labs_lib.measure.bandwidth, nccl-tests' busbw), within one
  simulated node (2 ranks on node1) and across the two (1 rank on each), as real jobs through labs_lib.jobs.launch.
  A straight line through time = latency + bytes·f / busbw over the sizes gives the two numbers the planner uses
  per link and collective (least squares, weighted so that small and large messages count alike): all-reduce,
  reduce-scatter, all-gather (gloo's last two run slower per byte than its all-reduce) and send/recv (the pipeline's).
  Each timed collective follows 2 ms of compute, as in a training step: on a CPU a collective that wakes a sleeping
  rank costs ~1-2 ms, several times a tight loop's. A third job measures them with two ranks per core, in pairs at
  once (``contended``): with more ranks than cores each collective also waits for its peer to get a core;
- **matmul FLOP/s** on one thread at several sizes (the GEMM benchmark): the peak is the largest;
- **the GPT's training step at several micro-batches** (labs_lib.measure.throughput), both measured by one rank
  per core at once (labs_lib.measure.compute as a job), since a rank of a real job never has the machine alone:
  a step of b sequences takes layers·overhead + b·(FLOPs per sequence)/(peak·efficiency) of forward and backward,
  plus AdamW's step. The fit gives the compute efficiency (what share of the GEMM peak a small model's matmuls
  reach), the fixed cost per layer and micro-batch (operator dispatch and Python, the CPU's version of kernel-launch
  overhead), which a GPU hides, and the optimizer's seconds per parameter (paid once per step, not per micro-batch).

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
from labs_lib.core.config import CHECKPOINT_MODES, GPTConfig
from labs_lib.core.runs import read_json, write_json
from labs_lib.measure.bandwidth import COLLECTIVES, DEFAULT_SIZES, bus_factor

# The model the step costs are measured on: the benchmarks' and lab 07's small GPT (ci vocabulary and sequence).
CALIBRATION_MODEL = GPTConfig(vocab_size=512, block_size=64, n_layer=8, n_head=8, n_embd=128)
GEMM_SIZES = (128, 256, 512, 1024)
STEP_MICRO_BATCHES = (1, 2, 4, 8)
LOCAL_NODES, LOCAL_RANKS_PER_NODE = 2, 4  # the local Slurm cluster the labs use: 2 simulated nodes x 4 ranks
# The compute before each timed collective: about what the calibration GPT's layer runs between two tensor-parallel
# collectives here (a few ms), so that a collective costs what it costs inside a training step.
COMPUTE_BETWEEN_S = 0.002
LINK_ITERS = 24
CALIBRATION_VERSION = 2  # what a saved calibration must carry: older ones are measured again


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


def fit_step_costs(rows: list[dict], cfg: GPTConfig, peak: float) -> dict:
    """The step costs of one process from its step times ``{"micro_batch", "recompute", "step_s", "optimizer_s"}``:
    a step of b sequences takes layers·overhead + b·flops_per_sequence / (peak·efficiency) of forward and backward,
    plus the optimizer's step, which grows with the parameters and not with b. The rows without recomputation give
    ``compute_efficiency``, ``layer_overhead_s`` (the fixed cost per layer and micro-batch) and
    ``optimizer_s_per_param``; each recomputation mode's rows, at that efficiency with the FLOPs the mode repeats,
    its own fixed cost per layer and micro-batch: ``recompute_overhead_s`` {mode: seconds}."""
    from labs_lib.models.gpt import GPT
    from labs_lib.planner.specs import ModelSpec, recompute_flops_per_token

    with torch.device("meta"):
        model = GPT(cfg)
        flops_per_sequence = model.flops_per_token() * cfg.block_size  # 6N + 12Lhs: forward and backward
        params = sum(p.numel() for p in model.parameters())
    plain = [r for r in rows if r["recompute"] == "none"]
    bs = [r["micro_batch"] for r in plain]
    ts = [r["step_s"] - r["optimizer_s"] for r in plain]
    mb, mt = statistics.fmean(bs), statistics.fmean(ts)
    slope = sum((b - mb) * (t - mt) for b, t in zip(bs, ts)) / sum((b - mb) ** 2 for b in bs)
    efficiency = flops_per_sequence / (slope * peak)
    spec = ModelSpec.from_gpt_config(cfg)
    recompute = {}
    for mode in sorted({r["recompute"] for r in rows if r["recompute"] != "none"}):
        per_sequence = (flops_per_sequence + recompute_flops_per_token(spec, mode) * cfg.block_size) / (
            peak * efficiency)
        recompute[mode] = statistics.fmean(r["step_s"] - r["optimizer_s"] - r["micro_batch"] * per_sequence
                                           for r in rows if r["recompute"] == mode) / cfg.n_layer
    return {"compute_efficiency": efficiency, "layer_overhead_s": max(mt - slope * mb, 0.0) / cfg.n_layer,
            "optimizer_s_per_param": statistics.median(r["optimizer_s"] for r in plain) / params,
            "recompute_overhead_s": recompute}


def _measure_collectives(out: Path, nodes: int, per_node: int, collectives, compute_between_s: float,
                         group_size: int, progress: bool, desc: str) -> dict:
    """One labs_lib.measure.bandwidth job: its all-reduce rows, and every collective's rows and fitted line (the
    all-reduce's is the link's ``latency_s`` and ``busbw``)."""
    from labs_lib.jobs.launch import launch

    args = ["--collectives", *collectives, "--compute-between-s", str(compute_between_s), "--iters",
            str(LINK_ITERS), "--group-size", str(group_size)]
    launch("labs_lib.measure.bandwidth", args, out, nodes=nodes, nproc_per_node=per_node, progress=progress,
           desc=desc)
    measured = read_json(out / "bandwidth.json")
    n = measured["group_size"]
    fits = {c: dict(zip(("latency_s", "busbw"), fit_link(rows, n, c))) for c, rows in measured["collectives"].items()}
    return {"rows": measured["rows"], "world_size": measured["world_size"], "group_size": n,
            "compute_between_s": compute_between_s, **fits["all_reduce"],
            "collectives": {c: {**fit, "rows": measured["collectives"][c]} for c, fit in fits.items()}}


def measure_links(runs: Path, progress: bool = True, collectives=COLLECTIVES,
                  compute_between_s: float = COMPUTE_BETWEEN_S) -> dict:
    """``collectives`` within a node (2 ranks, one node) and across nodes (1 rank on each of 2), as real jobs, each
    after ``compute_between_s`` of compute (0: nccl-tests' tight loop); every collective's rows and fit."""
    return {name: _measure_collectives(runs / f"links_{name}", nodes, per_node, collectives, compute_between_s, 2,
                                       progress, f"collectives {name.replace('_', '-')}")
            for name, nodes, per_node in (("intra_node", 1, 2), ("inter_node", 2, 1))}


def measure_contended(runs: Path, progress: bool = True) -> dict:
    """The collectives with the cores oversubscribed: two ranks per core on one node, in pairs measuring at once,
    each collective after COMPUTE_BETWEEN_S of compute; ``share`` = ranks per core."""
    cores = os.cpu_count() or 1
    link = _measure_collectives(runs / "links_contended", 1, 2 * cores, COLLECTIVES, COMPUTE_BETWEEN_S, 2,
                                progress, f"collectives, {2 * cores} ranks on {cores} cores")
    return {**link, "share": 2.0}


def measure_compute(runs: Path, progress: bool = True) -> dict:
    """GEMM FLOP/s by size and the calibration GPT's step time by micro-batch, measured by one rank per core at
    once (labs_lib.measure.compute as a job: each rank of a local job shares the machine with the others), averaged
    over the ranks; then the peak, the efficiency and the per-layer cost fitted from them."""
    from labs_lib.jobs.launch import launch

    m = CALIBRATION_MODEL
    out = runs / "compute"
    args = ["--gemm-sizes", *map(str, GEMM_SIZES), "--micro-batches", *map(str, STEP_MICRO_BATCHES),
            "--recompute", *CHECKPOINT_MODES, "--n-layer", str(m.n_layer), "--n-head", str(m.n_head),
            "--n-embd", str(m.n_embd), "--block-size", str(m.block_size), "--vocab-size", str(m.vocab_size)]
    ranks = os.cpu_count() or 1
    launch("labs_lib.measure.compute", args, out, nodes=1, nproc_per_node=ranks, progress=progress,
           desc="compute, every core busy")
    per_rank = [read_json(out / f"compute_rank{r}.json") for r in range(ranks)]
    gemm = [{"size": n, "flops": statistics.fmean(p["gemm"][i]["flops"] for p in per_rank)}
            for i, n in enumerate(GEMM_SIZES)]
    steps = [{**row, **{k: statistics.fmean(p["steps"][i][k] for p in per_rank) for k in ("step_s", "optimizer_s")}}
             for i, row in enumerate(per_rank[0]["steps"])]
    peak = max(r["flops"] for r in gemm)
    return {"gemm": gemm, "steps": steps, "peak_flops": peak, **fit_step_costs(steps, m, peak), "compute_ranks": ranks}


def calibrate(progress: bool = True) -> dict:
    """Measure links and compute, save them (:func:`calibration_path`) and return the saved record."""
    runs = paths.runs_dir() / "calibrate"
    record = {"version": CALIBRATION_VERSION, "links": measure_links(runs, progress),
              "contended": measure_contended(runs, progress), **measure_compute(runs, progress),
              "cores": os.cpu_count(),
              "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
              "message_sizes": DEFAULT_SIZES}
    calibration_path().parent.mkdir(parents=True, exist_ok=True)
    write_json(calibration_path(), record)
    return record


def load_calibration(measure_if_missing: bool = True, progress: bool = False) -> dict:
    path = calibration_path()
    if path.exists() and read_json(path).get("version") == CALIBRATION_VERSION:
        return read_json(path)
    if not measure_if_missing:
        what = "is from an older labs_lib" if path.exists() else "does not exist"
        raise FileNotFoundError(f"{path} {what}: run python -m labs_lib.planner.calibrate --force first")
    return calibrate(progress)


def local_cluster(measure_if_missing: bool = True):
    """This machine as a cluster preset: 2 simulated nodes x 4 ranks, each rank a "GPU" with an equal share of the
    memory, the measured links and compute, all ranks sharing the machine's cores."""
    from labs_lib.planner.plan import ClusterSpec

    c = load_calibration(measure_if_missing)
    gpus = LOCAL_NODES * LOCAL_RANKS_PER_NODE
    intra, inter, contended = c["links"]["intra_node"], c["links"]["inter_node"], c["contended"]

    def fit(link: dict, name: str) -> tuple[float, float]:
        return link["collectives"][name]["latency_s"], link["collectives"][name]["busbw"]

    # every collective with its own fit (gloo's reduce-scatter and all-gather are slower per byte than its
    # all-reduce), alone and with the cores oversubscribed
    collectives = {name: (fit(intra, name), fit(inter, name)) for name in COLLECTIVES[1:]}
    return ClusterSpec(name="local", gpus=gpus, gpus_per_node=LOCAL_RANKS_PER_NODE,
                       memory_bytes=c["memory_bytes"] / gpus, peak_flops=c["peak_flops"],
                       intra_node_busbw=intra["busbw"], inter_node_busbw=inter["busbw"],
                       latency_s=max(intra["latency_s"], inter["latency_s"]),
                       compute_efficiency=c["compute_efficiency"], shared_cores=c["cores"],
                       layer_overhead_s=c["layer_overhead_s"], optimizer_s_per_param=c["optimizer_s_per_param"],
                       recompute_overhead_s=c["recompute_overhead_s"],
                       collectives=collectives, contended={name: fit(contended, name) for name in COLLECTIVES},
                       contended_share=contended["share"])


def main(argv: list[str] | None = None) -> None:
    from labs_lib.core.tables import format_table

    p = argparse.ArgumentParser(prog="python -m labs_lib.planner.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--force", action="store_true", help="measure again even if a calibration is saved")
    p.add_argument("--show", action="store_true", help="print the saved calibration (measure if there is none)")
    a = p.parse_args(argv)
    record = calibrate() if a.force or not (a.show or calibration_path().exists()) else load_calibration()
    for name, link in {**record["links"], "contended": record["contended"]}.items():
        for collective, fit in link.get("collectives", {"all_reduce": link}).items():
            print(f"{name} {collective}: latency {fit['latency_s'] * 1e6:.0f} us, busbw {fit['busbw'] / 1e9:.3f} GB/s")
        print(format_table([{"bytes": r["bytes"], "time us": r["time_s"] * 1e6, "busbw GB/s": r["busbw"] / 1e9}
                            for r in link["rows"]], digits=3))
    print(f"matmul peak {record['peak_flops'] / 1e9:.1f} GFLOP/s (1 thread); the GPT's matmuls reach "
          f"{record['compute_efficiency']:.0%} of it, plus {record['layer_overhead_s'] * 1e3:.2f} ms per layer and "
          f"micro-batch and AdamW's {record['optimizer_s_per_param'] * 1e9:.1f} ns per parameter and step; "
          f"{record['cores']} cores shared by all ranks; saved in {calibration_path()}")


if __name__ == "__main__":
    main()

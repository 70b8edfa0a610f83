"""Training throughput of data, tensor, pipeline and 3D parallelism at 4 and 8 processes, ours side by side with
torch's DTensor tensor parallelism and torch.distributed.pipelining.

    .venv/bin/python benchmarks/parallel_scaling.py                      # world sizes 4 and 8 (~5 min on 2 cores)
    .venv/bin/python benchmarks/parallel_scaling.py --world 4 --steps 20
    LABS_LAUNCHER=torchrun .venv/bin/python benchmarks/parallel_scaling.py   # torchrun here instead of Slurm

Every configuration is a real multi-process job launched by labs_lib.jobs.launch (2 nodes x world/2 processes on
the Slurm cluster: a site one, else the local one of simulated nodes, started if needed; torchrun on this machine
where Slurm cannot run): ``train_gpt`` for ours (``python -m labs_lib.train``), ``launch`` of the job module
``benchmarks.drivers.torch_parallel`` for torch's (run from the repo root, where it is importable; this script
goes there). All train the same GPT (the ci profile's data and vocabulary, 8 layers, 8 heads, width 128,
64 tokens) on the same global batch of 16 sequences per step:

    1 process     labs_lib.train on one process (the baseline)
    DP            labs_lib.train, torch DDP over every rank (16/world sequences each)
    TP            labs_lib.train --tp world  |  torch DTensor (parallelize_module + loss_parallel)
    PP            labs_lib.train --pp world --micro-batches 8 (1F1B)  |  torch.distributed.pipelining Schedule1F1B
    3D            labs_lib.train --tp 2 --pp 2 (world 4) / --dp 2 --tp 2 --pp 2 (world 8), 4 micro-batches

tokens/s and step ms are medians over the steady steps of each job's own metrics.jsonl, by
labs_lib.measure.throughput.steady_median (the one warm-up rule: the first ceil(n/4) of n steps are left out, so
steps 4-10 of the default 10, steps 6-20 of ``--steps 20``); a step is reading the batch, forward, backward,
gradient clipping and the AdamW update. Every process runs one thread (OMP_NUM_THREADS=1, the 1-process baseline
too). On a 2-core CPU the processes share the cores, so more processes do not mean more speed: the table shows what
each layout's communication costs next to the production implementation of the same layout; on a GPU cluster each
process has a GPU. Writes benchmarks/results/parallel_scaling.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the launcher imports the driver module (benchmarks.drivers.torch_parallel) to check it
from common import machine_info, save_results  # noqa: E402

from labs_lib.core import paths  # noqa: E402
from labs_lib.core.tables import format_table  # noqa: E402
from labs_lib.jobs.launch import launch, settings_args, train_gpt, use_slurm  # noqa: E402
from labs_lib.measure.throughput import steady_median, steady_records  # noqa: E402

MODEL = dict(n_layer=8, n_head=8, n_embd=128)
GLOBAL_BATCH = 16
DRIVER = "benchmarks.drivers.torch_parallel"


def configurations(world: int) -> list[dict]:
    """(name, implementation, launcher, settings) of every run at ``world`` processes."""
    m = 8
    three_d = dict(tp=2, pp=2, micro_batches=4, batch_size=GLOBAL_BATCH // (world // 4))
    return [
        dict(key="dp", layout=f"DP {world}", impl="labs_lib.train (torch DDP)", dp=world, tp=1, pp=1,
             settings=dict(batch_size=GLOBAL_BATCH // world)),
        dict(key="tp_ours", layout=f"TP {world}", impl="ours: labs_lib.train", dp=1, tp=world, pp=1,
             settings=dict(tp=world, batch_size=GLOBAL_BATCH)),
        dict(key="tp_dtensor", layout=f"TP {world}", impl="torch DTensor TP", dp=1, tp=world, pp=1, driver=True,
             settings=dict(impl="dtensor-tp", batch_size=GLOBAL_BATCH)),
        dict(key="pp_ours", layout=f"PP {world}, m={m}", impl="ours: labs_lib.train", dp=1, tp=1, pp=world,
             settings=dict(pp=world, micro_batches=m, pp_schedule="1f1b", batch_size=GLOBAL_BATCH)),
        dict(key="pp_torch", layout=f"PP {world}, m={m}", impl="torch pipelining 1F1B", dp=1, tp=1, pp=world,
             driver=True, settings=dict(impl="pipelining", pp=world, micro_batches=m, pp_schedule="1f1b",
                                        batch_size=GLOBAL_BATCH)),
        dict(key="3d", layout=f"3D dp{world // 4} x tp2 x pp2, m=4", impl="ours: labs_lib.train", dp=world // 4,
             tp=2, pp=2, settings=three_d),
    ]


def run(config: dict, out: Path, world: int, steps: int, common: dict) -> list[dict]:
    """One configuration as a job of 2 nodes x world/2 ranks; returns its metrics records."""
    if config.get("driver"):
        args = settings_args("ci", max_steps=steps, **MODEL, **config["settings"])
        return launch(DRIVER, args, out, nodes=2, nproc_per_node=world // 2, profile="ci", progress=False,
                      desc=config["key"])
    return train_gpt(out, nodes=2, nproc_per_node=world // 2, **(common | config["settings"]))


def throughput(records: list[dict]) -> tuple[float, float]:
    """Steady tokens/s and step milliseconds (the one warm-up rule)."""
    return steady_median(records, "tokens_per_s"), 1e3 * steady_median(records, "step_time_s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, nargs="+", default=[4, 8], help="process counts (multiples of 4)")
    p.add_argument("--steps", type=int, default=10, help="training steps per run (the first quarter warms up)")
    args = p.parse_args()
    if any(w % 4 or w > 8 for w in args.world):
        raise SystemExit("--world takes 4 and/or 8 (the 3D layout needs a multiple of 4, the model 8 heads/layers)")
    # One thread per process, the baseline included (torchrun sets it only for more than one process): with 2
    # threads on cores that other processes keep busy, a lone process would measure thread contention.
    os.environ["OMP_NUM_THREADS"] = "1"
    runs = (paths.runs_dir() / "bench_parallel_scaling").resolve()
    os.chdir(ROOT)  # torchrun's ranks find the driver module from the working directory (Slurm submits from here)
    slurm = use_slurm()
    if not slurm:
        os.environ["LABS_LAUNCHER"] = "torchrun"  # every launch: straight to torchrun, no second look for Slurm
    launcher = "Slurm, 2 nodes" if slurm else "torchrun, 1 node"
    common = dict(profile="ci", progress=False, max_steps=args.steps, eval_interval=0, checkpoint_interval=0,
                  warmup_steps=min(5, args.steps), **MODEL)

    t0 = time.perf_counter()
    baseline_records = train_gpt(runs / "single", nodes=1, nproc_per_node=1, batch_size=GLOBAL_BATCH, **common)
    baseline, baseline_ms = throughput(baseline_records)
    rows = [{"world": 1, "layout": "1 process", "implementation": "labs_lib.train", "dp": 1, "tp": 1, "pp": 1,
             "tokens/s": round(baseline, 1), "step ms": round(baseline_ms, 1), "vs 1 process": 1.0,
             "launcher": "Slurm, 1 node" if slurm else "one process"}]
    print(f"1 process: {baseline:,.0f} tokens/s", flush=True)
    for world in args.world:
        for c in configurations(world):
            tps, ms = throughput(run(c, runs / f"w{world}_{c['key']}", world, args.steps, common))
            rows.append({"world": world, "layout": c["layout"], "implementation": c["impl"], "dp": c["dp"],
                         "tp": c["tp"], "pp": c["pp"], "tokens/s": round(tps, 1), "step ms": round(ms, 1),
                         "vs 1 process": round(tps / baseline, 3), "launcher": launcher})
            print(f"{world} processes, {c['layout']:28s} {c['impl']:28s} {tps:10,.0f} tokens/s", flush=True)
    print()
    print(format_table(rows, digits=1))
    print(f"\n{len(rows)} runs in {time.perf_counter() - t0:.0f} s")
    steady = steady_records([{"step": s} for s in range(1, args.steps + 1)])
    info = machine_info()
    save_results("parallel_scaling", rows,
                 description=f"Training tokens/s (median over steps {steady[0]['step']}-{args.steps}) of the GPT "
                             f"(ci data, {MODEL['n_layer']} layers, {MODEL['n_head']} heads, width {MODEL['n_embd']}, "
                             "64 tokens) "
                             f"on a global batch of {GLOBAL_BATCH} sequences, per layout: ours (labs_lib.train) next "
                             f"to torch DTensor TP and torch.distributed.pipelining; {launcher}, "
                             f"{info['cores']} cores shared by all processes, 1 thread each (no speed-up expected on "
                             "a CPU: the table compares the layouts' overheads and the implementations).",
                 launcher=launcher, steps=args.steps, steady_steps=[steady[0]["step"], args.steps], model=MODEL,
                 global_batch=GLOBAL_BATCH)


if __name__ == "__main__":
    main()

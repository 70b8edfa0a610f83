"""Training throughput of data, tensor, pipeline and 3D parallelism at 4 and 8 processes, ours side by side with
torch's DTensor tensor parallelism and torch.distributed.pipelining.

    .venv/bin/python benchmarks/parallel_scaling.py                      # world sizes 4 and 8 (~5 min on 2 cores)
    .venv/bin/python benchmarks/parallel_scaling.py --world 4 --steps 20
    LABS_LAUNCHER=torchrun .venv/bin/python benchmarks/parallel_scaling.py   # torchrun here instead of Slurm

Every configuration is a real multi-process job: on the Slurm cluster (the local one of simulated nodes is started
if no site Slurm answers; 2 nodes x world/2 processes) through ``labs_lib.launch.train`` for ours, and through the
same ``slurm/train_gpt.sbatch`` with ``TRAIN_MODULE=benchmarks.drivers.torch_parallel`` for torch's; where Slurm
cannot run, torchrun on this machine. All train the same GPT (the ci profile's data and vocabulary, 8 layers,
8 heads, width 128, 64 tokens) on the same global batch of 16 sequences per step:

    1 process     labs_lib.train on one process (the baseline)
    DP            labs_lib.train, torch DDP over every rank (16/world sequences each)
    TP            labs_lib.train --tp world  |  torch DTensor (parallelize_module + loss_parallel)
    PP            labs_lib.train --pp world --micro-batches 8 (1F1B)  |  torch.distributed.pipelining Schedule1F1B
    3D            labs_lib.train --tp 2 --pp 2 (world 4) / --dp 2 --tp 2 --pp 2 (world 8), 4 micro-batches

tokens/s is the median over the steps after ``--warmup`` of (global tokens per step) / (step time), a step being
forward, backward, gradient clipping and the AdamW update (the jobs' own metrics.jsonl); every process runs one
thread (OMP_NUM_THREADS=1, the 1-process baseline too). On a 2-core CPU the
processes share the cores, so more processes do not mean more speed: the table shows what each layout's
communication costs next to the production implementation of the same layout; on a GPU cluster each process has a
GPU. Writes benchmarks/results/parallel_scaling.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, save_results  # noqa: E402

from labs_lib import launch, paths, slurm  # noqa: E402
from labs_lib.planner import format_table  # noqa: E402
from labs_lib.train import read_metrics  # noqa: E402

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


def run_driver(out: Path, world: int, use_slurm: bool, **settings) -> list[dict]:
    """torch's implementations: the driver module as a job, launched like launch.train launches labs_lib.train."""
    args = launch.train_args(out, "ci", **settings)[3:]  # [--out OUT --no-progress] come from the launcher
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if use_slurm:
        job = slurm.submit("train_gpt.sbatch", *args, nodes=2, job_name=f"bench_{out.name}", output=out / "train.log",
                           OUT=out, NPROC_PER_NODE=world // 2, LABS_PROFILE="ci", TRAIN_MODULE=DRIVER)
        job.wait(progress=False)  # raises JobFailed with the log's tail
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", "-m",
               DRIVER, "--out", str(out), "--no-progress", *args]
        with open(out / "train.log", "w") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=paths.PROJECT_ROOT).returncode
        if code != 0:
            raise launch.LaunchError(f"{DRIVER} failed; log {out / 'train.log'}", code,
                                     launch.read_log(out / "train.log"))
    return read_metrics(out)


def throughput(records: list[dict], warmup: int) -> tuple[float, float]:
    steady = records[warmup:] or records
    return (statistics.median(r["tokens_per_s"] for r in steady),
            1e3 * statistics.median(r["step_time_s"] for r in steady))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, nargs="+", default=[4, 8], help="process counts (multiples of 4)")
    p.add_argument("--steps", type=int, default=10, help="training steps per run")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the median")
    args = p.parse_args()
    if any(w % 4 or w > 8 for w in args.world):
        raise SystemExit("--world takes 4 and/or 8 (the 3D layout needs a multiple of 4, the model 8 heads/layers)")
    # One thread per process, the baseline included (torchrun sets it only for more than one process): with 2
    # threads on cores that other processes keep busy, a lone process would measure thread contention.
    os.environ["OMP_NUM_THREADS"] = "1"
    use_slurm = launch.use_slurm()
    if not use_slurm:
        os.environ["LABS_LAUNCHER"] = "torchrun"  # launch.train: straight to torchrun, no second look for Slurm
    launcher = "Slurm, 2 nodes" if use_slurm else "torchrun, 1 node"
    runs = paths.runs_dir() / "bench_parallel_scaling"
    common = dict(profile="ci", progress=False, max_steps=args.steps, eval_interval=0, checkpoint_interval=0,
                  warmup_steps=min(5, args.steps), **MODEL)

    t0 = time.perf_counter()
    baseline_records = launch.train(runs / "single", nodes=1, nproc_per_node=1, batch_size=GLOBAL_BATCH, **common)
    baseline, baseline_ms = throughput(baseline_records, args.warmup)
    rows = [{"world": 1, "layout": "1 process", "implementation": "labs_lib.train", "dp": 1, "tp": 1, "pp": 1,
             "tokens/s": round(baseline, 1), "step ms": round(baseline_ms, 1), "vs 1 process": 1.0,
             "launcher": "Slurm, 1 node" if use_slurm else "one process"}]
    print(f"1 process: {baseline:,.0f} tokens/s", flush=True)
    for world in args.world:
        for c in configurations(world):
            out = runs / f"w{world}_{c['key']}"
            if c.get("driver"):
                records = run_driver(out, world, use_slurm, max_steps=args.steps, **MODEL, **c["settings"])
            else:
                records = launch.train(out, nodes=2, nproc_per_node=world // 2,
                                       **(common | c["settings"]))
            tps, ms = throughput(records, args.warmup)
            rows.append({"world": world, "layout": c["layout"], "implementation": c["impl"], "dp": c["dp"],
                         "tp": c["tp"], "pp": c["pp"], "tokens/s": round(tps, 1), "step ms": round(ms, 1),
                         "vs 1 process": round(tps / baseline, 3), "launcher": launcher})
            print(f"{world} processes, {c['layout']:28s} {c['impl']:28s} {tps:10,.0f} tokens/s", flush=True)
    print()
    print(format_table(rows, digits=1))
    print(f"\n{len(rows)} runs in {time.perf_counter() - t0:.0f} s")
    info = machine_info()
    save_results("parallel_scaling", rows,
                 description=f"Training tokens/s (median over steps {args.warmup + 1}-{args.steps}) of the GPT "
                             f"(ci data, {MODEL['n_layer']} layers, {MODEL['n_head']} heads, width {MODEL['n_embd']}, "
                             "64 tokens) "
                             f"on a global batch of {GLOBAL_BATCH} sequences, per layout: ours (labs_lib.train) next "
                             f"to torch DTensor TP and torch.distributed.pipelining; {launcher}, "
                             f"{info['cores']} cores shared by all processes, 1 thread each (no speed-up expected on "
                             "a CPU: the table compares the layouts' overheads and the implementations).",
                 launcher=launcher, steps=args.steps, warmup=args.warmup, model=MODEL, global_batch=GLOBAL_BATCH)


if __name__ == "__main__":
    main()

"""Matmul FLOP/s and a GPT's training-step time, measured on every rank of a job at once: compute as a rank of a
real job sees it, with every core busy (memory bandwidth, caches and the hypervisor shared), not as a lone process.

    torchrun --standalone --nproc-per-node=2 -m labs_lib.measure.compute --out build/runs/compute
    launch("labs_lib.measure.compute", [], out, nodes=1, nproc_per_node=os.cpu_count())   # labs_lib.planner

Each rank, on one thread: square fp32 matmuls of ``--gemm-sizes`` (the GEMM benchmark), then full training steps
(forward, backward, AdamW) of the GPT ``--n-layer/--n-head/--n-embd/--block-size/--vocab-size`` at each of
``--micro-batches`` under each of ``--recompute`` (activation checkpointing modes), and their optimizer part
(labs_lib.measure.throughput.training_step_seconds). The ranks start
together (a barrier) and do not communicate otherwise. Writes ``out/compute_rank<r>.json``: {"gemm": [{size,
flops}], "steps": [{micro_batch, recompute, step_s, optimizer_s}]}, and one metrics.jsonl record per measurement for the
launcher's progress bar.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from labs_lib.core.config import CHECKPOINT_MODES, GPTConfig, parse_job_args
from labs_lib.core.dist import cleanup, init_distributed
from labs_lib.core.runs import append_metrics, write_json
from labs_lib.measure.flops import measure_matmul_flops
from labs_lib.measure.throughput import training_step_seconds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m labs_lib.measure.compute", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for compute_rank<r>.json")
    p.add_argument("--gemm-sizes", type=int, nargs="+", default=[128, 256, 512, 1024])
    p.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--recompute", nargs="+", choices=CHECKPOINT_MODES, default=["none"],
                   help="activation checkpointing modes to time the steps under")
    p.add_argument("--n-layer", type=int, default=8)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--no-progress", action="store_true", help="accepted like every job module's (no bar here)")
    return p


def check_args(argv: list[str], world_size: int) -> int:
    """The pre-launch check (labs_lib.jobs.launch): returns the number of records the job writes."""
    a = parse_job_args(build_parser(), argv)
    if min(a.gemm_sizes) < 16 or min(a.micro_batches) < 1:
        raise ValueError("--gemm-sizes must be >= 16 and --micro-batches >= 1")
    if a.n_embd % a.n_head:
        raise ValueError(f"--n-embd {a.n_embd} is not divisible by --n-head {a.n_head}")
    return len(a.gemm_sizes) + len(a.micro_batches) * len(a.recompute)


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    info = init_distributed()
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = GPTConfig(vocab_size=a.vocab_size, block_size=a.block_size, n_layer=a.n_layer, n_head=a.n_head,
                    n_embd=a.n_embd)
    if info.distributed:
        dist.barrier()  # every rank measures at the same time: the cores are all busy
    gemm, steps = [], []
    for n in a.gemm_sizes:
        gemm.append({"size": n, "flops": measure_matmul_flops(n, torch.float32, seconds=0.3)})
        if info.is_main:
            append_metrics(out, {"step": len(gemm), **gemm[-1]})
    for mode in a.recompute:
        for b in a.micro_batches:
            steps.append({"micro_batch": b, "recompute": mode,
                          **training_step_seconds(cfg, b, steps=5, warmup=2, recompute=mode)})
            if info.is_main:
                append_metrics(out, {"step": len(gemm) + len(steps), **steps[-1]})
    write_json(out / f"compute_rank{info.rank}.json", {"gemm": gemm, "steps": steps})
    cleanup()


if __name__ == "__main__":
    main()

"""Training-step throughput of labs_lib's GPT against transformers' GPT2LMHeadModel of the same shape.

    .venv/bin/python benchmarks/train_throughput.py                  # ci and cpu profiles, fp32 and bf16 (~1 min)
    .venv/bin/python benchmarks/train_throughput.py --profile cpu --dtype bf16 --threads 1 --rounds 5

A step is forward + backward + AdamW step on the profile's micro-batch (batch_size x block_size random tokens).
Both models start from the same weights (transformers' is converted from ours) and run on the same batch with the
same thread count. They alternate in one process: after a warm-up, each round times ``--steps`` steps of one then
the other (the order flips every round, so drift of the machine hits both), and the table reports medians over
rounds. Writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, save_results  # noqa: E402

from labs_lib.core.config import get_profile  # noqa: E402
from labs_lib.models.gpt import GPT  # noqa: E402
from labs_lib.models.hf import to_hf  # noqa: E402


def make_step(model, optimizer, x, y, autocast, is_hf: bool):
    def step():
        with autocast():
            # transformers shifts the labels inside; ours takes targets already shifted (by the data loader)
            loss = model(input_ids=x, labels=x).loss if is_hf else model(x, y)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(step, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def bench_profile(name: str, dtype: str, steps: int, rounds: int, warmup: int) -> dict:
    profile = get_profile(name)
    cfg, batch_size = profile.model, profile.train.batch_size
    torch.manual_seed(0)
    ours = GPT(cfg).train()
    hf = to_hf(ours).train()
    x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size))
    y = torch.roll(x, -1, dims=1)
    autocast = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bf16" else contextlib.nullcontext)
    runs = {
        "ours": make_step(ours, torch.optim.AdamW(ours.parameters(), lr=1e-4), x, y, autocast, is_hf=False),
        "transformers": make_step(hf, torch.optim.AdamW(hf.parameters(), lr=1e-4), x, y, autocast, is_hf=True),
    }
    for step in runs.values():
        timed(step, warmup)
    seconds = {key: [] for key in runs}
    for r in range(rounds):
        for key in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            seconds[key].append(timed(runs[key], steps))
    tokens = batch_size * cfg.block_size
    ours_tps = tokens / statistics.median(seconds["ours"])
    hf_tps = tokens / statistics.median(seconds["transformers"])
    return {"profile": name, "dtype": dtype, "params": ours.num_params(), "batch": f"{batch_size}x{cfg.block_size}",
            "tokens/s ours": round(ours_tps, 1), "tokens/s transformers": round(hf_tps, 1),
            "ratio": round(ours_tps / hf_tps, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", nargs="+", default=["ci", "cpu"], help="run profiles whose model shape to use")
    p.add_argument("--dtype", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                   help="bf16: CPU autocast for both models")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per model per round (default per profile)")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    default_steps = {"ci": 30, "cpu": 6}  # ~0.3 s per round and model on 2 cores
    rows = []
    print(f"{'profile':8} {'dtype':5} {'params':>9} {'tokens/s ours':>14} {'tokens/s transformers':>22} {'ratio':>6}")
    for dtype in args.dtype:
        for name in args.profile:
            row = bench_profile(name, dtype, args.steps or default_steps.get(name, 3), args.rounds, args.warmup)
            rows.append(row)
            print(f"{name:8} {dtype:5} {row['params']:>9,} {row['tokens/s ours']:>14,.0f} "
                  f"{row['tokens/s transformers']:>22,.0f} {row['ratio']:>6.2f}", flush=True)
    info = machine_info()
    save_results("train_throughput", rows,
                 description=f"Training steps (forward, backward, AdamW) per second x tokens per step, labs_lib GPT vs "
                             f"transformers GPT2LMHeadModel (sdpa), same weights and batch, "
                             f"{info['torch_threads']} thread(s), medians of {args.rounds} alternating rounds.")


if __name__ == "__main__":
    main()

"""Speed that holds: the steady-state rate of a run, one warm-up rule for every lab and benchmark.

    steady_median(records, "tokens_per_s")      # median over the steps after the warm-up
    training_throughput(cfg, batch_size=8)      # tokens/s of full training steps of a GPT shape, in this process

The warm-up rule (:func:`steady_records`): the first quarter of a run's steps (at least one, when there are two or
more) pays for allocation, caches, compilation and the first collectives; the rest is the steady state.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time

import torch

from labs_lib.models.gpt import GPT

WARMUP_FRACTION = 0.25


def steady_records(records: list[dict]) -> list[dict]:
    """``records`` without the warm-up: the first ceil(n/4) of n >= 2 steps (a single record is kept)."""
    if len(records) < 2:
        return list(records)
    return records[max(1, math.ceil(len(records) * WARMUP_FRACTION)):]


def steady_median(records: list[dict], key: str = "tokens_per_s") -> float:
    """The median of ``key`` over the steady-state records (:func:`steady_records`)."""
    steady = steady_records(records)
    if not steady:
        raise ValueError(f"no records to take the median of {key!r} from: has the run written any steps?")
    return statistics.median(r[key] for r in steady)


def training_throughput(cfg, batch_size: int, steps: int = 5, warmup: int = 2, dtype: str = "fp32",
                        device: str | torch.device = "cpu", seed: int = 0) -> float:
    """Tokens/s of full training steps (forward, backward, AdamW) of labs_lib's GPT with shape ``cfg``, in-process.

    Median over ``steps`` timed steps after ``warmup`` untimed ones; random tokens (speed does not depend on them)."""

    torch.manual_seed(seed)
    model = GPT(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size), device=device)
    autocast = (torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if dtype == "bf16"
                else contextlib.nullcontext())
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with autocast:
            loss = model(x, x)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return batch_size * cfg.block_size / statistics.median(times)

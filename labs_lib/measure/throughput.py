"""Speed that holds: the steady-state rate of a run, one warm-up rule for every lab and benchmark.

    steady_median(records, "tokens_per_s")      # median over the steps after the warm-up
    training_throughput(cfg, batch_size=8)      # tokens/s of full training steps of a GPT shape, in this process
    training_step_seconds(cfg, batch_size=8)    # {"step_s", "optimizer_s"}: a step and its optimizer part
    checkpointing_step_seconds(cfg, batch=8)    # seconds per step under each activation-checkpointing mode

The warm-up rule (:func:`steady_records`): the first quarter of a run's steps (at least one, when there are two or
more) pays for allocation, caches, compilation and the first collectives; the rest is the steady state.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time

import torch

from labs_lib.core.config import GPTConfig
from labs_lib.models.gpt import GPT
from labs_lib.parallel.recompute import apply_activation_checkpointing

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


def training_step_seconds(cfg, batch_size: int, steps: int = 5, warmup: int = 2, dtype: str = "fp32",
                          device: str | torch.device = "cpu", seed: int = 0, recompute: str = "none") -> dict:
    """Seconds of a full training step (forward, backward, AdamW) of labs_lib's GPT with shape ``cfg``, in-process,
    and of its optimizer part (AdamW's step and zero_grad): {"step_s", "optimizer_s"}, medians over ``steps`` timed
    steps after ``warmup`` untimed ones; random tokens (speed does not depend on them). ``recompute``: the
    activation checkpointing mode (labs_lib.parallel.recompute)."""
    torch.manual_seed(seed)
    model = apply_activation_checkpointing(GPT(cfg).to(device), recompute)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size), device=device)
    autocast = (torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if dtype == "bf16"
                else contextlib.nullcontext())
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    steps_s, optimizer_s = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with autocast:
            loss = model(x, x)[1]
        loss.backward()
        sync()
        t1 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if i >= warmup:
            steps_s.append(time.perf_counter() - t0)
            optimizer_s.append(time.perf_counter() - t1)
    return {"step_s": statistics.median(steps_s), "optimizer_s": statistics.median(optimizer_s)}


def training_throughput(cfg, batch_size: int, steps: int = 5, warmup: int = 2, dtype: str = "fp32",
                        device: str | torch.device = "cpu", seed: int = 0) -> float:
    """Tokens/s of full training steps of labs_lib's GPT with shape ``cfg``, in-process
    (:func:`training_step_seconds`)."""
    seconds = training_step_seconds(cfg, batch_size, steps, warmup, dtype, device, seed)["step_s"]
    return batch_size * cfg.block_size / seconds


def _trainer(cfg: GPTConfig, mode: str, device: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = apply_activation_checkpointing(GPT(cfg).to(device), mode)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def _step_seconds(model, optimizer, x: torch.Tensor, clock, steps: int) -> float:
    t0 = clock()
    for _ in range(steps):
        model(x, x.roll(-1, 1))[1].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if x.is_cuda:
        torch.cuda.synchronize()
    return (clock() - t0) / steps


def checkpointing_step_seconds(cfg: GPTConfig, batch: int, modes: tuple[str, ...] = ("none", "selective", "full"),
                           rounds: int = 5, steps: int = 3) -> dict[str, float]:
    """Seconds per training step (forward, backward, AdamW) of the GPT ``cfg`` under each activation-checkpointing
    mode (labs_lib.parallel.recompute), here in this process: {mode: median over ``rounds`` of ``steps`` steps}.

    On a GPU: wall-clock time after a synchronize. On a CPU: this process's CPU time on one thread, so that other
    programs on the machine do not count. The modes take turns, in alternating order, so that the machine's drift
    hits all of them alike."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    clock = time.perf_counter if device == "cuda" else time.process_time
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), generator=torch.Generator().manual_seed(0))
        x = x.to(device)
        trainers = {mode: _trainer(cfg, mode, device) for mode in modes}
        _step_seconds(*trainers[modes[0]], x, clock, steps=1)  # warm-up: allocations, first kernels
        times = {mode: [] for mode in modes}
        for r in range(rounds):
            for mode in modes if r % 2 == 0 else modes[::-1]:
                times[mode].append(_step_seconds(*trainers[mode], x, clock, steps))
    finally:
        torch.set_num_threads(threads)
    return {mode: statistics.median(t) for mode, t in times.items()}

"""The one training-loop skeleton: every trainer's steps, timing, metrics, evaluation and checkpoint cadence.

The GPT trainer (data parallel, ZeRO by hand, 3D), the DeepSpeed GPT trainer, the DeepSpeed ViT trainer, the
pipeline timeline job and the benchmarks' torch-parallel driver all run :func:`run_loop`; what differs between them
is the step (``train_step(step) -> {"loss": ..., ...}``), the way torchtitan splits ``train_step`` from its
``forward_backward_step``::

    records = run_loop(lambda step: strategy.train_step(batches), Loop(out=out, start=0, max_steps=100,
                       samples_per_step=tokens), optimizer=strategy.optimizer, lr_of=lambda s: lr_at(s, cfg),
                       evaluate=lambda step: {"val_loss": ...}, save=lambda step: ...)

Per step: set the learning rate, run the step, time it (after a CUDA synchronize), then every ``log_every`` steps one
record ``{step, loss, lr, grad_norm, <unit>_per_s, step_time_s, <unit>, elapsed_s, ...}`` (loss and time averaged
over the steps it covers, plus whatever the step returned and ``evaluate`` added) appended to metrics.jsonl by the
main rank (and, as TensorBoard scalars, to ``out/tensorboard/``: labs_lib.measure.tensorboard), the progress bar
moved, a checkpoint saved every ``checkpoint_every`` steps and at the end. The profiler, the event files and the
progress bar are context managers: a step that raises closes them all.

Fault injection for the resume tests: ``LABS_FAULT_KILL_AFTER_STEP=N`` SIGKILLs the process after step N (after its
checkpoint, if one is due): a real kill, so the tests prove what a crash or ``scancel -s KILL`` leaves.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from labs_lib.core.dist import print0
from labs_lib.core.runs import append_metrics
from labs_lib.measure.tensorboard import ScalarLog

KILL_AFTER_STEP = "LABS_FAULT_KILL_AFTER_STEP"


@dataclass
class Loop:
    """What the loop needs to know about a run, beyond its step."""

    out: Path | str
    max_steps: int
    samples_per_step: int  # global tokens (or images) per optimizer step, for the throughput
    start: int = 0  # the step a resumed run continues after
    unit: str = "tokens"  # the records' "<unit>_per_s" and "<unit>"
    log_every: int = 1  # steps per metrics record
    eval_every: int = 0  # 0: evaluate only at the end (when there is an evaluate)
    checkpoint_every: int = 0  # 0: save only at the end (when there is a save)
    is_main: bool = True  # writes metrics.jsonl and the TensorBoard events, and shows the bar
    progress: bool = True
    desc: str = "train"
    device: torch.device | None = None  # a CUDA device is synchronized before each step's time is taken


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def run_loop(train_step: Callable[[int], object], loop: Loop, optimizer=None,
             lr_of: Callable[[int], float] | None = None, evaluate: Callable[[int], dict] | None = None,
             save: Callable[[int], None] | None = None, profiler=None,
             record_fields: Callable[[object], dict] | None = None) -> list[dict]:
    """Run steps ``loop.start + 1 .. loop.max_steps``; returns the records written (see the module docstring).

    ``train_step(step)`` runs one optimizer step and returns at least ``{"loss": float}`` (the same on every rank),
    optionally ``grad_norm`` and any other fields for the record; or, with ``record_fields``, whatever
    ``record_fields`` turns into those fields once the step's time is taken: the collectives that only build the
    record (the loss averaged over the ranks, every rank's bytes gathered) are not the step's cost. ``optimizer``:
    whose ``param_groups`` get ``lr_of(step)`` before the step, and whose learning rate the record shows.
    ``profiler``: a context manager whose value has ``.step()`` (labs_lib.measure.trace.profile_steps), called after
    every step."""
    records, window, t_start = [], [], time.perf_counter()
    bar = tqdm(total=loop.max_steps, initial=loop.start, desc=loop.desc, unit="step", mininterval=1.0,
               disable=not (loop.progress and loop.is_main))
    events = ScalarLog(loop.out, loop.start) if loop.is_main else contextlib.nullcontext()
    with bar, events, (profiler or contextlib.nullcontext()) as prof:
        for step in range(loop.start + 1, loop.max_steps + 1):
            if lr_of is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr_of(step)
            t0 = time.perf_counter()
            result = train_step(step)
            if loop.device is not None and loop.device.type == "cuda":
                torch.cuda.synchronize(loop.device)
            seconds = time.perf_counter() - t0
            window.append((record_fields(result) if record_fields is not None else result, seconds))
            if prof is not None:
                prof.step()
            if _due(step, loop.log_every, loop.max_steps):
                record = _record(step, window, loop, optimizer, time.perf_counter() - t_start)
                if evaluate is not None and _due(step, loop.eval_every, loop.max_steps):
                    record.update(evaluate(step))
                if loop.is_main:
                    append_metrics(loop.out, record)
                    events.add(record)
                records.append(record)
                window = []
                bar.set_postfix(loss=f"{record['loss']:.3f}", rate=f"{record[loop.unit + '_per_s']:.0f}")
            bar.update(1)
            if save is not None and _due(step, loop.checkpoint_every, loop.max_steps):
                save(step)
            if os.environ.get(KILL_AFTER_STEP) == str(step):
                os.kill(os.getpid(), signal.SIGKILL)
    if records:
        last = records[-1]
        rate = sum(r[loop.unit + "_per_s"] for r in records) / len(records)
        print0(f"done: step {last['step']} loss {last['loss']:.4f} {rate:.0f} {loop.unit}/s -> {loop.out}")
    return records


def _record(step: int, window: list[tuple[dict, float]], loop: Loop, optimizer, elapsed: float) -> dict:
    """One record for the steps in ``window``: their mean loss and step time, the last step's other fields."""
    results, times = [r for r, _ in window], [t for _, t in window]
    seconds = sum(times)
    record = {"step": step, "loss": sum(r["loss"] for r in results) / len(results),
              "lr": optimizer.param_groups[0]["lr"] if optimizer is not None else None,
              "grad_norm": results[-1].get("grad_norm"),
              f"{loop.unit}_per_s": loop.samples_per_step * len(window) / seconds,
              "step_time_s": seconds / len(window), loop.unit: step * loop.samples_per_step, "elapsed_s": elapsed}
    record.update({k: v for k, v in results[-1].items() if k not in ("loss", "grad_norm")})
    return record

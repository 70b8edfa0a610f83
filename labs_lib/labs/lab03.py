"""Lab 03 (notebooks/03_memory_saving.ipynb): memory measured per rank, the recompute overhead, the exercise check.

    held_rows(runs, world, formula_of, label)   measured bytes per rank and part next to a formula's, as table rows
    deepspeed_zero_runs(runs_dir, profile)      DeepSpeed ZeRO stages 0-3 on 1 node x 2 ranks
    deepspeed_offload_run(runs_dir, profile)    DeepSpeed ZeRO-2 with the optimizer offloaded to the CPU
    accumulation_matches_big_batch(fn)          exercise 3: does the learner's gradient accumulation give the big
                                                batch's gradients?
    check_bytes_per_param(b); check_zero3_gb(gb); check_accumulation(fn)   the exercises' checks
"""

from __future__ import annotations

from pathlib import Path

import torch

from labs_lib.core.config import GPTConfig
from labs_lib.estimates.memory import GB, MIXED_ADAM, zero_bytes_per_rank
from labs_lib.jobs.launch import train_deepspeed
from labs_lib.labs.checks import check, whole_batch_reference

PARTS = ("params", "grads", "optimizer")


def held_rows(runs: dict[int, list[dict]], world: int, formula_of, label: str) -> list[dict]:
    """Table rows (stage, rank, part): what each rank held at the last step (its ``mem_rank<r>`` field) next to
    ``formula_of(stage, rank)`` (a dict of bytes per part). ``runs``: {ZeRO stage: metrics records}."""
    rows = []
    for stage, records in runs.items():
        for rank in range(world):
            formula = formula_of(stage, rank)
            held = dict(records[-1][f"mem_rank{rank}"])
            held["optimizer"] += held.pop("master", 0)  # DeepSpeed reports its fp32 master copy apart
            rows += [{"impl": label, "stage": stage, "rank": rank, "part": part, "measured MB": held[part] / 1e6,
                      "formula MB": formula[part] / 1e6, "ratio": held[part] / formula[part]} for part in PARTS]
    return rows


def deepspeed_zero_runs(runs_dir: str | Path, profile: str, **settings) -> dict[int, list[dict]]:
    """Train with DeepSpeed ZeRO stage 0, 1, 2 and 3 (configs/deepspeed/zero<S>.json) on 1 node x 2 ranks, with the
    trainer's ``settings``; returns {stage: metrics records} (each with ``mem_rank<r>``)."""
    return {stage: train_deepspeed(Path(runs_dir) / f"lab03_ds_zero{stage}", nodes=1, nproc_per_node=2,
                                   ds_config=f"zero{stage}.json", profile=profile, **settings)
            for stage in range(4)}


def deepspeed_offload_run(runs_dir: str | Path, profile: str, **settings) -> list[dict]:
    """Train with DeepSpeed ZeRO-2 and its optimizer on the CPU (configs/deepspeed/zero2_offload.json) on 1 node x
    2 ranks; returns the metrics records."""
    return train_deepspeed(Path(runs_dir) / "lab03_ds_offload", nodes=1, nproc_per_node=2,
                           ds_config="zero2_offload.json", profile=profile, **settings)


def accumulation_matches_big_batch(fn, cfg: GPTConfig | None = None, batch: int = 8, micro_batches: int = 4,
                                   atol: float = 1e-6) -> bool | None:
    """Check a learner's ``fn(model, x, y, micro_batches)`` (gradient accumulation), in this process: it must leave in
    ``.grad`` the gradient of the mean loss over the whole batch, as one backward on the whole batch does.

    Returns None if ``fn`` is not written yet (returns None or ...), else True / False."""
    model, x, y, _, reference = whole_batch_reference(cfg, batch)
    if fn(model, x, y, micro_batches) in (None, Ellipsis):
        return None
    return all(p.grad is not None and torch.allclose(p.grad, reference[n], rtol=0, atol=atol)
               for n, p in model.named_parameters())


# ------------------------------------------------------------------------------------------------ exercise checks

def check_bytes_per_param(answer) -> bool:
    return check("bytes per parameter, mixed-precision Adam", answer, sum(MIXED_ADAM),
                 hint="count what each parameter has: its weight and gradient in 16 bits, and what Adam keeps in 32",
                 more="2 (16-bit weights) + 2 (16-bit gradients) + 4 + 4 + 4 (fp32 master weights, Adam's m and v)")


def check_zero3_gb(answer, params: float = 7.5e9, gpus: int = 64) -> bool:
    expected = sum(zero_bytes_per_rank(params, gpus, 3, MIXED_ADAM).values()) / GB
    return check(f"{params / 1e9:g}B params, {gpus} GPUs, ZeRO-3 (GB per GPU)", answer, expected,
                 rtol=0.03, hint="ZeRO-3 splits all of the training state over the GPUs",
                 more=f"16 bytes x {params:.3g} parameters / {gpus} GPUs, in GB (1e9 bytes)")


def check_accumulation(fn) -> bool:
    """Exercise 3 (:func:`accumulation_matches_big_batch` decides)."""
    return check("gradient accumulation equals the big batch", accumulation_matches_big_batch(fn), True,
                 hint="each micro-batch's loss must count 1/m of the whole batch's mean loss",
                 more="for xm, ym in zip(x.chunk(m), y.chunk(m)): (model(xm, ym)[1] / m).backward()")

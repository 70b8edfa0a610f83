"""Lab 05 (pipeline parallelism): run the pipeline timeline job and read back what every rank wrote.

    results = run("build/runs/pp", pp=4, micro_batches=8, schedule="1f1b", compute_delay_s=0.03, n_layer=8)
    reference = run_reference("build/runs/ref", n_layer=8)       # the same steps on one process
    results[0]["losses"], reference["losses"]                     # equal to float rounding
    measured_bubble(results), order(results[1]), layout_rows(results)

The job (``python -m labs_lib.train.pipeline_job``, one process per stage) runs outside the notebook kernel through
labs_lib.jobs.launch: a Slurm job of one node when Slurm answers, torchrun on this machine otherwise.
    check_bubble(answer); check_warmup(answer, results); check_busiest(stage, n, results)   the exercises' checks
"""

from __future__ import annotations

from pathlib import Path

from labs_lib.core.runs import read_json
from labs_lib.estimates.parallel import bubble_fraction
from labs_lib.jobs.launch import launch, settings_args
from labs_lib.labs.checks import check

JOB = "labs_lib.train.pipeline_job"


def run(out: str | Path, pp: int, micro_batches: int, schedule: str = "1f1b", chunks: int | None = None,
        steps: int = 3, compute_delay_s: float = 0.0, profile: str | None = None, progress: bool = True,
        timeout_s: float = 600, **overrides) -> list[dict]:
    """Run the pipeline job on ``pp`` processes of one node; returns each rank's results (pipeline_rank<r>.json), by
    rank.

    ``overrides``: ``n_layer``, ``n_head``, ``n_embd``, ``block_size``, ``batch_size``, ``lr``, ``seed``, and
    ``impl="torch"`` to run ``torch.distributed.pipelining``'s schedule over the same stages instead of ours (losses
    only: no timeline, no compute delay). A layout that cannot run raises ``ValueError`` naming the fix before any
    process starts; a failed job raises the launcher's error with the log's tail. ``out`` is emptied first."""
    args = settings_args(profile, pp=pp, micro_batches=micro_batches, schedule=schedule, chunks=chunks, steps=steps,
                         compute_delay_s=compute_delay_s, **overrides)
    desc = f"{schedule} p={pp} m={micro_batches}" + (f" v={chunks}" if chunks else "")
    launch(JOB, args, out, nodes=1, nproc_per_node=pp, profile=profile, progress=progress, desc=desc,
           timeout_s=timeout_s)
    return read_results(out)


def run_reference(out: str | Path, steps: int = 3, profile: str | None = None, progress: bool = True,
                  timeout_s: float = 600, **overrides) -> dict:
    """The same ``steps`` on one process with the whole model (same seed, data, optimizer); returns its results."""
    args = settings_args(profile, reference=True, steps=steps, **overrides)
    launch(JOB, args, out, nodes=1, nproc_per_node=1, profile=profile, progress=progress, desc="one process",
           timeout_s=timeout_s)
    return read_json(Path(out) / "reference.json")


def read_results(out: str | Path) -> list[dict]:
    """The ``pipeline_rank<r>.json`` files of a finished job, by rank."""
    files = sorted(Path(out).glob("pipeline_rank*.json"), key=lambda p: int(p.stem.removeprefix("pipeline_rank")))
    if not files:
        raise FileNotFoundError(f"no pipeline_rank<r>.json in {out}: has the job run? (see its job.log)")
    return [read_json(f) for f in files]


def measured_bubble(results: list[dict]) -> float:
    """The shown step's idle fraction, averaged over ranks (the formula predicts the same on every rank)."""
    return sum(r["idle_fraction"] for r in results) / len(results)


def order(result: dict) -> list[str]:
    """A rank's compute order in the shown step: ``F3`` = forward of micro-batch 3, ``B0`` = backward of 0
    (``F3'`` = chunk 1 when interleaved)."""
    return [f"{e['kind'][0].upper()}{e['micro_batch']}" + "'" * e["chunk"] for e in result["timeline"]
            if e["kind"] in ("forward", "backward")]


def layout_rows(results: list[dict]) -> list[dict]:
    """One row per (rank, chunk): which layers and which other modules it holds, and its parameters."""
    rows = []
    for r in results:
        for s in r["stages"]:
            layers = s["layers"]
            rows.append({"rank": r["rank"], "chunk": s["chunk"], "stage": s["stage_index"],
                         "blocks": f"{layers[0]}..{layers[-1]}" if len(layers) > 1 else str(layers[0]),
                         "other modules": ", ".join(s["modules"]) or "-", "parameters": f"{s['params']:,}"})
    return rows


# ------------------------------------------------------------------------------------------------ exercise checks

def check_bubble(answer, pp: int = 8, micro_batches: int = 32) -> bool:
    return check(f"bubble of p={pp}, m={micro_batches}", answer, bubble_fraction(pp, micro_batches),
                 hint="the fraction of the step each stage waits: filling and draining the pipeline",
                 more="(p - 1) / (m + p - 1): idle time over the total time of the step")


def check_warmup(answer, results: list[dict]) -> bool:
    """Exercise 2: the warm-up forwards per stage, as the 1F1B run's own timelines show them."""
    measured = [order(r).index("B0") - 1 for r in results]  # forwards before the first backward, less 1F1B's one
    return check(f"1F1B warm-up forwards per stage (p={len(results)})", answer, measured,
                 hint="a stage starts its first backward once the last stage has its first output",
                 more="stage r runs p - r - 1 warm-up forwards (never more than m)")


def check_busiest(stage, in_flight, results: list[dict]) -> bool:
    """Exercise 3: the stage that keeps the most micro-batches' activations, and how many, as measured."""
    peaks = [r["peak_in_flight"] for r in results]
    ok = check("stage with the most activations under 1F1B", stage, peaks.index(max(peaks)),
               hint="the stage with the longest warm-up keeps the most micro-batches waiting for their backward",
               more="stage 0: it runs p - 1 warm-up forwards before its first backward")
    return check("its micro-batches in flight", in_flight, max(peaks), hint="its warm-up forwards, and one more",
                 more="min(p - r, m)") and ok

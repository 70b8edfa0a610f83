"""Lab 04 (notebooks/04_tensor_parallelism.ipynb): reading back where a tensor-parallel job ran and what it held.

    job_start_line(run)        the first line of the job's log: where Slurm (or torchrun) placed it
    parallel_layout(run)       the data / tensor / pipeline layout the run trained with (config.json's "parallel")
    params_held(run, shard)    parameters a rank updated, counted from its optimizer state in the newest checkpoint
"""

from __future__ import annotations

from pathlib import Path

from labs_lib.core import checkpoint
from labs_lib.core.runs import read_json
from labs_lib.jobs.launch import LOG
from labs_lib.jobs.process import read_log


def job_start_line(run: str | Path) -> str:
    """The first line of ``run``'s job log (the job script's own: nodes, ranks, module)."""
    lines = read_log(Path(run) / LOG).splitlines()
    if not lines:
        raise ValueError(f"{Path(run) / LOG} is empty: has the job run?")
    return lines[0]


def parallel_layout(run: str | Path) -> dict:
    """The parallel layout the run resolved and trained with, as its config.json records it (dp, tp, pp, ...)."""
    return read_json(Path(run) / "config.json")["parallel"]


def params_held(run: str | Path, shard: str | None = None) -> int:
    """Parameters one rank updated: Adam's first moment has one number per parameter it updates. ``shard``: a
    tensor/pipeline-parallel rank's optimizer shard in the checkpoint (``"pp0_tp1"``: pipeline stage 0, tensor
    rank 1); None for a replicated run's one optimizer state."""
    latest = checkpoint.latest_checkpoint(Path(run) / "checkpoints")
    if latest is None:
        raise FileNotFoundError(f"no complete checkpoint in {Path(run) / 'checkpoints'}: has the run finished?")
    state = checkpoint.load_optimizer_shard(latest, shard) if shard else checkpoint.load_optimizer_state(latest)
    return sum(s["exp_avg"].numel() for s in state["state"].values())

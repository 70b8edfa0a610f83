"""Lab 00 (notebooks/00_welcome_environment.ipynb): the first distributed job.

    run_allreduce(out)     the 2-node x 2-task all-reduce check, through Slurm (slurm/allreduce.sbatch) or torchrun,
                           and its result read back from out/allreduce.json
"""

from __future__ import annotations

from pathlib import Path

from labs_lib.core.runs import read_json
from labs_lib.jobs.launch import launch

RESULT = "allreduce.json"


def run_allreduce(out: str | Path) -> dict:
    """Run ``python -m labs_lib.core.dist`` on 2 nodes x 2 ranks (each contributes rank + 1 to one all-reduce) and
    return what it wrote: ``{"world_size", "sum", "expected", "ok", "ranks": [one dict per rank]}``. The job's
    output is ``out/job.log``."""
    launch("labs_lib.core.dist", [], out, nodes=2, nproc_per_node=2, script="allreduce.sbatch", progress=False,
           desc="allreduce")
    return read_json(Path(out) / RESULT)

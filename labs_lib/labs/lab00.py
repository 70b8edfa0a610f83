"""Lab 00 (notebooks/00_welcome_environment.ipynb): the first distributed job.

    run_allreduce(out)     the 2-node x 2-task all-reduce check, through Slurm (slurm/allreduce.sbatch) or torchrun,
                           and its result read back from out/allreduce.json
    check_hello_tasks(n); check_allreduce_sum(s)   the exercises' checks
"""

from __future__ import annotations

from pathlib import Path

from labs_lib.core.runs import read_json
from labs_lib.jobs.launch import launch
from labs_lib.labs.checks import check

RESULT = "allreduce.json"


def run_allreduce(out: str | Path) -> dict:
    """Run ``python -m labs_lib.core.dist`` on 2 nodes x 2 ranks (each contributes rank + 1 to one all-reduce) and
    return what it wrote: ``{"world_size", "sum", "expected", "ok", "ranks": [one dict per rank]}``. The job's
    output is ``out/job.log``."""
    launch("labs_lib.core.dist", [], out, nodes=2, nproc_per_node=2, script="allreduce.sbatch", progress=False,
           desc="allreduce")
    return read_json(Path(out) / RESULT)


# ------------------------------------------------------------------------------------------------ exercise checks

HELLO_NODES, HELLO_TASKS_PER_NODE = 2, 1  # slurm/hello.sbatch's request


def check_hello_tasks(answer) -> bool:
    return check("tasks in the hello job", answer, HELLO_NODES * HELLO_TASKS_PER_NODE,
                 hint="read the #SBATCH lines: how many nodes, how many tasks on each?",
                 more="--nodes times --ntasks-per-node")


def check_allreduce_sum(answer, ranks: int = 12) -> bool:
    return check(f"all-reduce sum of rank+1 over {ranks} ranks", answer, sum(range(1, ranks + 1)),
                 hint="every rank contributes its rank + 1, and all-reduce adds them all",
                 more=f"1 + 2 + ... + {ranks}, or n (n + 1) / 2")

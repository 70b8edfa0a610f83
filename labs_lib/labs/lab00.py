"""Lab 00 (notebooks/00_welcome_environment.ipynb): the first distributed job.

    run_allreduce(out)     the 2-node x 2-task all-reduce check, through Slurm (slurm/allreduce.sbatch) or torchrun,
                           and its result read back from out/allreduce.json
    transport_rows(result, out)   what each rank's process group talked over (gloo: its sockets; NCCL: its log)
    topology()             nvidia-smi topo -m on a GPU node, else the CPUs the ranks share
    links(out)             all-reduce bus bandwidth within a node and across nodes, measured by two real jobs
    check_hello_tasks(n); check_job_script(text); check_allreduce_sum(s)   the exercises' checks
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from labs_lib.core.runs import read_json
from labs_lib.jobs.launch import launch, use_slurm
from labs_lib.labs.checks import check

RESULT = "allreduce.json"


def run_allreduce(out: str | Path) -> dict:
    """Run ``python -m labs_lib.core.dist`` on 2 nodes x 2 ranks (each contributes rank + 1 to one all-reduce) and
    return what it wrote: ``{"world_size", "sum", "expected", "ok", "ranks": [one dict per rank]}``. The job's
    output is ``out/job.log``."""
    launch("labs_lib.core.dist", [], out, nodes=2, nproc_per_node=2, script="allreduce.sbatch", progress=False,
           desc="allreduce")
    return read_json(Path(out) / RESULT)


def transport_rows(result: dict, out: str | Path) -> list[dict]:
    """One row per rank of the all-reduce job: its node, backend and what the group talked over. gloo ranks report
    their own sockets (labs_lib.core.dist.gloo_transport); NCCL names each channel's transport in the job's log
    (``NCCL_DEBUG=INFO``: ``via P2P/IPC`` or ``P2P/CUMEM`` within a node over NVLink / PCIe, ``via NET/IB`` or
    ``NET/Socket`` across nodes), read back from ``out/job.log``."""
    nccl = nccl_transports(read_log(out))
    keys = ("transport", "interface", "address", "peers", "connections")
    return [{"rank": r["rank"], "node": r["node"], "backend": r["backend"],
             **({k: r[k] for k in keys if k in r} if r["backend"] == "gloo"
                else {"transport": ", ".join(nccl.get(r["rank"], ["(no NCCL INFO lines in job.log)"]))})}
            for r in result["ranks"]]


def read_log(out: str | Path) -> str:
    path = Path(out) / "job.log"
    return path.read_text(errors="replace") if path.exists() else ""


_NCCL_VIA = re.compile(r"^(?:(\d+): )?.*NCCL INFO .*\bvia (\S+)")


def nccl_transports(log: str) -> dict[int, list[str]]:
    """{rank: the distinct transports NCCL chose} from NCCL_DEBUG=INFO lines of a job log (srun's ``--label``
    prefix ``<task>: `` is the rank: slurm/allreduce.sbatch starts one task per rank)."""
    found: dict[int, set[str]] = {}
    for line in log.splitlines():
        match = _NCCL_VIA.match(line)
        if match:
            found.setdefault(int(match.group(1) or 0), set()).add(match.group(2))
    return {rank: sorted(ways) for rank, ways in sorted(found.items())}


def topology() -> str:
    """How this node's devices connect: ``nvidia-smi topo -m`` where there are NVIDIA GPUs (NV# = NVLink, PIX / PXB
    = PCIe switches, PHB / SYS = through a CPU or across sockets), else the CPUs and NUMA nodes the ranks share."""
    if shutil.which("nvidia-smi"):
        shown = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True)
        if shown.returncode == 0:
            return shown.stdout
    cpus = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    wanted = ("Model name", "CPU(s)", "Thread(s) per core", "Socket(s)", "NUMA node(s)")
    lines = [line for line in cpus if line.split(":")[0].strip() in wanted]
    return "no NVIDIA GPU here (no nvidia-smi): the ranks share these CPUs and talk through memory and TCP\n" + \
        "\n".join(lines)


def links(out: str | Path, progress: bool = True) -> dict:
    """All-reduce bus bandwidth against message size within one node (2 ranks) and across two (1 rank each), as
    two real jobs (labs_lib.measure.bandwidth, nccl-tests' way: a tight loop), each with its fitted latency and
    bandwidth."""
    from labs_lib.planner.calibrate import measure_links

    return measure_links(Path(out), progress=progress, collectives=("all_reduce",), compute_between_s=0.0)


# ------------------------------------------------------------------------------------------------ exercise checks

HELLO_NODES, HELLO_TASKS_PER_NODE = 2, 1  # slurm/hello.sbatch's request


def check_hello_tasks(answer) -> bool:
    return check("tasks in the hello job", answer, HELLO_NODES * HELLO_TASKS_PER_NODE,
                 hint="read the #SBATCH lines: how many nodes, how many tasks on each?",
                 more="--nodes times --ntasks-per-node")


def check_job_script(script: str | None, out: str | Path, nodes: int = 2, tasks_per_node: int = 2,
                     timeout_s: float = 120) -> bool:
    """Exercise: a job script whose every task prints ``task <SLURM_PROCID> on <SLURMD_NODENAME>``, on ``nodes``
    nodes x ``tasks_per_node`` tasks. Submitted for real; its log must name every task once, each node
    ``tasks_per_node`` times."""
    from labs_lib.jobs import slurm

    name = "your job script"
    if script is None or script is Ellipsis:
        return check(name, None, None, hint="start from the hello script above: #SBATCH lines, then srun")
    if not use_slurm(quiet=True):
        print(f"⏳ {name}: no Slurm cluster here to run it on (the labs use torchrun instead); nothing to check")
        return False
    path = Path(out) / "my_job.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    job = slurm.submit(path, output=Path(out) / "my_job.log")
    try:
        job.wait(timeout=timeout_s, progress=False)
    except slurm.JobFailed as e:
        raise AssertionError(f"❌ {name}: the job failed ({e.state}); its log:\n{job.tail()}") from None
    except TimeoutError:
        job.cancel()
        raise AssertionError(f"❌ {name}: still running after {timeout_s:.0f} s (cancelled): does it wait on "
                             "something?") from None
    tasks = re.findall(r"^task (\d+) on (\S+)\s*$", job.log(), flags=re.MULTILINE)
    per_node = {node: sum(1 for _, n in tasks if n == node) for _, node in tasks}
    ok = sorted(int(t) for t, _ in tasks) == list(range(nodes * tasks_per_node)) and len(per_node) == nodes \
        and set(per_node.values()) == {tasks_per_node}
    return check(name, ok, True, hint=f"its log has {len(tasks)} 'task ... on ...' line(s) on {len(per_node)} "
                 f"node(s); {nodes * tasks_per_node} tasks on {nodes} nodes were asked for",
                 more="#SBATCH --nodes=2 and #SBATCH --ntasks-per-node=2; srun starts one copy of its command per "
                      "task: srun bash -c 'echo \"task $SLURM_PROCID on $SLURMD_NODENAME\"'")


def check_allreduce_sum(answer, ranks: int = 12) -> bool:
    return check(f"all-reduce sum of rank+1 over {ranks} ranks", answer, sum(range(1, ranks + 1)),
                 hint="every rank contributes its rank + 1, and all-reduce adds them all",
                 more=f"1 + 2 + ... + {ranks}, or n (n + 1) / 2")

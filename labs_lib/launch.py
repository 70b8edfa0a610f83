"""Start multi-process training from a notebook without running it inside the kernel.

Multi-process code never runs in the Jupyter kernel (spawn re-imports ``__main__``, pytorch#20375). The notebook
calls :func:`train`, which checks the configuration first (a bad one fails here, before any process starts), then
submits ``slurm/train_gpt.sbatch`` to the Slurm cluster (``nodes`` x ``nproc_per_node`` ranks; the local cluster of
simulated nodes is started if no site Slurm answers) and follows ``metrics.jsonl`` with a progress bar. Where Slurm
cannot run (no root to install it, or ``LABS_LAUNCHER=torchrun``), it says so and runs the same training with
:func:`torchrun` on this machine. A failed job raises :class:`LaunchError` (torchrun) or
:class:`labs_lib.slurm.JobFailed` (Slurm), each with the exit code, the log's first error and its tail.

    metrics = launch.train("build/runs/demo", nodes=2, nproc_per_node=2, max_steps=100)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from labs_lib.slurm import failure_report


class LaunchError(RuntimeError):
    def __init__(self, message: str, returncode: int, log: str):
        super().__init__(f"{message} (exit code {returncode})\n" + failure_report(log))
        self.returncode = returncode
        self.log_tail = "\n".join(log.splitlines()[-20:])


def train_args(out: str | Path, profile: str | None = None, resume: bool = False, **settings) -> list[str]:
    """Command-line arguments of ``labs_lib.train`` for the given settings (``max_steps=20`` → ``--max-steps 20``)."""
    args = ["--out", str(out), "--no-progress"]
    if profile:
        args += ["--profile", profile]
    if resume:
        args.append("--resume")
    for name, value in settings.items():
        flag = name.replace("_", "-")
        if isinstance(value, bool):  # switches: compile=True -> --compile, ddp_overlap=False -> --no-ddp-overlap
            args.append(("--" if value else "--no-") + flag)
        elif value is not None:
            args += ["--" + flag, str(value)]
    return args


def check_training_config(args: list[str], world_size: int):
    """Parse and validate exactly what the training processes will see, the DP x TP x PP layout on ``world_size``
    ranks included; raise ValueError naming the fix.

    Returns the (model, train) configs."""
    from labs_lib.parallel.mesh import check_layout
    from labs_lib.train import build_parser, configs_from_args

    model_cfg, train_cfg, parallel = configs_from_args(build_parser().parse_args(args))
    check_layout(model_cfg, train_cfg, parallel, world_size)
    return model_cfg, train_cfg


def read_log(path: str | Path) -> str:
    """A job's log ("" before it exists)."""
    path = Path(path)
    return path.read_text(errors="replace") if path.exists() else ""


def tail(path: str | Path, n: int = 20) -> str:
    return "\n".join(read_log(path).splitlines()[-n:])


def show_steps(bar, records: list[dict]) -> None:
    """Move a progress bar to the newest step of ``metrics.jsonl``'s records, with its loss."""
    if records:
        bar.n = records[-1]["step"]
        bar.set_postfix(loss=f"{records[-1]['loss']:.3f}")
        bar.refresh()


def run_child(cmd: list[str], log: Path, on_poll=lambda: None, timeout_s: float | None = None,
              what: str = "training") -> None:
    """Run ``cmd`` as a child process writing to ``log``, calling ``on_poll()`` as it runs (to move a progress bar).

    A notebook interrupt, or running past ``timeout_s``, stops the child too; a failure raises :class:`LaunchError`
    with the exit code and the log's tail."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        process = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            while process.poll() is None:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"the {what} job ran past {timeout_s:.0f} s; its log: {log}\n{tail(log)}")
                time.sleep(0.5)
                on_poll()
            on_poll()
        except BaseException:
            process.terminate()
            process.wait()
            raise
    if process.returncode != 0:
        raise LaunchError(f"the {what} job failed; full log: {log}", process.returncode, read_log(log))


def torchrun(out: str | Path, nproc: int = 2, profile: str | None = None, resume: bool = False,
             progress: bool = True, **settings) -> list[dict]:
    """Train with ``nproc`` local processes (DDP); returns the run's metrics. Settings as in ``labs_lib.train``."""
    from labs_lib.train import read_metrics

    out = Path(out)
    args = train_args(out, profile, resume, **settings)
    _, train_cfg = check_training_config(args, nproc)
    _fresh(out, resume)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "labs_lib.train", *args]
    bar = tqdm(total=train_cfg.max_steps, desc=f"torchrun x{nproc}", unit="step", disable=not progress)
    try:
        run_child(cmd, out / "train.log", lambda: show_steps(bar, read_metrics(out)))
    finally:
        bar.close()
    return read_metrics(out)


def _fresh(out: Path, resume: bool) -> None:
    """A run that does not resume starts from an empty folder (no stale checkpoints to resume by mistake)."""
    if not resume and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def use_slurm() -> bool:
    """True when training goes through Slurm: a site cluster, or the local one (started here if needed)."""
    from labs_lib import slurm

    if os.environ.get("LABS_LAUNCHER", "slurm") == "torchrun":
        print("LABS_LAUNCHER=torchrun: launching with torchrun on this machine instead of Slurm")
        return False
    try:
        slurm.ensure_local_cluster(quiet=True)
        return True
    except (slurm.SlurmUnavailable, RuntimeError) as e:
        print(f"NOTICE: no Slurm cluster here ({str(e).strip().splitlines()[-1] if str(e).strip() else e}).\n"
              "The same training runs with torchrun on this machine instead: one node, the same number of ranks.")
        return False


def train(out: str | Path, nodes: int = 2, nproc_per_node: int = 2, profile: str | None = None,
          resume: bool = False, progress: bool = True, **settings) -> list[dict]:
    """Train on ``nodes`` x ``nproc_per_node`` ranks as a Slurm job (slurm/train_gpt.sbatch); returns the metrics.

    Settings are ``labs_lib.train``'s (``max_steps=100``, ``batch_size=8``, ...). Without Slurm, runs the same with
    torchrun here. ``resume=False`` starts afresh in an emptied ``out``; ``resume=True`` continues its checkpoint.
    """
    from labs_lib import slurm
    from labs_lib.config import default_profile_name
    from labs_lib.train import read_metrics

    out = Path(out).resolve()
    world_size = nodes * nproc_per_node
    args = train_args(out, profile, resume, **settings)
    _, train_cfg = check_training_config(args, world_size)  # fails here, before a job exists
    if not use_slurm():
        return torchrun(out, world_size, profile, resume, progress, **settings)
    _fresh(out, resume)
    job = slurm.submit("train_gpt.sbatch", *args[3:], nodes=nodes, job_name=f"train_{out.name}",
                       output=out / "train.log", OUT=out,
                       NPROC_PER_NODE=nproc_per_node, LABS_PROFILE=profile or default_profile_name())
    print(f"submitted Slurm job {job.id}: {nodes} node(s) x {nproc_per_node} ranks; log {out / 'train.log'}")
    bar = tqdm(total=train_cfg.max_steps, desc=f"Slurm job {job.id}", unit="step", disable=not progress)
    try:
        while job.state not in slurm.DONE_OK | slurm.DONE_BAD:
            show_steps(bar, read_metrics(out))
            time.sleep(1.0)
    except BaseException:  # a notebook interrupt cancels the job too
        job.cancel()
        raise
    finally:
        bar.close()
    job.wait(progress=False)  # raises JobFailed / JobCancelled with the log's tail
    return read_metrics(out)

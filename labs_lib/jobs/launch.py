"""The one way a lab starts a multi-process job: check → fresh run folder → Slurm or torchrun → progress → result.

Multi-process code never runs in the Jupyter kernel (spawn re-imports ``__main__``, pytorch#20375). A notebook asks
:func:`launch` to run a job module and reads back what the job wrote into its run folder::

    launch("labs_lib.train.gpt", ["--max-steps", "100"], "build/runs/demo", nodes=2, nproc_per_node=2)
    train_gpt("build/runs/demo", nodes=2, nproc_per_node=2, max_steps=100)        # the same, settings as keywords

1. **Check**: the job module's ``check_args(argv, world_size)`` parses and validates exactly what the ranks will
   see; a bad configuration raises ``ValueError`` naming the fix here, before any process or job exists.
2. **Fresh run folder**: ``out`` is emptied unless the run resumes (labs_lib.core.runs.fresh_run_dir).
3. **Slurm when it answers** (a site cluster, or the local cluster of simulated nodes, started if needed), through
   the job script (``slurm/train_gpt.sbatch``: one torchrun per node, ``TRAIN_MODULE``); **torchrun otherwise**,
   on this machine with the same number of ranks, with a notice saying so (``LABS_LAUNCHER=torchrun`` asks for it).
4. **Progress**: a bar over the steps the job appends to ``out/metrics.jsonl``.
5. **Failure**: :class:`~labs_lib.jobs.process.LaunchError` (torchrun) or :class:`~labs_lib.jobs.slurm.JobFailed`
   (Slurm), with the exit code, the log's first error and its tail. An interrupt stops the job too.

``memory_cap_gb``: each rank gets a memory cap that plays a GPU's memory (labs_lib.core.memcap, through
``LABS_MEMORY_CAP_BYTES``); past it the job fails with "out of memory: rank r needs more than the ... GB memory cap
(the planner estimated ... GB per rank for this plan)", the estimate being ``memory_estimate_gb`` when the caller
has one (this layer cannot ask the planner). Under Slurm the cap is ours as well: the local cluster
(``TaskPlugin=task/none``) enforces no ``sbatch --mem``.

Every job module takes ``--out DIR`` and ``--no-progress`` and has a ``check_args``; its output goes to
``out/job.log``. Returns the run's metrics records.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from labs_lib.core.config import default_profile_name
from labs_lib.core.memcap import cap_environment
from labs_lib.core.runs import fresh_run_dir, read_metrics
from labs_lib.jobs import slurm
from labs_lib.jobs.process import read_log, run_child, show_steps

LOG = "job.log"


def settings_args(profile: str | None = None, resume: bool = False, **settings) -> list[str]:
    """A job's command-line arguments for keyword settings: ``max_steps=20`` → ``--max-steps 20``, ``compile=True``
    → ``--compile``, ``ddp_overlap=False`` → ``--no-ddp-overlap``; ``None`` values are left out."""
    args = ["--profile", profile] if profile else []
    if resume:
        args.append("--resume")
    for name, value in settings.items():
        flag = name.replace("_", "-")
        if isinstance(value, bool):
            args.append(("--" if value else "--no-") + flag)
        elif value is not None:
            args += ["--" + flag, str(value)]
    return args


def check(module: str, args: list[str], out: str | Path, world_size: int, memory_cap: bool = False) -> int | None:
    """Run the job module's own check on exactly the command line its ranks will get; returns how many steps the
    job will log (the progress bar's length), or None. Raises ValueError naming the fix, also when a
    ``memory_cap`` is asked of a module whose ranks do not apply one (``APPLIES_MEMORY_CAP``)."""
    job = importlib.import_module(module)
    if memory_cap and not getattr(job, "APPLIES_MEMORY_CAP", False):
        raise ValueError(f"{module} does not apply a memory cap: drop memory_cap_gb, or run labs_lib.train.gpt")
    return job.check_args(["--out", str(out), "--no-progress", *args], world_size)


def use_slurm(quiet: bool = False) -> bool:
    """True when jobs go through Slurm: a site cluster, or the local one (started here if needed). Otherwise says
    why, and that the same job runs with torchrun on this machine."""
    if os.environ.get("LABS_LAUNCHER", "slurm") == "torchrun":
        if not quiet:
            print("LABS_LAUNCHER=torchrun: launching with torchrun on this machine instead of Slurm")
        return False
    try:
        slurm.ensure_local_cluster(quiet=True)
        return True
    except (slurm.SlurmUnavailable, RuntimeError) as e:
        if not quiet:
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            print(f"NOTICE: no Slurm cluster here ({reason}).\n"
                  "The same job runs with torchrun on this machine instead: one node, the same number of ranks.")
        return False


def launch(module: str, args: list[str], out: str | Path, nodes: int = 1, nproc_per_node: int = 1,
           profile: str | None = None, resume: bool = False, progress: bool = True, desc: str | None = None,
           script: str = "train_gpt.sbatch", timeout_s: float | None = None, memory_cap_gb: float | None = None,
           memory_estimate_gb: float | None = None) -> list[dict]:
    """Run ``python -m module --out OUT --no-progress *args`` on ``nodes`` x ``nproc_per_node`` ranks (see the
    module docstring for the steps); returns the records of ``out/metrics.jsonl``.

    ``profile``: the run profile the job's processes see (``LABS_PROFILE``; default this machine's). ``script``:
    the Slurm job script (it receives ``TRAIN_MODULE``, ``OUT``, ``NPROC_PER_NODE``; see slurm/train_gpt.sbatch).
    ``timeout_s``: stop the job (and raise) when it runs longer. ``memory_cap_gb`` (1e9 bytes) per rank, and the
    planner's ``memory_estimate_gb`` for its message: see the module docstring."""
    out = Path(out).resolve()
    world_size = nodes * nproc_per_node
    env = {"LABS_PROFILE": profile or default_profile_name(), **cap_environment(memory_cap_gb, memory_estimate_gb)}
    total = check(module, args, out, world_size, memory_cap_gb is not None)  # fails here, before a job exists
    fresh_run_dir(out, resume)
    label = desc or module.removeprefix("labs_lib.")
    if use_slurm():
        return _via_slurm(module, args, out, nodes, nproc_per_node, env, progress, label, script, total, timeout_s)
    return _via_torchrun(module, args, out, world_size, env, progress, label, total, timeout_s)


def _via_torchrun(module, args, out, world_size, env, progress, label, total, timeout_s) -> list[dict]:
    runner = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}"] if world_size > 1 else []
    cmd = [sys.executable, *runner, "-m", module, "--out", str(out), "--no-progress", *args]
    bar = tqdm(total=total, desc=f"{label} x{world_size}", unit="step", disable=not progress)
    try:
        run_child(cmd, out / LOG, lambda: show_steps(bar, read_metrics(out)), timeout_s, what=label,
                  env=env)  # what the job's processes read, as under Slurm
    finally:
        bar.close()
    return read_metrics(out)


def _via_slurm(module, args, out, nodes, nproc_per_node, env, progress, label, script, total,
               timeout_s) -> list[dict]:
    job = slurm.submit(script, *args, nodes=nodes, job_name=f"{label.split('.')[-1]}_{out.name}", output=out / LOG,
                       OUT=out, NPROC_PER_NODE=nproc_per_node, TRAIN_MODULE=module, LABS_ARGS_CHECKED="1",
                       **env)  # check() above ran the job script's own check on exactly these arguments
    print(f"submitted Slurm job {job.id}: {nodes} node(s) x {nproc_per_node} ranks of {module}; log {out / LOG}")
    bar = tqdm(total=total, desc=f"Slurm job {job.id}", unit="step", disable=not progress)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while job.state not in slurm.DONE_OK | slurm.DONE_BAD:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"Slurm job {job.id} ran past {timeout_s:.0f} s; its log: {out / LOG}\n"
                                   + "\n".join(read_log(out / LOG).splitlines()[-20:]))
            show_steps(bar, read_metrics(out))
            time.sleep(0.5)
        show_steps(bar, read_metrics(out))
    except BaseException:  # a notebook interrupt (or the timeout) cancels the job too
        job.cancel()
        raise
    finally:
        bar.close()
    job.wait(progress=False)  # raises JobFailed / JobCancelled with the log's first error and tail
    return read_metrics(out)


def train_gpt(out: str | Path, nodes: int = 2, nproc_per_node: int = 2, profile: str | None = None,
              resume: bool = False, progress: bool = True, memory_cap_gb: float | None = None,
              memory_estimate_gb: float | None = None, **settings) -> list[dict]:
    """Train the GPT (``python -m labs_lib.train``: the job module labs_lib.train.gpt) on ``nodes`` x
    ``nproc_per_node`` ranks; returns its metrics.

    Settings are the trainer's flags as keywords (``max_steps=100``, ``tp=2``, ``zero_stage=3``,
    ``measure_activations=True``, ...). ``resume=True`` continues from the checkpoint in ``out``; otherwise ``out``
    starts empty. ``memory_cap_gb`` / ``memory_estimate_gb``: a memory cap per rank (see :func:`launch`)."""
    return launch("labs_lib.train.gpt", settings_args(profile, resume, **settings), out, nodes, nproc_per_node,
                  profile=profile, resume=resume, progress=progress, desc="train", memory_cap_gb=memory_cap_gb,
                  memory_estimate_gb=memory_estimate_gb)


def train_deepspeed(out: str | Path, nodes: int = 1, nproc_per_node: int = 2, ds_config: str = "zero2.json",
                    profile: str | None = None, resume: bool = False, progress: bool = True,
                    **settings) -> list[dict]:
    """Train the GPT with DeepSpeed (``python -m labs_lib.train.deepspeed.gpt``); returns its metrics (with
    ``mem_rank<r>``). Settings as that trainer's flags (``max_steps=4``, ``bf16=True``, ...)."""
    args = settings_args(profile, resume, **settings) + ["--ds-config", str(ds_config)]
    return launch("labs_lib.train.deepspeed.gpt", args, out, nodes, nproc_per_node, profile=profile, resume=resume,
                  progress=progress, desc="deepspeed")

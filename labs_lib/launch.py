"""Start multi-process training from a notebook without running it inside the kernel.

Multi-process code never runs in the Jupyter kernel (spawn re-imports ``__main__``, pytorch#20375): the notebook
calls :func:`torchrun`, which checks the configuration first (a bad one fails here, before any process starts),
launches ``torchrun -m labs_lib.train`` as a child process, follows ``metrics.jsonl`` with a progress bar, and
raises :class:`LaunchError` with the log's tail if the job fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from labs_lib.config import ParallelConfig, validate


class LaunchError(RuntimeError):
    def __init__(self, message: str, returncode: int, log_tail: str):
        super().__init__(f"{message} (exit code {returncode})\n--- last lines of the log ---\n{log_tail}")
        self.returncode = returncode
        self.log_tail = log_tail


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
    """Parse and validate exactly what the training processes will see; raise ValueError naming the fix.

    Returns the (model, train) configs."""
    from labs_lib.train import build_parser, configs_from_args

    model_cfg, train_cfg = configs_from_args(build_parser().parse_args(args))
    validate(model_cfg, train_cfg, ParallelConfig(), world_size)
    return model_cfg, train_cfg


def tail(path: str | Path, n: int = 20) -> str:
    path = Path(path)
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def follow(process: subprocess.Popen, out: Path, total_steps: int | None, desc: str, progress: bool) -> int:
    """Wait for the process, advancing a progress bar as ``metrics.jsonl`` grows."""
    from labs_lib.train import read_metrics

    bar = tqdm(total=total_steps, desc=desc, unit="step", disable=not progress)
    while process.poll() is None:
        time.sleep(0.5)
        records = read_metrics(out)
        if records:
            bar.n = records[-1]["step"]
            bar.set_postfix(loss=f"{records[-1]['loss']:.3f}")
            bar.refresh()
    records = read_metrics(out)
    if records:
        bar.n = records[-1]["step"]
        bar.refresh()
    bar.close()
    return process.returncode


def torchrun(out: str | Path, nproc: int = 2, profile: str | None = None, resume: bool = False,
             progress: bool = True, **settings) -> list[dict]:
    """Train with ``nproc`` local processes (DDP); returns the run's metrics. Settings as in ``labs_lib.train``."""
    from labs_lib.train import read_metrics

    out = Path(out)
    args = train_args(out, profile, resume, **settings)
    _, train_cfg = check_training_config(args, nproc)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "train.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "labs_lib.train", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        process = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        try:
            code = follow(process, out, train_cfg.max_steps, f"torchrun x{nproc}", progress)
        except BaseException:  # a notebook interrupt stops the job too
            process.terminate()
            process.wait()
            raise
    if code != 0:
        raise LaunchError(f"training failed; full log: {log}", code, tail(log))
    return read_metrics(out)

"""Submit, follow, tail and cancel Slurm jobs from a notebook cell (or a script).

    from labs_lib.jobs import slurm
    slurm.ensure_local_cluster()          # a site Slurm if there is one, else starts slurm/local/up.sh
    job = slurm.submit("allreduce.sbatch")
    job.wait()                            # progress bar; ("COMPLETED", 0), or raises JobFailed with the log's tail
    print(job.tail())

    python -m labs_lib.jobs.slurm up | down | status

Environment variables for the job script are keyword arguments in capitals (``submit("train_gpt.sbatch",
NPROC_PER_NODE=2, OUT="build/runs/a")``); sbatch options are the lower-case keywords (``nodes=2``) or
``options=["--exclusive"]``. A job that ends CANCELLED makes :meth:`Job.wait` raise :class:`JobCancelled`, a kind of
:class:`JobFailed`: the cell that waited for a job's results stops instead of reading half-written files.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from labs_lib.core.paths import PROJECT_ROOT, build_dir
from labs_lib.jobs.process import failure_report

UP_SCRIPT = PROJECT_ROOT / "slurm" / "local" / "up.sh"
DOWN_SCRIPT = PROJECT_ROOT / "slurm" / "local" / "down.sh"
NOT_INSTALLABLE = 3  # up.sh's exit code when Slurm is absent and cannot be installed here

DONE_OK = {"COMPLETED"}
DONE_BAD = {"FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED", "CANCELLED",
            "REVOKED", "SPECIAL_EXIT"}


class SlurmUnavailable(RuntimeError):
    """Slurm is not installed and cannot be installed on this machine (use torchrun instead)."""


class JobFailed(RuntimeError):
    def __init__(self, job: Job, state: str, exit_code: int, log: str):
        super().__init__(f"Slurm job {job.id} ended {state} (exit code {exit_code}); log {job.log_path}\n"
                         + failure_report(log))
        self.job, self.state, self.exit_code = job, state, exit_code
        self.log_tail = "\n".join(log.splitlines()[-20:])


class JobCancelled(JobFailed):
    """The job was cancelled (scancel, or Slurm on the user's behalf)."""


def local_conf() -> Path:
    return build_dir() / "slurm" / "etc" / "slurm.conf"


def _run(*cmd: str, timeout: float = 30, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check, **kwargs)


def available() -> bool:
    """True when Slurm's commands are installed and a controller answers (SLURM_CONF or the site's config)."""
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return False
    try:
        return _run("sinfo", "-h", "-o", "%P", timeout=15).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _load_env_file() -> None:
    """Copy what build/slurm/env.sh exports (SLURM_CONF, PATH) into this process, for the client commands."""
    env_sh = build_dir() / "slurm" / "env.sh"
    out = _run("bash", "-c", 'source "$1" && printf "%s\\0%s" "$SLURM_CONF" "$PATH"', "_", str(env_sh),
               check=True).stdout
    os.environ["SLURM_CONF"], os.environ["PATH"] = out.split("\0")


def ensure_local_cluster(timeout: float = 600, quiet: bool = False) -> str:
    """Make sure a Slurm cluster answers; returns "site" (an existing Slurm) or "local" (slurm/local/up.sh).

    The local cluster is started (and on a fresh root machine installed) only when no other Slurm is configured.
    Raises :class:`SlurmUnavailable` when Slurm cannot be installed here: the labs then use torchrun.
    """
    ours = os.environ.get("SLURM_CONF") == str(local_conf())
    if not ours and available():
        return "site"
    if not quiet:
        print("the local Slurm cluster: slurm/local/up.sh starts what is not running (the first time it installs "
              "Slurm, ~10 s)")
    result = _run("bash", str(UP_SCRIPT), timeout=timeout)
    if result.returncode == NOT_INSTALLABLE:
        raise SlurmUnavailable(result.stderr.strip())
    if result.returncode != 0:
        raise RuntimeError(f"slurm/local/up.sh failed (exit code {result.returncode}):\n{result.stderr}")
    if not quiet:
        print(result.stderr.strip().splitlines()[-1])
    _load_env_file()
    return "local"


def _script_path(script: str | Path) -> Path:
    """A path as given, else the name inside the project's slurm/ folder (``submit("allreduce.sbatch")``)."""
    path = Path(script)
    if path.exists():
        return path.resolve()
    if (PROJECT_ROOT / "slurm" / path).exists():
        return PROJECT_ROOT / "slurm" / path
    raise FileNotFoundError(f"no job script {script} (looked in . and {PROJECT_ROOT / 'slurm'})")


def _arg(value) -> str:
    return str(value.resolve()) if isinstance(value, Path) else str(value)


def submit(script: str | Path, *args: str, nodes: int | None = None, ntasks_per_node: int | None = None,
           job_name: str | None = None, output: str | Path | None = None, time_limit: str | None = None,
           partition: str | None = None, gpus_per_node: int | None = None, cpus_per_task: int | None = None,
           options: list[str] | tuple[str, ...] = (), **env) -> Job:
    """``sbatch`` a job script with arguments ``args`` and environment variables ``env``; returns its :class:`Job`.

    The job inherits this process's environment plus ``env`` (sbatch's default ``--export=ALL``), and is submitted
    from the project root, so the scripts find the venv; ``Path`` arguments and values are made absolute first
    (relative strings mean relative to the project root). Its log goes to ``build/logs/<job name>-<job id>.out``
    unless ``output`` says otherwise. The ``SLURM_*`` variables of an enclosing job (JupyterLab started inside a
    Slurm allocation) are left out: they would leak that job's layout into this one's ``srun``.
    """
    bad = [k for k in env if not re.fullmatch(r"[A-Z_][A-Z0-9_]*", k)]
    if bad:
        raise TypeError(f"submit() got unknown option(s) {bad}: environment variables are upper case, sbatch options "
                        "are nodes=, ntasks_per_node=, job_name=, output=, time_limit=, partition=, gpus_per_node=, "
                        "cpus_per_task= or options=[...]")
    if output is None:
        (build_dir() / "logs").mkdir(parents=True, exist_ok=True)
        output = build_dir() / "logs" / "%x-%j.out"
    sbatch = ["sbatch", "--parsable", f"--output={_arg(output)}"]
    for flag, value in (("--nodes", nodes), ("--ntasks-per-node", ntasks_per_node), ("--job-name", job_name),
                        ("--time", time_limit), ("--partition", partition), ("--gpus-per-node", gpus_per_node),
                        ("--cpus-per-task", cpus_per_task)):
        if value is not None:
            sbatch.append(f"{flag}={value}")
    cwd = PROJECT_ROOT if (PROJECT_ROOT / "pyproject.toml").exists() else Path.cwd()
    job_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    job_env.update({k: _arg(v) for k, v in env.items()})
    result = _run(*sbatch, *options, str(_script_path(script)), *map(_arg, args), cwd=cwd, env=job_env)
    if result.returncode != 0:
        raise RuntimeError(f"sbatch refused the job: {result.stderr.strip()}")
    return Job(int(result.stdout.strip().split(";")[0]))


def _fields(text: str) -> dict[str, str]:
    """``Key=Value Key2=Value2`` (scontrol -o) as a dict; values never contain spaces in the fields we read."""
    return dict(tok.split("=", 1) for tok in text.split() if "=" in tok)


def _exit_code(value: str) -> int:
    """Slurm's ``code:signal`` as one shell-style number (128 + signal when killed by a signal)."""
    code, _, sig = value.partition(":")
    return int(code) if int(code or 0) else (128 + int(sig) if int(sig or 0) else 0)


class Job:
    """A submitted Slurm job: state, exit code, log, cancel, wait."""

    def __init__(self, job_id: int):
        self.id = job_id
        self._log_path: Path | None = None
        self._exit_code = 0

    def __repr__(self) -> str:
        return f"Job({self.id}, {self.state})"

    def _info(self) -> tuple[str, int]:
        """(state, exit code): scontrol while the controller remembers the job (MinJobAge), then the accounting."""
        result = _run("scontrol", "-o", "show", "job", str(self.id))
        if result.returncode == 0 and "JobState=" in result.stdout:
            f = _fields(result.stdout)
            if self._log_path is None and f.get("StdOut"):
                self._log_path = Path(f["StdOut"])
            return f["JobState"], _exit_code(f.get("ExitCode", "0:0"))
        return self._accounting()

    def _accounting(self) -> tuple[str, int]:
        """(state, exit code) of a finished job: ``sacct`` with slurmdbd, ``sacct -c`` with jobcomp/filetxt."""
        for sacct in (["sacct", "-X"], ["sacct", "-c"]):
            result = _run(*sacct, "-n", "-P", "-j", str(self.id), "-o", "JobID,State,ExitCode")
            rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith(f"{self.id}|")]
            if result.returncode == 0 and rows:
                _, state, code = rows[-1]
                return state.split()[0], _exit_code(code)  # "CANCELLED by 0" -> CANCELLED
        return "UNKNOWN", 0

    @property
    def state(self) -> str:
        """PENDING, RUNNING, COMPLETING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ... (UNKNOWN if Slurm forgot it)."""
        state, self._exit_code = self._info()
        return state

    @property
    def exit_code(self) -> int:
        self.state  # noqa: B018 - refreshes the exit code
        return self._exit_code

    @property
    def log_path(self) -> Path | None:
        if self._log_path is None:
            self._info()
        return self._log_path

    def log(self) -> str:
        """The job's log so far ("" before it has written any)."""
        path = self.log_path
        return path.read_text(errors="replace") if path is not None and path.exists() else ""

    def tail(self, n: int = 20) -> str:
        """The last ``n`` lines of the job's log ("" before it has written any)."""
        return "\n".join(self.log().splitlines()[-n:])

    def cancel(self) -> None:
        _run("scancel", str(self.id), check=True)

    def wait(self, timeout: float | None = None, progress: bool = True, poll_s: float = 1.0) -> tuple[str, int]:
        """Block until the job ends; returns ``(state, exit_code)`` for COMPLETED.

        Raises :class:`JobCancelled` if it was cancelled, :class:`JobFailed` for any other unhappy end (FAILED,
        TIMEOUT, NODE_FAIL, ...), both with the log's tail, and ``TimeoutError`` after ``timeout`` seconds (the job
        keeps running: cancel it if you no longer want it).
        """
        from tqdm.auto import tqdm

        start = time.monotonic()
        bar = tqdm(total=None, bar_format="{desc} [{elapsed}]", disable=not progress, file=sys.stdout)
        try:
            while True:
                state = self.state
                bar.set_description_str(f"Slurm job {self.id}: {state}")
                bar.update(0)
                if state in DONE_OK or state in DONE_BAD:
                    break
                if timeout is not None and time.monotonic() - start > timeout:
                    raise TimeoutError(f"Slurm job {self.id} still {state} after {timeout:g} s")
                time.sleep(poll_s)
        finally:
            bar.close()
        if state in DONE_OK:
            return state, self._exit_code
        error = JobCancelled if state == "CANCELLED" else JobFailed
        raise error(self, state, self._exit_code, self.log())


def status() -> str:
    """sinfo and squeue, as a shell would print them."""
    return _run("sinfo").stdout + "\n" + _run("squeue").stdout


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m labs_lib.jobs.slurm", description="The workshop's Slurm cluster.")
    parser.add_argument("command", choices=("up", "down", "status"),
                        help="up: a site Slurm or the local one (installs it as root); down: stop the local one")
    args = parser.parse_args(argv)
    if args.command == "down":
        raise SystemExit(subprocess.run(["bash", str(DOWN_SCRIPT)]).returncode)
    if args.command == "up":
        try:
            ensure_local_cluster()
        except SlurmUnavailable as e:
            raise SystemExit(f"{e}\nSlurm unavailable: the labs will use torchrun.") from None
        return
    if not available() and (build_dir() / "slurm" / "env.sh").exists():
        _load_env_file()  # the local cluster, if it runs
    if not available():
        raise SystemExit("no Slurm cluster answers (python -m labs_lib.jobs.slurm up starts the local one)")
    print(f"SLURM_CONF={os.environ.get('SLURM_CONF', '(site default)')}\n{status()}")


if __name__ == "__main__":
    main()

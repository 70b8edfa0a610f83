"""A job as a child process of this one: its log, its progress, its end, and a clear error when it fails.

    run_child(cmd, log_path, on_poll=lambda: ...)   # waits; an interrupt or a timeout stops the child too
    first_error(log_text), failure_report(log_text)  # the line that says what went wrong, and the log's tail

Every failure a learner sees carries the log's first error above its tail: a failing rank's message comes before
the launchers' reports of it (torchrun's ChildFailedError, srun's "task 0: Exited"), which fill the tail.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

# The line that says what went wrong: an exception, a C++ abort, a signal, an srun/sbatch error.
_ERROR_LINE = re.compile(r"\b[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b: |terminate called|Segmentation fault|"
                         r"\bKilled\b|out of memory|^(\d+: )?(srun|sbatch|slurmstepd): error:")


def first_error(log: str) -> str:
    """The first line of a job's log that says what went wrong ("" if none does). A failing rank's message comes
    before the launchers' reports of it (torchrun's ChildFailedError, srun's "task 0: Exited"), which fill the tail.
    An echoed command (a line starting ``$ ``) is not an error, whatever its arguments say."""
    return next((line for line in log.splitlines() if not line.startswith("$ ") and _ERROR_LINE.search(line)), "")


def failure_report(log: str, n: int = 20) -> str:
    """The log's first error (when the tail does not show it) and its last ``n`` lines, for an exception message."""
    lines = log.splitlines()
    tail, first = "\n".join(lines[-n:]), first_error(log)
    head = f"--- first error in the log ---\n{first}\n" if first and first not in lines[-n:] else ""
    return f"{head}--- last lines of the log ---\n{tail}"


class LaunchError(RuntimeError):
    def __init__(self, message: str, returncode: int, log: str):
        super().__init__(f"{message} (exit code {returncode})\n" + failure_report(log))
        self.returncode = returncode
        self.log_tail = "\n".join(log.splitlines()[-20:])


def read_log(path: str | Path) -> str:
    """A job's log ("" before it exists)."""
    path = Path(path)
    return path.read_text(errors="replace") if path.exists() else ""


def tail(path: str | Path, n: int = 20) -> str:
    return "\n".join(read_log(path).splitlines()[-n:])


def show_steps(bar, records: list[dict]) -> None:
    """Move a progress bar to the newest step of ``metrics.jsonl``'s records, with its loss (when it has one)."""
    if records:
        bar.n = records[-1]["step"]
        if "loss" in records[-1]:
            bar.set_postfix(loss=f"{records[-1]['loss']:.3f}")
        bar.refresh()


def run_child(cmd: list[str], log: Path, on_poll=lambda: None, timeout_s: float | None = None,
              what: str = "training", env: dict[str, str] | None = None) -> None:
    """Run ``cmd`` as a child process writing to ``log``, calling ``on_poll()`` as it runs (to move a progress bar).

    ``env``: variables added to this process's environment. A notebook interrupt, or running past ``timeout_s``,
    stops the child too; a failure raises :class:`LaunchError`
    with the exit code and the log's tail."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        process = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"})
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

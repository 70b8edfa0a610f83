"""TensorBoard: a run's metrics as event files, and the TensorBoard server that shows them with the profiler traces.

    make tensorboard                                   # every run under build/runs, on http://127.0.0.1:6006
    server = serve("build/runs"); server.url; server.stop()         # the same from a notebook (a free port)
    read_scalars("build/runs/lab02_trace")             # {tag: [(step, value), ...]} read back from the event files

Every trainer's loop (labs_lib.train.loop) writes each metrics record's numbers to ``<run>/tensorboard/`` on the main
rank as it appends them to metrics.jsonl: ``train/loss``, ``train/lr``, ``train/tokens_per_s``, ``val/loss``, ...
A resumed run purges the steps it trains again, as metrics.jsonl does. The profiler's traces
(``<run>/trace/rank<r>.*.pt.trace.json``, labs_lib.measure.trace) are what TensorBoard's PyTorch Profiler plugin
(torch-tb-profiler) reads: the same logdir shows both. The server binds 127.0.0.1 only; from a laptop, forward the
port (``ssh -L 6006:127.0.0.1:6006 <login node>``).
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

EVENTS = "tensorboard"  # the folder of a run's event files
# A record's field -> its tag; any other number keeps its name under train/ (the steps' own fields, e.g. bubble)
TAGS = {"loss": "train/loss", "val_loss": "val/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
        "step_time_s": "train/step_time_s"}
NOT_SCALARS = {"step", "elapsed_s"}


def scalars_of(record: dict) -> dict[str, float]:
    """The tags and values a metrics record shows in TensorBoard: its numbers (not the step, not per-rank dicts)."""
    return {TAGS.get(key, f"train/{key}"): float(value) for key, value in record.items()
            if key not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool)}


class ScalarLog:
    """Event files of a run's records, in ``<out>/tensorboard/``: ``add(record)`` per record, then ``close()``.
    ``start``: the step a resumed run continues after; TensorBoard drops the later steps of earlier files."""

    def __init__(self, out: str | Path, start: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(out) / EVENTS), purge_step=start + 1 if start else None)

    def add(self, record: dict) -> None:
        for tag, value in scalars_of(record).items():
            self.writer.add_scalar(tag, value, global_step=record["step"])
        self.writer.flush()  # a record a step: TensorBoard shows it now, and a killed run keeps it

    def close(self) -> None:
        self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_scalars(run: str | Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard reads from a run's event files: {tag: [(step, value), ...]} (a resumed run's purged steps
    left out, as TensorBoard leaves them out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(run) / EVENTS), purge_orphaned_data=True).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@dataclass
class Server:
    """A running TensorBoard; ``stop()`` ends it (also a context manager)."""

    process: subprocess.Popen
    url: str
    logdir: Path
    log: Path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(logdir: str | Path, port: int = 0, timeout_s: float = 60.0) -> Server:
    """Start TensorBoard on 127.0.0.1 over ``logdir`` (every run folder under it); returns once it answers.
    ``port`` 0: a free one. Its output goes to ``<logdir>/tensorboard.log``; a start that fails raises with it."""
    from labs_lib.core.dist import free_ports

    logdir = Path(logdir).resolve()
    logdir.mkdir(parents=True, exist_ok=True)
    port = port or free_ports(1)[0]
    log = logdir / "tensorboard.log"
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
           "--port", str(port), "--reload_interval", "2"]
    with open(log, "w") as sink:
        process = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(process, f"http://127.0.0.1:{port}", logdir, log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"TensorBoard exited ({process.returncode}): {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(server.url + "/data/environment", timeout=2).read()
            return server
        except OSError:
            time.sleep(0.5)
    server.stop()
    raise TimeoutError(f"TensorBoard did not answer on {server.url} within {timeout_s:.0f} s; see {log}")


def main(argv: list[str] | None = None) -> None:
    """``python -m labs_lib.measure.tensorboard [LOGDIR] [--port P]``: serve until interrupted (make tensorboard)."""
    import argparse

    from labs_lib.core.paths import runs_dir

    parser = argparse.ArgumentParser(prog="python -m labs_lib.measure.tensorboard", description=main.__doc__)
    parser.add_argument("logdir", nargs="?", default=None, help="default: the runs folder (build/runs)")
    parser.add_argument("--port", type=int, default=6006)
    args = parser.parse_args(argv)
    logdir = Path(args.logdir) if args.logdir else runs_dir()
    if not logdir.is_dir():
        sys.exit(f"no folder {logdir}: train something first (the labs write their runs there), or name a logdir")
    try:
        server = serve(logdir, args.port)
    except (RuntimeError, TimeoutError) as e:
        sys.exit(f"TensorBoard did not start: {str(e).strip().splitlines()[-1]} (port {args.port} in use? "
                 "make tensorboard TENSORBOARD_PORT=6007)")
    print(f"TensorBoard: {server.url}  (runs under {logdir}; Ctrl-C stops it)")
    try:
        server.process.wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()

"""Every lab notebook executed headless, in order, under one profile: executed copies and a timing table.

    python -m labs_lib.labs.run_all                       # the ci profile, into build/executed/
    python -m labs_lib.labs.run_all --profile gpu --only 01,05,11
    make run-all PROFILE=cpu

The jobs the notebooks launch write their runs into ``<out>/runs`` (unless LABS_RUNS_DIR says otherwise), so a
headless run never mixes with a learner's own. A notebook that fails is reported with its cell and the error's last
line, and the others still run; the command exits non-zero if any failed. ``<out>/timings.md`` (and ``.json``)
holds the table: wall time per notebook, stderr lines in its outputs, and whether it kept the ci budget (3 minutes
a notebook, 20 in all).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from labs_lib.core import paths
from labs_lib.core.runs import write_json
from labs_lib.core.tables import format_table

__all__ = ["BUDGET_S", "TOTAL_BUDGET_S", "run_notebook", "run_all", "stderr_lines", "main"]

BUDGET_S, TOTAL_BUDGET_S = 180, 20 * 60  # under the ci profile on a 2-core machine


def stderr_lines(nb) -> int:
    """Lines the executed notebook's cells wrote to stderr (warnings a learner would have to read past)."""
    return sum(o.get("text", "").count("\n") or 1 for c in nb.cells if c.cell_type == "code" for o in c.outputs
               if o.get("output_type") == "stream" and o.get("name") == "stderr")


def run_notebook(path: Path, out: Path, cell_timeout: int = 900) -> dict:
    """Execute one notebook in a fresh kernel from its own folder; write the executed copy into ``out``; a row."""
    import nbformat
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    # Local (ipc) sockets, not TCP ports: no "TCP without encryption" warning; in a short folder (a socket path has
    # ~100 characters at most, a repository's runtime folder may be deeper)
    sockets = tempfile.mkdtemp(prefix="labs-kernel-")
    kernel = KernelManager(kernel_name="python3", transport="ipc", ip=os.path.join(sockets, "k"))
    client = NotebookClient(nb, km=kernel, timeout=cell_timeout, resources={"metadata": {"path": str(path.parent)}})
    start, error = time.perf_counter(), ""
    try:
        client.execute()
    except CellExecutionError as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        error = lines[-1][:160] if lines else type(e).__name__
    except Exception as e:  # noqa: BLE001  (a dead kernel, a timeout: reported, the next notebook still runs)
        error = f"{type(e).__name__}: {e}"[:160]
    finally:
        if kernel.has_kernel:  # a kernel handed to the client is ours to stop
            kernel.shutdown_kernel(now=True)
        shutil.rmtree(sockets, ignore_errors=True)
    seconds = time.perf_counter() - start
    nbformat.write(nb, out / path.name)
    return {"notebook": path.name, "seconds": round(seconds, 1), "stderr lines": stderr_lines(nb),
            "result": "ok" if not error else f"failed: {error}"}


def run_all(profile: str = "ci", only: list[str] | None = None, out: str | Path | None = None,
            progress: bool = True) -> list[dict]:
    """Run the lab notebooks (``only``: their numbers) under ``profile``; the rows, also written to
    ``<out>/timings.md`` and ``.json``."""
    out = Path(out or paths.build_dir() / "executed")
    out.mkdir(parents=True, exist_ok=True)
    os.environ["LABS_PROFILE"] = profile
    os.environ.setdefault("LABS_RUNS_DIR", str(out / "runs"))
    notebooks = [(n, p) for n, _, p in paths.lab_notebooks() if not only or n in only]
    if only and len(notebooks) != len(set(only)):
        known = [n for n, _, _ in paths.lab_notebooks()]
        raise ValueError(f"no lab notebook numbered {sorted(set(only) - set(known))}: the labs are {known}")
    rows = []
    for _, path in notebooks:
        if progress:
            print(f"[{len(rows) + 1}/{len(notebooks)}] {path.name} ...", flush=True)
        row = run_notebook(path, out)
        over = profile == "ci" and row["seconds"] > BUDGET_S
        rows.append(dict(row, budget="over 3 min" if over else "ok" if profile == "ci" else "-"))
        if progress:
            print(f"    {row['seconds']:.0f} s, {row['result']}", flush=True)
    total = sum(r["seconds"] for r in rows)
    rows.append({"notebook": "total", "seconds": round(total, 1), "stderr lines": sum(r["stderr lines"] for r in rows),
                 "result": f"{sum(r['result'] == 'ok' for r in rows)}/{len(rows)} ok",
                 "budget": ("over 20 min" if total > TOTAL_BUDGET_S else "ok") if profile == "ci" else "-"})
    write_json(out / "timings.json", {"profile": profile, "rows": rows})
    (out / "timings.md").write_text(_markdown(rows, profile))
    return rows


def _markdown(rows: list[dict], profile: str) -> str:
    lines = [f"Profile `{profile}`, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores.", "",
             "| notebook | minutes | stderr lines | result | budget |", "|---|---|---|---|---|"]
    lines += [f"| {r['notebook']} | {r['seconds'] / 60:.1f} | {r['stderr lines']} | {r['result']} | {r['budget']} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m labs_lib.labs.run_all", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=os.environ.get("LABS_PROFILE", "ci"), choices=("ci", "cpu", "gpu"))
    parser.add_argument("--only", help="comma-separated lab numbers, e.g. 00,05,11 (default: every lab)")
    parser.add_argument("--out", help="where the executed copies and the table go (default build/executed/)")
    args = parser.parse_args(argv)
    only = [n.strip().zfill(2) for n in args.only.split(",")] if args.only else None
    try:
        rows = run_all(args.profile, only, args.out)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(format_table(rows))
    failed = [r["notebook"] for r in rows[:-1] if r["result"] != "ok"]
    if failed:
        print(f"failed: {', '.join(failed)} (their executed copies show the cell)", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()

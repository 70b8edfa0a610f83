"""Run every benchmark script, then write benchmarks/results/README.md with all result tables.

    make bench                              # = python benchmarks/run_all.py
    python benchmarks/run_all.py --only train_throughput
    python benchmarks/run_all.py --report   # only rebuild README.md from the saved JSON files
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_label  # noqa: E402

HERE = Path(__file__).resolve().parent
NOT_BENCHMARKS = {"run_all.py", "common.py"}


def scripts(only: list[str] | None) -> list[Path]:
    found = sorted(p for p in HERE.glob("*.py") if p.name not in NOT_BENCHMARKS)
    return [p for p in found if not only or p.stem in only]


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    cols = list(rows[0])

    def cell(v):
        return f"{v:,.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_report() -> Path:
    parts = ["# Benchmark results", "",
             "Written by `make bench` (`benchmarks/run_all.py`); each table names the machine it ran on. "
             "Numbers from different machines are not comparable.", ""]
    for path in sorted(RESULTS.glob("*.json")):
        result = json.loads(path.read_text())
        parts += [f"## {result.get('name', path.stem)}", "", f"Machine: {machine_label(result['machine'])}", ""]
        if result.get("description"):
            parts += [result["description"], ""]
        parts += [markdown_table(result["rows"]), ""]
        for name, rows in result.get("tables", {}).items():  # further tables of the same benchmark
            parts += [f"### {name}", "", markdown_table(rows), ""]
    report = RESULTS / "README.md"
    report.write_text("\n".join(parts))
    print(f"wrote {report}")
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", help="script names without .py")
    p.add_argument("--report", action="store_true", help="only rebuild README.md")
    args = p.parse_args()
    failed = []
    if not args.report:
        for script in scripts(args.only):
            print(f"\n=== {script.name} ===", flush=True)
            if subprocess.run([sys.executable, str(script)], cwd=HERE.parent).returncode != 0:
                failed.append(script.name)
    write_report()
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

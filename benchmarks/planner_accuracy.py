"""The planner against measurement on this machine: predicted per-rank memory and step time beside real runs.

    python benchmarks/planner_accuracy.py            # calibrate (unless saved), run six layouts, print and save

Calibrates the local cluster (labs_lib.planner.calibrate: all-reduce busbw within a node and across two, GEMM
FLOP/s and the GPT's step costs with every core busy) unless a calibration is saved (``--recalibrate`` measures
again), then runs each layout of labs_lib.planner.accuracy.CONFIGS as real jobs on the local Slurm cluster (DP,
ZeRO-2, full recompute, TP, PP, TP + SP) and prints predicted vs measured parameter, gradient, optimizer and
activation bytes (largest rank) and steady step time, with relative errors. The issue's bars: memory within 10 %,
step time within 30 %. Writes benchmarks/results/planner_accuracy.json and a predicted-vs-measured plot
(planner_accuracy.png).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import machine_info, save_results  # noqa: E402

from labs_lib.core import paths  # noqa: E402
from labs_lib.core.tables import format_table  # noqa: E402
from labs_lib.planner.accuracy import accuracy_rows  # noqa: E402
from labs_lib.planner.calibrate import calibrate, calibration_path  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recalibrate", action="store_true", help="measure the local cluster again first")
    p.add_argument("--steps", type=int, default=8, help="timed training steps per layout")
    a = p.parse_args()
    if a.recalibrate or not calibration_path().exists():
        calibrate(progress=False)
    rows = accuracy_rows(paths.runs_dir() / "bench_planner_accuracy", steps=a.steps)
    shown = [{k: v for k, v in r.items() if k == "plan" or "err" in k or "step ms" in k} for r in rows]
    print(format_table(shown, digits=3))
    info = machine_info()
    save_results("planner_accuracy", rows, description="labs_lib.planner's per-rank memory and step time predicted "
                 f"with the local preset vs measured by real jobs of the calibration GPT; {info['cores']} cores.")
    import matplotlib

    matplotlib.use("Agg")
    from labs_lib.labs.plots import plot_predicted_vs_measured

    ax = plot_predicted_vs_measured(rows, "step ms pred", "step ms meas", title="step time", unit="ms")
    ax.figure.savefig(ROOT / "benchmarks" / "results" / "planner_accuracy.png", dpi=100, bbox_inches="tight")


if __name__ == "__main__":
    main()

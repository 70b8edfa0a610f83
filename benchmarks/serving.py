"""Serving under load (lab 10): dynamic batching on and off, measured by our load generator and by perf_analyzer.

    .venv/bin/python benchmarks/serving.py                     # ~6 min on 2 cores
    .venv/bin/python benchmarks/serving.py --concurrencies 1 8 --duration 5

Lab 09's ci GPT (trained once through the one launcher, then reused from build/bench/serving/run) rendered twice
with decoupled=False (a whole answer per request): gpt with dynamic batching (max batch 8; queue delay 1 ms, the
repository's default, or --queue-delay-us) and without it (Triton executes each request alone). Each is served in
turn by a real tritonserver and measured at each concurrency by ``labs_lib.deploy.load.run_load`` (closed-loop
tritonclient gRPC clients for ``--duration`` s) and by perf_analyzer (time windows until three agree). The target:
on CPU, dynamic batching gives at least 2x the throughput of no batching at concurrency 8, for each tool. Writes
benchmarks/results/serving.json and serving.png.

Measured on 2 shared cores (2026-12-02): figures move by up to a third from run to run (other work on the machine);
one run met the target (3.2x / 2.6x), an earlier one did not (1.4x / 1.45x: no batching measured 23 requests/s
then, 17 in the run kept). At concurrency 8 with a 1 ms queue delay gpt's batches average 4, not 8: the clients
split into two groups that take turns (one generates while the other is in pre- / postprocessing). A longer delay
fills them (5 ms: 5.7, 20 ms: 8.0) at the price of latency when alone (20 ms: 57 -> 103 ms at concurrency 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, save_results  # noqa: E402

from labs_lib.core import paths  # noqa: E402
from labs_lib.core.tables import format_table  # noqa: E402
from labs_lib.deploy.load import compare_batching  # noqa: E402
from labs_lib.labs import lab09  # noqa: E402

TARGET_CONCURRENCY, TARGET_SPEEDUP = 8, 2.0


def trained_run(out: Path) -> Path:
    """Lab 09's ci GPT in ``out``: trained once, reused while its checkpoint is there."""
    if not (out / "checkpoints" / "latest").exists():
        lab09.train_base(out, profile="ci", progress=False)
    return out


def targets(rows: list[dict]) -> list[dict]:
    """Dynamic batching against none at TARGET_CONCURRENCY, one row per tool."""
    found = []
    for tool in dict.fromkeys(r["tool"] for r in rows):
        at = {r["batching"]: r["throughput"] for r in rows
              if r["tool"] == tool and r["concurrency"] == TARGET_CONCURRENCY}
        speedup = at["dynamic"] / at["off"]
        found.append({"target": f"dynamic batching >= {TARGET_SPEEDUP:g}x no batching, concurrency "
                                f"{TARGET_CONCURRENCY}, {tool}",
                      "reached": f"{speedup:.2f}x ({at['dynamic']:.1f} vs {at['off']:.1f} requests/s)",
                      "met": "yes" if speedup >= TARGET_SPEEDUP else "NO"})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrencies", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load-generator measurement")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--queue-delay-us", type=int, default=1000,
                        help="how long a request may wait in gpt's queue for others (the repository's default)")
    args = parser.parse_args()
    if TARGET_CONCURRENCY not in args.concurrencies:
        parser.error(f"--concurrencies must include {TARGET_CONCURRENCY}: the target is measured there")
    out = paths.build_dir() / "bench" / "serving"
    run = trained_run(out / "run")
    rows = compare_batching(run, args.concurrencies, out / "repositories", max_tokens=args.max_tokens,
                            duration_s=args.duration, max_queue_delay_microseconds=args.queue_delay_us)
    met = targets(rows)
    print(format_table(rows))
    print()
    print(format_table(met))
    import matplotlib

    matplotlib.use("Agg")
    from labs_lib.labs.plots import plot_serving_batching

    axes = plot_serving_batching(rows)
    axes[0].figure.savefig(RESULTS / "serving.png", dpi=100, bbox_inches="tight")
    save_results("serving", rows, tables={"targets": met}, threads=torch.get_num_threads(),
                 description=f"Lab 09's ci GPT served by tritonserver (python backend, decoupled=False), "
                             f"{args.max_tokens} new tokens per request (greedy), gpt with dynamic batching (max "
                             f"batch 8, queue delay {args.queue_delay_us} us) and without; tritonclient = "
                             f"labs_lib.deploy.load.run_load (closed-loop gRPC clients, {args.duration:g} s each), "
                             "perf_analyzer = tritonclient's binary (time windows until stable); mean batch = gpt's "
                             "requests / executions in that measurement; plot: serving.png.")


if __name__ == "__main__":
    main()

"""Serving under load (lab 10): dynamic batching on and off, measured by our load generator and by perf_analyzer;
then a mixed workload streamed with no batching, dynamic batching and in-flight batching (TensorRT-LLM's ideas).

    .venv/bin/python benchmarks/serving.py                     # ~9 min on 2 cores
    .venv/bin/python benchmarks/serving.py --concurrencies 1 8 --duration 5 --mixed-concurrencies 4 8

Lab 09's ci GPT (trained once through the one launcher, then reused from build/bench/serving/run) rendered twice
with decoupled=False (a whole answer per request): gpt with dynamic batching (max batch 8; queue delay 1 ms, the
repository's default, or --queue-delay-us) and without it (Triton executes each request alone). Each is served in
turn by a real tritonserver and measured at each concurrency by ``labs_lib.deploy.load.run_load`` (closed-loop
tritonclient gRPC clients for ``--duration`` s) and by perf_analyzer (time windows until three agree). The target:
on CPU, dynamic batching gives at least 2x the throughput of no batching at concurrency 8, for each tool. Writes
benchmarks/results/serving.json and serving.png.

Measured on 2 shared cores (2026-12-02): figures move by up to a third from run to run (other work on the machine);
one run met the target (3.2x / 2.6x), an earlier one did not (1.4x / 1.45x: no batching measured 23 requests/s
then, 17 in the run kept). On a quiet 2-core machine (2026-12-06, the run kept): 2.87x / 2.18x.
At concurrency 8 with a 1 ms queue delay gpt's batches average 4, not 8: the clients
split into two groups that take turns (one generates while the other is in pre- / postprocessing). A longer delay
fills them (5 ms: 5.7, 20 ms: 8.0) at the price of latency when alone (20 ms: 57 -> 103 ms at concurrency 1).

The mixed workload (labs_lib.deploy.mixed: prompts of a word to a few lines of code asking for 8 to 96 new tokens,
streamed over gRPC, decoupled repositories) at concurrency 4, 8, 16: requests/s, tokens/s, p50 / p99 latency and
time to first token for each mode, and KV memory (the in-flight pool's measured peak vs what the contiguous cache
reserves per batch). The target: in-flight batching beats dynamic batching in tokens/s at every concurrency. Table
"mixed" in serving.json, plot serving_mixed.png. Measured (2026-12-06, quiet 2 cores): in flight 1.35x / 2.07x /
2.43x dynamic batching's tokens/s at concurrency 4 / 8 / 16, time to first token 23 / 28 / 473 ms against 0.5 / 1.1
/ 3.0 s, at about half the KV bytes; dynamic batching is below no batching here (a static batch streams until its
longest request ends while the short ones' clients wait for their next turn).
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
from labs_lib.deploy.mixed import compare_mixed  # noqa: E402
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


def mixed_targets(rows: list[dict]) -> list[dict]:
    """In-flight against dynamic batching in tokens/s, one row per concurrency."""
    found = []
    for concurrency in dict.fromkeys(r["concurrency"] for r in rows):
        at = {r["batching"]: r for r in rows if r["concurrency"] == concurrency}
        ratio = at["inflight"]["tokens/s"] / at["dynamic"]["tokens/s"]
        found.append({"target": f"in-flight > dynamic batching in tokens/s, mixed workload, concurrency "
                                f"{concurrency}",
                      "reached": f"{ratio:.2f}x ({at['inflight']['tokens/s']:.0f} vs {at['dynamic']['tokens/s']:.0f}"
                                 f" tokens/s; TTFT p50 {at['inflight']['TTFT p50 ms']:.0f} vs "
                                 f"{at['dynamic']['TTFT p50 ms']:.0f} ms)",
                      "met": "yes" if ratio > 1 else "NO"})
    return found


def plot_mixed(rows: list[dict]):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, key in zip(axes, ("tokens/s", "TTFT p50 ms", "KV MB")):
        for mode in dict.fromkeys(r["batching"] for r in rows):
            mine = [r for r in rows if r["batching"] == mode]
            ax.plot([r["concurrency"] for r in mine], [r[key] for r in mine], marker="o", label=mode)
        ax.set_xlabel("concurrent clients")
        ax.set_title(key)
    axes[0].legend()
    fig.suptitle("mixed workload: no / dynamic / in-flight batching")
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrencies", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load-generator measurement")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--queue-delay-us", type=int, default=1000,
                        help="how long a request may wait in gpt's queue for others (the repository's default)")
    parser.add_argument("--mixed-concurrencies", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--mixed-duration", type=float, default=10.0, help="seconds per mixed-workload measurement")
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
    mixed = compare_mixed(run, args.mixed_concurrencies, out / "mixed", duration_s=args.mixed_duration,
                          queue_delay_us=args.queue_delay_us)
    met += mixed_targets(mixed)
    print(format_table(mixed))
    print()
    print(format_table(met))
    import matplotlib

    matplotlib.use("Agg")
    from labs_lib.labs.plots import plot_serving_batching

    axes = plot_serving_batching(rows)
    axes[0].figure.savefig(RESULTS / "serving.png", dpi=100, bbox_inches="tight")
    plot_mixed(mixed).savefig(RESULTS / "serving_mixed.png", dpi=100, bbox_inches="tight")
    save_results("serving", rows, tables={"targets": met, "mixed": mixed}, threads=torch.get_num_threads(),
                 description=f"Lab 09's ci GPT served by tritonserver (python backend, decoupled=False), "
                             f"{args.max_tokens} new tokens per request (greedy), gpt with dynamic batching (max "
                             f"batch 8, queue delay {args.queue_delay_us} us) and without; tritonclient = "
                             f"labs_lib.deploy.load.run_load (closed-loop gRPC clients, {args.duration:g} s each), "
                             "perf_analyzer = tritonclient's binary (time windows until stable); mean batch = gpt's "
                             "requests / executions in that measurement; plot: serving.png. Table mixed: the mixed "
                             f"workload streamed ({args.mixed_duration:g} s each), no / dynamic / in-flight batching "
                             "(labs_lib.deploy.mixed); plot: serving_mixed.png.")


if __name__ == "__main__":
    main()

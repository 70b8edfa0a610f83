"""Inference and model reduction (lab 09), measured side by side for the ci and cpu profiles, against the targets.

    .venv/bin/python benchmarks/inference.py                     # ci and cpu profiles, ~8 min on 2 cores
    .venv/bin/python benchmarks/inference.py --profiles ci

For each profile, the lab's GPT (labs_lib.labs.lab09.MODEL: trained through the one launcher) and:

1. the KV cache against recomputation (``GPT.generate``) for 256 new tokens, the same tokens (checked);
2. our cached generation against ``transformers``' ``generate`` on the HF export: the same weights, the same
   threads, a 128-token greedy generation, median of 10;
3. every reduction in one table: size in bytes, the course's latency (128 new tokens, median of 10), generated
   tokens/s at batch 1 and 8, validation perplexity: fp32, bf16, fp16, int8 weight-only (ours, per-channel
   scales), torch's dynamic int8, int4 weight-only (groups of 32), pruning (magnitude, heads, MLP channels) after
   a recovery fine-tune, and the half-size student distilled vs from scratch;
4. the targets, each with what was reached: cache >= 5x faster; ours at least as fast as transformers; int8 >= 3.5x
   smaller than fp32 with perplexity up <= 2%; the distilled student below the student from scratch.

Writes benchmarks/results/inference.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_results  # noqa: E402

from labs_lib.core import paths  # noqa: E402
from labs_lib.core.tables import format_table  # noqa: E402
from labs_lib.inference.generate import load_trained  # noqa: E402
from labs_lib.labs import lab09  # noqa: E402

PROMPT = "def main():\n    "


def profile_rows(profile: str, out: Path) -> tuple[list[dict], list[dict]]:
    """(the reduction table, the targets) of one profile."""
    run = lab09.train_base(out / "base", profile=profile, progress=False)
    model, tokenizer, _ = load_trained(run)
    data = lab09.run_data(run)
    prompt = tokenizer.encode(PROMPT).ids
    cache = lab09.cache_speedup(model, prompt, new_tokens=256)
    hf = lab09.hf_baseline(run, out / "hf", PROMPT)
    rows = lab09.quantization_rows(model, data, prompt)
    pruned, _ = lab09.pruning_rows(model, data, prompt, out / "prune", profile)
    rows += [r for r in pruned if "recovered" in r["variant"]]
    students = lab09.distillation(model, data, out / "distill", profile)
    rows += [lab09.measure(students["student"], "student (half size), distilled", data, prompt),
             lab09.measure(students["scratch"], "student (half size), from scratch", data, prompt)]
    by_name = {r["variant"]: r for r in rows}
    fp32, int8 = by_name["fp32"], by_name["int8 weight-only (ours)"]
    distilled, scratch = rows[-2]["perplexity"], rows[-1]["perplexity"]
    targets = [
        _target("KV cache vs recomputation, 256 new tokens", f"{cache['speedup']:.1f}x faster", cache["speedup"] >= 5),
        _target("ours vs transformers.generate, 128 tokens",
                f"{1e3 * hf['our_latency_s']:.0f} ms vs {1e3 * hf['hf_latency_s']:.0f} ms",
                hf["our_latency_s"] <= hf["hf_latency_s"]),
        _target("int8 weight-only: smaller than fp32", f"{fp32['MB'] / int8['MB']:.2f}x",
                fp32["MB"] / int8["MB"] >= 3.5),
        _target("int8 weight-only: perplexity change", f"{100 * (int8['perplexity'] / fp32['perplexity'] - 1):+.2f}%",
                int8["perplexity"] <= 1.02 * fp32["perplexity"]),
        _target("distilled student vs from scratch (perplexity)", f"{distilled:.1f} vs {scratch:.1f}",
                distilled < scratch),
    ]
    for r in rows + targets:
        r["profile"] = profile
    return rows, targets


def _target(name: str, reached: str, met: bool) -> dict:
    return {"target": name, "reached": reached, "met": "yes" if met else "NO"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", nargs="+", default=["ci", "cpu"])
    args = parser.parse_args()
    torch.manual_seed(0)
    rows, targets = [], []
    for profile in args.profiles:
        got, met = profile_rows(profile, paths.build_dir() / "bench" / "inference" / profile)
        rows += got
        targets += met
    print(format_table(rows))
    print()
    print(format_table(targets))
    save_results("inference", rows, tables={"targets": targets}, threads=torch.get_num_threads(),
                 description="Lab 09's GPT per profile: every reduction (size, 128-token latency median of 10, "
                             "tokens/s at batch 1 and 8, validation perplexity), and the targets below.")


if __name__ == "__main__":
    main()

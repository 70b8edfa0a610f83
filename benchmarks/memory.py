"""Memory saving, measured next to its formula: ZeRO's per-rank model states and activation checkpointing.

    .venv/bin/python benchmarks/memory.py                 # ~1-2 min on 2 cores; writes benchmarks/results/memory.json
    .venv/bin/python benchmarks/memory.py --worlds 2 --skip-deepspeed

1. **ZeRO, bytes per rank.** Jobs (labs_lib.jobs.launch) of the ci-profile GPT (N parameters), 2 steps on 2, 4 ranks:
   ``labs_lib.train.gpt --zero-stage S`` (ZeRO by hand: ``held_bytes`` after the step, ``mem_rank<r>`` in
   metrics.jsonl) and ``labs_lib.train.deepspeed.gpt --ds-config zeroS.json`` / ``zero2_offload.json`` (DeepSpeed
   0.19.8: the engine's own tensors, labs_lib.measure.memory.deepspeed_held_bytes; gradients right after backward at
   the accumulation boundary, before the step; weights and optimizer state after the step). Every rank's parameters,
   gradients and optimizer state next to its formula, within 1%: ZeRO by hand against the ZeRO paper's
   (labs_lib.estimates.memory.zero_bytes_per_rank; fp32 Adam: weights 4N, gradients 4N, Adam's m and v 8N; stage 1
   divides the optimizer state by the ranks R, stage 2 the gradients too, stage 3 the weights too), DeepSpeed against
   what its code allocates (labs_lib.estimates.deepspeed.deepspeed_bytes_per_rank, each term cited there), with the
   paper's formula printed beside it ("ZeRO paper MB"). What DeepSpeed adds: an fp32 master copy of its partition
   even when the model is fp32 (optimizer state 12N/R from stage 1 on), its partitions padded to a multiple of 2R
   elements, AdamW's 4-byte step counters, and -- the one large term -- at the step its ZeRO-1/2 gradients are one
   buffer holding the reduced gradients of every parameter that overlaps the rank's partition, whole (a parameter
   across a partition boundary sits in both ranks' buffers): 1.03-1.45 x 4N/R here, by rank, since the ci model's
   partition boundaries cut through 16k-element matrices. DeepSpeed's ZeRO-1 takes the same path as its ZeRO-2
   (stage_1_and_2.py, ``contiguous_gradients`` on by default): it also reduces the gradients at the boundary, keeps
   its partition and frees the rest, so at the step it holds what its ZeRO-2 holds, not the paper's ZeRO-1 (full 4N
   gradients). The difference is during backward: ZeRO-1 keeps every full gradient until backward ends, ZeRO-2 copies
   each into the reduce bucket (``reduce_bucket_size`` = 5e7 elements here, more than N: the whole model's gradients)
   as its hook fires; that backward-time bucket is freed before the step and is not in these rows. ZeRO-Offload's
   gradient partition is the fp32 master's ``.grad`` on the CPU: exactly 4N/R.

2. **Activations per layer.** labs_lib.measure.memory.ActivationMeter around one transformer block (fp32 and bf16
   autocast, no checkpointing, full, selective) next to labs_lib.estimates.memory.activation_bytes_formula:
   Korthikanti et al.'s sbh(34 + 5as/h) redone for this model (fp32 residual stream, no dropout masks at dropout=0,
   SDPA keeping a log-sum-exp instead of the s×s scores: 4a/h instead of 5as/h; derivation in that function's
   docstring). The 16-bit original is shown beside it for comparison, not as a target.

3. **Recompute overhead.** Median CPU time of a training step (forward, backward, AdamW) with / without
   checkpointing, alternating rounds in one process on one thread (the cpu profile's shape), as a ratio. Full
   recompute runs every block's forward twice: the ideal ratio is (1 + 2 + 1·blocks' share) / 3 ~ 4/3 of the compute.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_results  # noqa: E402

from labs_lib.core.config import CHECKPOINT_MODES, ZERO_STAGES, get_profile  # noqa: E402
from labs_lib.core.tables import format_table  # noqa: E402
from labs_lib.estimates.deepspeed import deepspeed_bytes_per_rank  # noqa: E402
from labs_lib.estimates.memory import (  # noqa: E402
    activation_bytes_formula,
    activation_bytes_per_layer,
    zero_bytes_per_rank,
)
from labs_lib.jobs.launch import launch  # noqa: E402
from labs_lib.measure.memory import ActivationMeter  # noqa: E402
from labs_lib.measure.throughput import checkpointing_step_seconds  # noqa: E402
from labs_lib.models.gpt import GPT  # noqa: E402
from labs_lib.parallel.recompute import apply_activation_checkpointing  # noqa: E402
from labs_lib.train.optim import param_groups  # noqa: E402

RUN_ARGS = ["--profile", "ci", "--max-steps", "2", "--warmup-steps", "1", "--eval-interval", "0",
            "--checkpoint-interval", "0", "--batch-size", "2"]


def _run(module: str, world: int, out: Path, extra: list[str]) -> dict:
    """The last metrics record of a 2-step ci-profile job on ``world`` ranks of one node (Slurm or torchrun)."""
    return launch(module, [*RUN_ARGS, *extra], out, nodes=1, nproc_per_node=world, profile="ci", progress=False,
                  desc=f"{module.removeprefix('labs_lib.')} x{world}")[-1]


def zero_rows(worlds: list[int], deepspeed: bool) -> list[dict]:
    model = GPT(get_profile("ci").model)
    n = model.num_params()
    groups = [[p.numel() for p in g["params"]] for g in param_groups(model, 0.1)]  # DeepSpeed's groups, in order
    runs = [("by hand", s) for s in ZERO_STAGES]
    if deepspeed:
        runs += [("deepspeed", s) for s in ZERO_STAGES] + [("deepspeed offload", 2)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            for impl, stage in runs:
                t0 = time.perf_counter()
                out = Path(tmp) / f"{impl.replace(' ', '_')}{world}_{stage}"
                if impl == "by hand":
                    record = _run("labs_lib.train.gpt", world, out, ["--zero-stage", str(stage)])
                    paper = zero_bytes_per_rank(n, world, stage)
                else:
                    config = "zero2_offload.json" if impl == "deepspeed offload" else f"zero{stage}.json"
                    record = _run("labs_lib.train.deepspeed.gpt", world, out, ["--ds-config", config])
                    paper = zero_bytes_per_rank(n, world, stage, bytes_per_param=(4, 4, 12 if stage else 8))
                for rank in range(world):
                    held = dict(record[f"mem_rank{rank}"])
                    held["optimizer"] += held.pop("master", 0)  # DeepSpeed: fp32 master partition + m + v
                    formula = paper if impl == "by hand" else deepspeed_bytes_per_rank(
                        groups, world, rank, stage, offload=impl == "deepspeed offload")
                    for part in ("params", "grads", "optimizer"):
                        rows.append({"impl": impl, "ranks": world, "stage": stage, "rank": rank, "part": part,
                                     "measured MB": held[part] / 1e6, "formula MB": formula[part] / 1e6,
                                     "ratio": round(held[part] / formula[part], 4),
                                     "ZeRO paper MB": paper[part] / 1e6,
                                     "measured / paper": round(held[part] / paper[part], 4)})
                print(f"  {impl:17} {world} ranks ZeRO-{stage}: {time.perf_counter() - t0:4.1f} s", flush=True)
    return rows


def activation_rows(profiles: list[str]) -> list[dict]:
    rows = []
    for name in profiles:
        cfg, batch = get_profile(name).model, get_profile(name).train.batch_size
        sbh = cfg.block_size * batch * cfg.n_embd
        for dtype in ("fp32", "bf16"):
            for mode in CHECKPOINT_MODES:
                torch.manual_seed(0)
                model = apply_activation_checkpointing(GPT(cfg), mode)
                x = torch.randn(batch, cfg.block_size, cfg.n_embd, requires_grad=True) * 1.0
                with ActivationMeter(model) as meter, torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bf16"):
                    model.blocks[0](x)
                formula = activation_bytes_formula(cfg, batch, dtype=dtype, mode=mode)
                korthikanti = {"none": activation_bytes_per_layer(cfg, batch), "full": 2 * sbh}.get(mode)
                rows.append({"profile": name, "s,b,h,a": f"{cfg.block_size},{batch},{cfg.n_embd},{cfg.n_head}",
                             "dtype": dtype, "checkpointing": mode, "measured MB": meter.bytes / 1e6,
                             "measured / sbh": round(meter.bytes / sbh, 3), "formula MB": formula / 1e6,
                             "ratio": round(meter.bytes / formula, 4),
                             "16-bit paper formula MB": korthikanti / 1e6 if korthikanti else "-"})
    return rows


def recompute_rows(profile: str, rounds: int, steps: int) -> list[dict]:
    """Step time per activation-checkpointing mode: labs_lib.measure.throughput.checkpointing_step_seconds (this
    process's CPU time on one thread: on a shared 2-core machine, OpenMP threads waiting for a busy core make wall
    times jump 5-10x)."""
    cfg, batch = get_profile(profile).model, get_profile(profile).train.batch_size
    seconds = checkpointing_step_seconds(cfg, batch, CHECKPOINT_MODES, rounds, steps)
    return [{"profile": profile, "threads": 1, "checkpointing": mode, "step CPU ms (median)": s * 1e3,
             "time ratio vs none": round(s / seconds["none"], 3)} for mode, s in seconds.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4], help="numbers of ranks for the ZeRO runs")
    p.add_argument("--skip-deepspeed", action="store_true")
    p.add_argument("--profiles", nargs="+", default=["ci", "cpu"], help="model shapes for the activation rows")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    t0 = time.perf_counter()
    print("ZeRO runs (labs_lib.jobs.launch: Slurm, else torchrun):", flush=True)
    zero = zero_rows(args.worlds, not args.skip_deepspeed)
    activations = activation_rows(args.profiles)
    print("recompute overhead (cpu profile):", flush=True)
    recompute = recompute_rows("cpu", args.rounds, args.steps)

    print(format_table(zero, 4))  # every rank: DeepSpeed's ZeRO-1/2 gradients differ by rank
    print(format_table(activations, 4))
    print(format_table(recompute, 3))
    bad = [r for r in zero if abs(r["ratio"] - 1) > 0.01] + [r for r in activations if abs(r["ratio"] - 1) > 0.10]
    summary = {"zero rows": len(zero), "zero rows off their formula by more than 1%": sum(abs(r["ratio"] - 1) > 0.01
                                                                                         for r in zero),
               "activation rows off by more than 10%": sum(abs(r["ratio"] - 1) > 0.10 for r in activations),
               "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(summary))
    tables = {"activation bytes per layer: ActivationMeter vs formula": activations,
              "recompute overhead: step time with / without checkpointing": recompute}
    save_results("memory", zero, tables=tables, summary=summary, description=(
        "Per-rank model-state bytes of ZeRO by hand (labs_lib.train.gpt --zero-stage) and DeepSpeed 0.19.8 "
        "(labs_lib.train.deepspeed.gpt, stages 0-3 and ZeRO-2 offload) at 2 and 4 ranks, every row within 1% of its "
        "formula: "
        "the ZeRO paper's (zero_bytes_per_rank, fp32 Adam) for ZeRO by hand, what DeepSpeed's code allocates for "
        "DeepSpeed (deepspeed_bytes_per_rank: fp32 master + m + v of a partition padded to 2R elements, "
        "AdamW step counters, and at the step ZeRO-1/2 gradients holding every parameter that overlaps the rank's "
        "partition whole; its ZeRO-1 frees non-partition gradients like its ZeRO-2), the paper's formula beside it; "
        "activation bytes per block (ActivationMeter) vs labs_lib.estimates.memory.activation_bytes_formula; step time "
        "with checkpointing / without. "
        "Details: benchmarks/memory.py's docstring."))
    if bad:
        raise SystemExit(f"{len(bad)} row(s) off their formula: {bad[:3]}")


if __name__ == "__main__":
    main()

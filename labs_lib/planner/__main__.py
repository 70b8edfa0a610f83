"""python -m labs_lib.planner: plan a GPT's training on a cluster, as a table or as JSON.

    python -m labs_lib.planner --model gpt3-175b --gpus 1024 --gpus-per-node 8 --gpu a100-80gb --dp 16 --tp 8 \\
        --pp 8 --zero 1 --micro-batch 1 --global-batch 1536 --recompute selective --sequence-parallel \\
        --precision bf16 --tokens 300e9 [--json]

A model is a preset (--model) or a shape (--layers --hidden --heads --vocab --seq, all five). Left out: --gpus and
--gpus-per-node come from the --gpu preset, --dp from gpus / (tp·pp), --global-batch is dp · micro-batch. Bad input
exits with status 2 and one line naming the fix.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from labs_lib.core.config import CHECKPOINT_MODES, DTYPES, ZERO_STAGES
from labs_lib.core.tables import format_table
from labs_lib.parallel.pipeline import SCHEDULES
from labs_lib.planner.plan import GB, KINDS, Estimate, ModelSpec, Plan, estimate
from labs_lib.planner.presets import CLUSTER_NAMES, cluster_preset, model_preset

SHAPE_FLAGS = ("layers", "hidden", "heads", "vocab", "seq")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m labs_lib.planner", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a model preset (labs_lib.planner.presets.MODELS), e.g. gpt3-175b")
    for flag in SHAPE_FLAGS:
        p.add_argument(f"--{flag}", type=int, help=f"model shape: {flag} (instead of --model)")
    p.add_argument("--kind", choices=KINDS, default="megatron", help="activation model of a --layers shape")
    p.add_argument("--gpu", default="a100-80gb", help=f"cluster preset: {', '.join(CLUSTER_NAMES)}")
    p.add_argument("--gpus", type=int, help="GPUs in the cluster (default: the preset's)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: the preset's)")
    p.add_argument("--dp", type=int, help="data-parallel ranks (default: gpus / (tp·pp))")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages")
    p.add_argument("--zero", type=int, default=0, choices=ZERO_STAGES, help="ZeRO stage")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch and rank")
    p.add_argument("--global-batch", type=int, help="sequences per optimizer step (default: dp · micro-batch)")
    p.add_argument("--recompute", default="none", choices=CHECKPOINT_MODES, help="activation recomputation")
    p.add_argument("--sequence-parallel", action="store_true", help="split LayerNorm / dropout activations (tp > 1)")
    p.add_argument("--precision", default="bf16", choices=DTYPES)
    p.add_argument("--offload", action="store_true", help="ZeRO-Offload: optimizer state on the host")
    p.add_argument("--schedule", default="1f1b", choices=SCHEDULES)
    p.add_argument("--chunks", type=int, default=1, help="virtual stages per pipeline rank (interleaved-1f1b)")
    p.add_argument("--tokens", type=float, help="token budget: how many days training takes")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    return p


def model_from_args(a: argparse.Namespace) -> ModelSpec:
    shape = {flag: getattr(a, flag) for flag in SHAPE_FLAGS if getattr(a, flag) is not None}
    if a.model and shape:
        raise ValueError(f"--model {a.model} and --{' --'.join(shape)} both name the model: pass one or the other")
    if a.model:
        return model_preset(a.model)
    missing = [f"--{flag}" for flag in SHAPE_FLAGS if flag not in shape]
    if missing:
        raise ValueError(f"no model: pass --model NAME, or the whole shape (missing {' '.join(missing)})")
    return ModelSpec("custom", kind=a.kind, **shape)


def plan_from_args(a: argparse.Namespace, gpus: int) -> Plan:
    dp = a.dp if a.dp is not None else max(1, gpus // (a.tp * a.pp))
    return Plan(dp=dp, tp=a.tp, pp=a.pp, zero=a.zero, micro_batch=a.micro_batch,
                global_batch=a.global_batch if a.global_batch is not None else dp * a.micro_batch,
                recompute=a.recompute, sequence_parallel=a.sequence_parallel, precision=a.precision,
                offload=a.offload, schedule=a.schedule, chunks=a.chunks)


def report(model: ModelSpec, est: Estimate) -> str:
    """The estimate as readable tables: memory per GPU, communication, time."""
    mem = est.memory_bytes
    memory = [{"per GPU": k, "GB": mem[k] / GB} for k in mem]
    comm = [{"collective": k, "GB per GPU": est.comm_bytes[k] / GB, "seconds": est.comm_time_s[k]}
            for k in est.comm_bytes]
    timing = [{"quantity": "compute s", "value": est.compute_time_s},
              {"quantity": "bubble s", "value": est.bubble_time_s},
              {"quantity": "step s", "value": est.step_time_s},
              {"quantity": "tokens/s", "value": est.tokens_per_s},
              {"quantity": "MFU %", "value": 100 * est.mfu},
              {"quantity": "HFU %", "value": 100 * est.hfu},
              {"quantity": "PFLOP per step (model)", "value": est.flops_per_step / 1e15}]
    if est.train_days is not None:
        timing.append({"quantity": "training days", "value": est.train_days})
    verdict = "fits" if est.fits else f"does NOT fit: {est.reason}"
    lines = [f"{model.name}: {model.params() / 1e9:.3f} B parameters; {verdict}",
             format_table(memory, digits=2) + f"\n(worst pipeline stage: {est.worst_stage})"]
    if comm:
        lines.append(format_table(comm, digits=3))
    lines.append(format_table(timing, digits=3))
    return "\n\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        model = model_from_args(a)
        cluster = cluster_preset(a.gpu)
        cluster = replace(cluster, gpus=cluster.gpus if a.gpus is None else a.gpus,
                          gpus_per_node=cluster.gpus_per_node if a.gpus_per_node is None else a.gpus_per_node)
        est = estimate(model, cluster, plan_from_args(a, cluster.gpus), tokens=a.tokens)
    except ValueError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(est.to_json(), indent=2) if a.json else report(model, est))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Auto-tuning for real: enumerate the plans, keep those that fit and are not dominated, try the best as jobs.

    plans = candidate_plans(model, cluster, global_batch=16)          # every layout the trainer can run
    ranked, dropped = rank_plans(model, cluster, plans)               # fits, not dominated, fastest first
    result = autotune(CALIBRATION_MODEL, cluster, global_batch=16, trials=3, out="build/runs/autotune")
    result.rows, result.best                                          # predicted beside measured; the winner

A plan is dropped when the planner says it does not fit (the reason is kept) or when another plan is predicted at
least as fast with no more memory per GPU (dominated: it cannot be the best choice whatever the memory cap). The
survivors are ranked by predicted tokens/s and the best ``trials`` of them run as short real training jobs of
``python -m labs_lib.train`` through the one launcher (Slurm when it answers). The winner is the fastest
*measured* trial: the planner narrows the search, measurement decides. A trial that fails (out of memory under a
cap, a crash) is recorded with its error and loses.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from pathlib import Path

from labs_lib.core.config import GPTConfig, divisors
from labs_lib.jobs.process import LaunchError
from labs_lib.jobs.slurm import JobFailed
from labs_lib.measure.throughput import steady_median
from labs_lib.planner.plan import ClusterSpec, Estimate, ModelSpec, Plan, check_plan, estimate

RECOMPUTE = ("none", "selective", "full")


def candidate_plans(model: ModelSpec, cluster: ClusterSpec, global_batch: int, precision: str = "fp32",
                    micro_batches: tuple[int, ...] | None = None, recompute: tuple[str, ...] = RECOMPUTE) -> list[Plan]:
    """Every plan over all of ``cluster``'s GPUs that labs_lib's trainer runs and the planner accepts: dp × tp × pp
    = gpus, ZeRO 0-3 on pure data parallelism (ZeRO by hand is data-parallel only), sequence parallelism with
    tp > 1, each micro-batch size dividing the per-replica batch, each recompute mode."""
    plans = []
    for tp, pp in itertools.product(divisors(cluster.gpus), repeat=2):
        if cluster.gpus % (tp * pp):
            continue
        dp = cluster.gpus // (tp * pp)
        if global_batch % dp:
            continue
        per_replica = global_batch // dp
        for mb in micro_batches or divisors(per_replica):
            if per_replica % mb:
                continue
            for zero, sp, mode in itertools.product((0, 1, 2, 3) if tp * pp == 1 else (0,),
                                                    (False, True) if tp > 1 else (False,), recompute):
                if zero and dp == 1:
                    continue  # ZeRO over one rank shards nothing
                plan = Plan(dp=dp, tp=tp, pp=pp, zero=zero, micro_batch=mb, global_batch=global_batch,
                            recompute=mode, sequence_parallel=sp, precision=precision)
                try:
                    check_plan(model, cluster, plan)
                except ValueError:
                    continue
                plans.append(plan)
    return plans


def rank_plans(model: ModelSpec, cluster: ClusterSpec, plans: list[Plan]
               ) -> tuple[list[tuple[Plan, Estimate]], list[tuple[Plan, str]]]:
    """(survivors fastest first, dropped with the reason): drop what does not fit, then what is dominated."""
    fitting, dropped = [], []
    for plan in plans:
        e = estimate(model, cluster, plan)
        (fitting.append((plan, e)) if e.fits else dropped.append((plan, e.reason)))
    survivors = []
    for plan, e in fitting:
        better = next((p for p, o in fitting if o is not e and o.tokens_per_s >= e.tokens_per_s
                       and o.memory_bytes["total"] <= e.memory_bytes["total"]
                       and (o.tokens_per_s, -o.memory_bytes["total"]) != (e.tokens_per_s, -e.memory_bytes["total"])),
                      None)
        if better is None:
            survivors.append((plan, e))
        else:
            dropped.append((plan, f"dominated by {describe(better)}: as fast or faster with no more memory"))
    survivors.sort(key=lambda pe: -pe[1].tokens_per_s)
    return survivors, dropped


def describe(plan: Plan) -> str:
    """A plan in one short line: dp2 tp2 pp1 zero0 mb4 recompute none (+ sp)."""
    return (f"dp{plan.dp} tp{plan.tp} pp{plan.pp} zero{plan.zero} mb{plan.micro_batch} recompute {plan.recompute}"
            + (" sp" if plan.sequence_parallel else ""))


def trainer_settings(plan: Plan) -> dict:
    """The plan as ``python -m labs_lib.train`` flags: per-rank micro-batch and accumulation on the data-parallel
    path; with pipeline stages, each replica's batch split into pipeline micro-batches instead."""
    per_replica = plan.global_batch // plan.dp
    settings = dict(tp=plan.tp, pp=plan.pp, zero_stage=plan.zero, activation_checkpointing=plan.recompute,
                    sequence_parallel=plan.sequence_parallel or None, dtype=plan.precision)
    if plan.pp > 1:
        settings.update(batch_size=per_replica, grad_accum=1, micro_batches=per_replica // plan.micro_batch)
    else:
        settings.update(batch_size=plan.micro_batch, grad_accum=per_replica // plan.micro_batch)
    return settings


@dataclass
class AutotuneResult:
    rows: list[dict]  # one per trial: the plan, predicted and measured tokens/s and memory, or its error
    dropped: list[tuple[Plan, str]] = field(default_factory=list)
    candidates: int = 0

    @property
    def best(self) -> dict | None:
        ran = [r for r in self.rows if r.get("measured tokens/s")]
        return max(ran, key=lambda r: r["measured tokens/s"]) if ran else None


def run_trial(plan: Plan, model_cfg: GPTConfig, out: Path, steps: int, nodes: int, progress: bool = False) -> float:
    """Measured steady tokens/s of ``steps`` real training steps of ``plan`` (a Slurm job or torchrun)."""
    from labs_lib.jobs.launch import train_gpt

    world = plan.dp * plan.tp * plan.pp
    model = dict(n_layer=model_cfg.n_layer, n_head=model_cfg.n_head, n_embd=model_cfg.n_embd)
    records = train_gpt(out, nodes=nodes if world % nodes == 0 else 1,
                        nproc_per_node=world // nodes if world % nodes == 0 else world, profile="ci",
                        progress=progress, max_steps=steps, eval_interval=0, checkpoint_interval=0,
                        warmup_steps=1, **model, **trainer_settings(plan))
    return steady_median(records, "tokens_per_s")


def autotune(model_cfg: GPTConfig, cluster: ClusterSpec, global_batch: int, out: str | Path, trials: int = 3,
             steps: int = 8, nodes: int = 2, precision: str = "fp32", progress: bool = True,
             **search) -> AutotuneResult:
    """Plan, prune, try the ``trials`` best predicted plans as real jobs, and return the table (see the module
    docstring). ``search``: candidate_plans' micro_batches / recompute to narrow the space."""
    model = ModelSpec.from_gpt_config(model_cfg, name="lab GPT")
    plans = candidate_plans(model, cluster, global_batch, precision, **search)
    ranked, dropped = rank_plans(model, cluster, plans)
    rows = []
    for i, (plan, predicted) in enumerate(ranked[:trials]):
        row = {"plan": describe(plan), **{k: v for k, v in asdict(plan).items() if k != "global_batch"},
               "predicted tokens/s": predicted.tokens_per_s,
               "predicted GB/rank": predicted.memory_bytes["total"] / 1e9}
        try:
            row["measured tokens/s"] = run_trial(plan, model_cfg, Path(out) / f"trial{i}", steps, nodes, progress)
        except (LaunchError, JobFailed) as e:
            row["error"] = str(e).splitlines()[0]
        rows.append(row)
    return AutotuneResult(rows, dropped, len(plans))

"""Lab 07 (auto-tuning): plan any GPT on any cluster on paper, see this machine's links, watch a plan that does not
fit fail under a memory cap and one that fits run, then auto-tune the small GPT for real.

    paper_plans()                          # GPT-3 175B on 1024 A100s: what fits, what it costs, how long it trains
    calibration()                          # this machine measured (labs_lib.planner.calibrate), the local preset
    accuracy(out)                          # the planner against real runs (labs_lib.planner.accuracy)
    capped_runs(out)                       # a plan under a memory cap: the one that does not fit fails, as on a GPU
    autotune_local(out)                    # labs_lib.planner.autotune on the local cluster
    check_train_days(answer), check_fitting_tp(answer), check_busbw(answer, ...)   # the exercises' checks

The engine: labs_lib.planner (plan, presets, calibrate, accuracy, autotune, deepspeed_autotune); the jobs are
``python -m labs_lib.train`` through labs_lib.jobs.launch.
"""

from __future__ import annotations

from pathlib import Path

from labs_lib.labs.checks import check
from labs_lib.measure.bandwidth import bus_bandwidth
from labs_lib.planner.calibrate import load_calibration
from labs_lib.planner.plan import Plan, estimate, narayanan_train_days
from labs_lib.planner.presets import cluster_preset, model_preset

__all__ = ["paper_plans", "calibration", "accuracy", "capped_runs", "autotune_local", "autotune_rows",
           "deepspeed_autotuner", "check_train_days", "fitting_tp", "check_fitting_tp", "check_busbw"]

# Narayanan et al. 2021, section 5.1: GPT-3 175B, 300B tokens, 1024 A100s at 140 TFLOP/s each.
GPT3_TOKENS, GPT3_GPUS, GPT3_ACHIEVED = 300e9, 1024, 140e12
GPT3_BATCH = 2048  # sequences per step (Megatron used 1536; 2048 divides over 1024 data-parallel ranks)


def paper_plans(gpu: str = "a100-80gb") -> list[dict]:
    """GPT-3 175B on 1024 GPUs under plans from naive to Megatron's: memory per GPU, fit, step time, MFU, days."""
    model, cluster = model_preset("gpt3-175b"), cluster_preset(gpu).with_gpus(GPT3_GPUS)
    plans = {
        "data parallel only": Plan(dp=1024, micro_batch=1, global_batch=GPT3_BATCH, precision="bf16"),
        "ZeRO-3 data parallel": Plan(dp=1024, zero=3, micro_batch=1, global_batch=GPT3_BATCH, precision="bf16"),
        "TP 8 x PP 16": Plan(dp=8, tp=8, pp=16, micro_batch=1, global_batch=GPT3_BATCH, precision="bf16"),
        "TP 8 x PP 16, SP, selective": Plan(dp=8, tp=8, pp=16, micro_batch=1, global_batch=GPT3_BATCH,
                                            sequence_parallel=True, recompute="selective", precision="bf16"),
    }
    rows = []
    for name, plan in plans.items():
        e = estimate(model, cluster, plan, tokens=GPT3_TOKENS)
        rows.append({"plan": name, "GB per GPU": e.memory_bytes["total"] / 1e9, "fits": e.fits,
                     "step s": e.step_time_s, "MFU %": 100 * e.mfu, "days": e.train_days,
                     "why not": e.reason[:60]})
    return rows


def calibration() -> dict:
    """This machine's calibration (measured now if none is saved): links, GEMM, step costs."""
    return load_calibration(measure_if_missing=True, progress=True)


def accuracy(out: str | Path) -> tuple[list[dict], str]:
    """(rows, where they come from): the planner against real runs of the six layouts of labs_lib.planner.accuracy,
    run now; under the ci profile (the notebook's time budget; the tests run all six) the table
    benchmarks/planner_accuracy.py recorded instead."""
    from labs_lib.core.config import default_profile_name
    from labs_lib.core.runs import read_json
    from labs_lib.planner.accuracy import accuracy_rows

    recorded = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "planner_accuracy.json"
    if default_profile_name() == "ci" and recorded.exists():
        saved = read_json(recorded)
        return saved["rows"], f"recorded by benchmarks/planner_accuracy.py on {saved['machine'].get('cpu', 'a CPU')}"
    return accuracy_rows(out, progress=True), "measured now"


def autotune_local(out: str | Path, trials: int = 3, steps: int = 6, global_batch: int = 16):
    """Auto-tune the calibration GPT over 4 ranks of the local cluster (2 nodes x 2): returns the AutotuneResult."""
    from labs_lib.planner.autotune import autotune
    from labs_lib.planner.calibrate import CALIBRATION_MODEL, local_cluster

    return autotune(CALIBRATION_MODEL, local_cluster().with_gpus(4), global_batch, out, trials=trials, steps=steps,
                    micro_batches=(2, 4), recompute=("none", "full"))


def autotune_rows(result) -> list[dict]:
    """The trials as a short table."""
    return [{"plan": r["plan"], "predicted tokens/s": r["predicted tokens/s"],
             "measured tokens/s": r.get("measured tokens/s", float("nan")),
             "predicted MB/rank": r["predicted GB/rank"] * 1e3, "error": r.get("error", "")} for r in result.rows]


# ------------------------------------------------------------------------------------------------ exercise checks

def check_train_days(answer) -> bool:
    """Exercise 1: GPT-3 175B's training time by Narayanan's 8·T·P / (n·X), in days."""
    expected = narayanan_train_days(GPT3_TOKENS, model_preset("gpt3-175b").params(), GPT3_GPUS, GPT3_ACHIEVED)
    return check("GPT-3 training days", answer, expected, rtol=0.02,
                 hint="8 × tokens × parameters / (GPUs × FLOP/s per GPU), then seconds → days (86,400 s).")


def fitting_tp(gpu: str = "a100-80gb", pp: int = 16) -> int:
    """The smallest tensor-parallel size with which GPT-3 175B fits at ``pp`` stages, SP and selective recompute."""
    model, cluster = model_preset("gpt3-175b"), cluster_preset(gpu).with_gpus(GPT3_GPUS)
    for tp in (1, 2, 4, 8):
        plan = Plan(dp=GPT3_GPUS // (tp * pp), tp=tp, pp=pp, micro_batch=1, global_batch=GPT3_BATCH,
                    sequence_parallel=tp > 1, recompute="selective", precision="bf16")
        if estimate(model, cluster, plan).fits:
            return tp
    raise ValueError(f"GPT-3 does not fit at pp={pp} with tp <= 8 on {gpu}")


def check_fitting_tp(answer) -> bool:
    """Exercise 2: the smallest tp that makes GPT-3 fit at pp = 16 (ask the planner, one tp at a time)."""
    return check("smallest fitting tp", answer, fitting_tp(), hint="try --tp 1, 2, 4, 8 with --pp 16 and read fits.")


def check_busbw(answer, algbw: float, world_size: int) -> bool:
    """Exercise 3: the bus bandwidth of an all-reduce whose algorithm bandwidth was ``algbw`` over ``world_size``."""
    return check("bus bandwidth", answer, bus_bandwidth(algbw, world_size), rtol=1e-3,
                 hint="nccl-tests: busbw = algbw × 2(n − 1)/n.")


# ------------------------------------------------------------------------------------ a memory cap plays the GPU
CAPPED_MODEL = dict(n_layer=8, n_head=8, n_embd=256)  # big enough that activations dwarf the cap's slack


def capped_plans() -> dict[str, Plan]:
    """Two plans of the same run on 2 ranks: no recompute (activations of 8 layers held) and full recompute."""
    return {"no recompute": Plan(dp=2, micro_batch=32, global_batch=64, precision="fp32"),
            "full recompute": Plan(dp=2, micro_batch=32, global_batch=64, recompute="full", precision="fp32")}


def capped_estimates() -> tuple[dict[str, float], float]:
    """({plan: the planner's bytes per rank}, a cap between the two): one plan fits under it, one does not."""
    from labs_lib.core.config import GPTConfig
    from labs_lib.planner.calibrate import CALIBRATION_MODEL, local_cluster
    from labs_lib.planner.plan import ModelSpec

    cfg = GPTConfig(**{**CALIBRATION_MODEL.to_dict(), **CAPPED_MODEL})
    model, cluster = ModelSpec.from_gpt_config(cfg, "capped GPT"), local_cluster().with_gpus(2)
    needs = {name: estimate(model, cluster, plan).memory_bytes["total"] for name, plan in capped_plans().items()}
    return needs, (min(needs.values()) * max(needs.values())) ** 0.5  # the geometric mean: clear of both


def capped_runs(out: str | Path, steps: int = 2) -> list[dict]:
    """Run both capped plans under the same cap per rank: the one the planner says does not fit must fail with an
    out-of-memory error naming the cap and the estimate, the other must run."""
    from labs_lib.jobs.launch import train_gpt
    from labs_lib.jobs.process import LaunchError
    from labs_lib.jobs.slurm import JobFailed
    from labs_lib.planner.autotune import trainer_settings

    needs, cap = capped_estimates()
    rows = []
    for name, plan in capped_plans().items():
        row = {"plan": name, "planner GB/rank": needs[name] / 1e9, "cap GB/rank": cap / 1e9,
               "planner says": "fits" if needs[name] <= cap else "does not fit"}
        try:
            train_gpt(Path(out) / name.replace(" ", "_"), nodes=2, nproc_per_node=1, profile="ci", progress=False,
                      max_steps=steps, eval_interval=0, checkpoint_interval=0, warmup_steps=1,
                      memory_cap_gb=cap / 1e9, memory_estimate_gb=needs[name] / 1e9, **CAPPED_MODEL,
                      **trainer_settings(plan))
            row["outcome"] = "ran"
        except (LaunchError, JobFailed) as e:
            row["outcome"] = next((line.strip() for line in str(e).splitlines() if "out of memory" in line),
                                  str(e).splitlines()[0])
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ DeepSpeed's autotuner
def deepspeed_autotuner(out: str | Path, ds_config: str | None = None) -> dict:
    """DeepSpeed's autotuner once on this machine as one node of 2 ranks (labs_lib.planner.deepspeed_autotune):
    its choice, its trial table (tokens/s beside ours) and a one-line summary; with a hostfile of the two simulated
    nodes it stops before any trial (no ssh / pdsh to them: see that module), which the lab states instead of
    running. ``ds_config``: the search space (default: ZeRO 0 and 1 x micro-batches 2 and 4, about 100 s here; the
    ci profile searches ZeRO 0 only, autotune_one_stage.json, about 55 s)."""
    from labs_lib.core.config import default_profile_name
    from labs_lib.planner.deepspeed_autotune import run_deepspeed_autotuner

    ds_config = ds_config or ("autotune_one_stage.json" if default_profile_name() == "ci" else "autotune.json")
    result = run_deepspeed_autotuner(out, ds_config=ds_config)
    best = result["best"]
    table = [{"experiment": r["experiment"], "ZeRO": r["zero_stage"], "micro-batch": r["micro_batch"],
              "grad accum": r["grad_accum"], "samples/s": r["throughput"], "tokens/s": r["tokens_per_s"]}
             for r in result["table"]]
    summary = (f"DeepSpeed chose {best['experiment']}: ZeRO-{best['zero_stage']}, micro-batch {best['micro_batch']}, "
               f"accumulation {best['grad_accum']} ({best['throughput']:.0f} samples/s) out of {len(table)} trials")
    return {"summary": summary, "table": table, "best": best, "command": result["command"]}

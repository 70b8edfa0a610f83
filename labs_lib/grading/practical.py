"""The assessment's practical part: real DeepSpeed jobs the learner configures, submitted through Slurm, graded from
their own outputs (metrics.jsonl with each rank's held bytes, config.json with the resolved DeepSpeed config).

    print(describe_jobs())                                    # the model and the job's size, for the learner
    ds = example_config("zero1.json"); job_model().n_layer      # starting points
    run = run_job("job_a", {"bf16": {"enabled": True}, ...}, activation_checkpointing=True)
    check_job_a(run, hidden=True)                              # AssertionError with a hint, else None

Every job: labs_lib.train.deepspeed.gpt on JOB_NODES nodes x JOB_RANKS_PER_NODE ranks through
labs_lib.jobs.launch (Slurm when it answers, torchrun otherwise), JOB_STEPS steps of the run profile's GPT, its run
folder ``runs/<name>`` beside the notebook. When nbgrader autogrades, the notebook runs again: the grade comes from
jobs the grader's machine ran, never from files a learner could have edited.
"""

from __future__ import annotations

from pathlib import Path

from labs_lib.core.config import GPTConfig, default_profile_name, get_profile
from labs_lib.core.runs import read_json, read_metrics, write_json
from labs_lib.estimates.memory import param_count
from labs_lib.jobs.launch import train_deepspeed
from labs_lib.train.deepspeed.config import load_ds_config

JOB_STEPS = 20
JOB_NODES, JOB_RANKS_PER_NODE = 2, 1
LOSS_DROP = 0.3  # nats the held-out loss must fall below the first step's loss: the job learned
JOB_SETTINGS = ("activation_checkpointing", "n_layer")  # the trainer flags the learner may set


def job_model(profile: str | None = None) -> GPTConfig:
    """The GPT the jobs train unless a setting changes it: the run profile's (LABS_PROFILE)."""
    return get_profile(profile or default_profile_name()).model


def example_config(name: str) -> dict:
    """One of the workshop's DeepSpeed configs (configs/deepspeed/<name>) as a dict, to start a job's config from."""
    return load_ds_config(name)


def describe_jobs(profile: str | None = None) -> str:
    """What the practical part's jobs train: the profile's GPT and the job's size."""
    p = get_profile(profile or default_profile_name())
    m = p.model
    return (f"profile {p.name!r}: a GPT of {m.n_layer} layers, n_embd {m.n_embd}, {m.n_head} heads, context "
            f"{m.block_size} ({param_count(m):,} parameters); each job trains {JOB_STEPS} steps on {JOB_NODES} nodes "
            f"x {JOB_RANKS_PER_NODE} rank(s), micro-batch {p.train.batch_size} per rank unless the config says")


def run_job(name: str, ds_config: dict, progress: bool = True, **settings) -> Path:
    """Train the GPT with the learner's DeepSpeed config (DeepSpeed's own keys; "auto" leaves a value to the trainer)
    and trainer settings (``activation_checkpointing=True``, ``n_layer=4``); returns the run folder. A config the
    trainer cannot run fails here, naming the fix, before any job is submitted."""
    if not isinstance(ds_config, dict):
        raise ValueError(f"{name}: the DeepSpeed config must be a dict of DeepSpeed's keys, got "
                         f"{type(ds_config).__name__}")
    unknown = sorted(set(settings) - set(JOB_SETTINGS))
    if unknown:
        raise ValueError(f"{name}: unknown setting(s) {unknown}: the jobs take {', '.join(JOB_SETTINGS)}; everything "
                         "else goes in the DeepSpeed config")
    runs = Path("runs").resolve()
    runs.mkdir(exist_ok=True)
    config_path = runs / f"{name}_ds_config.json"
    write_json(config_path, ds_config)
    out = runs / name
    train_deepspeed(out, nodes=JOB_NODES, nproc_per_node=JOB_RANKS_PER_NODE, ds_config=str(config_path),
                    max_steps=JOB_STEPS, eval_interval=JOB_STEPS, checkpoint_interval=JOB_STEPS, progress=progress,
                    **settings)
    return out


# ------------------------------------------------------------------------------------------------- reading a run
def _finished(run) -> tuple[dict, list[dict]]:
    run = Path(run)
    assert (run / "config.json").exists(), f"{run} holds no finished job: run the job's cell again"
    config, records = read_json(run / "config.json"), read_metrics(run)
    assert records and records[-1]["step"] == JOB_STEPS, f"{run.name}: the job did not finish its {JOB_STEPS} steps"
    world = JOB_NODES * JOB_RANKS_PER_NODE
    assert config.get("world_size") == world, \
        f"{run.name}: the job ran on {config.get('world_size')} ranks, not {world}"
    return config, records


def _zero(config: dict) -> dict:
    return config["deepspeed"].get("zero_optimization", {})


def _params(config: dict) -> int:
    return param_count(GPTConfig(**config["model"]))


def _check_learned(name: str, records: list[dict]) -> None:
    first, last = records[0]["loss"], records[-1].get("val_loss")
    assert last is not None, f"{name}: the job logged no held-out loss at its last step"
    assert last <= first - LOSS_DROP, f"{name}: the held-out loss fell from {first:.2f} to {last:.2f} only: the job " \
                                      "did not learn (look at the learning rate and the optimizer in your config)"


def _check_param_bytes(name: str, records: list[dict], want: float, what: str, rtol: float) -> None:
    for rank in range(JOB_NODES * JOB_RANKS_PER_NODE):
        held = records[-1][f"mem_rank{rank}"]["params"]
        assert abs(held - want) <= rtol * want, f"{name}: rank {rank} holds {held:,} bytes of weights: {what}"


# ------------------------------------------------------------------------------------------------------- job A
def check_job_a(run, hidden: bool = False) -> None:
    """Job A: ZeRO stage 1, bf16 weights, activation checkpointing; finished on every rank and learned."""
    config, records = _finished(run)
    if not hidden:
        return
    assert config["deepspeed"].get("bf16", {}).get("enabled") is True, "job_a: 16-bit (bf16) is not enabled"
    assert config["activation_checkpointing"] is True, "job_a: activation checkpointing is off"
    assert _zero(config).get("stage") == 1, "job_a: the ZeRO stage is not the one asked for"
    _check_param_bytes("job_a", records, 2 * _params(config), "ZeRO-1 keeps every weight, in 16 bits", rtol=0.01)
    _check_learned("job_a", records)


# ------------------------------------------------------------------------------------------------------- job B
def check_job_b_config(run, hidden: bool = False) -> None:
    """Job B's settings: ZeRO-3, the optimizer offloaded to the CPU, 2 micro-batches accumulated, twice the depth."""
    config, _ = _finished(run)
    if not hidden:
        return
    zero = _zero(config)
    assert zero.get("stage") == 3, "job_b: the ZeRO stage is not the one asked for"
    assert zero.get("offload_optimizer", {}).get("device") == "cpu", "job_b: the optimizer is not offloaded to the CPU"
    assert config["deepspeed"].get("gradient_accumulation_steps") == 2, \
        "job_b: DeepSpeed's gradient accumulation is not the one asked for"
    depth = job_model().n_layer  # job A's: the profile's model, as the jobs ran it
    assert config["model"]["n_layer"] == 2 * depth, f"job_b: {config['model']['n_layer']} layers is not twice job A's"


def check_job_b_outcome(run, hidden: bool = False) -> None:
    """Job B's outputs: each rank holds its share of the fp32 weights (ZeRO-3), every step saw 2 micro-batches per
    rank, and the deeper model learned."""
    config, records = _finished(run)
    if not hidden:
        return
    world = JOB_NODES * JOB_RANKS_PER_NODE
    _check_param_bytes("job_b", records, 4 * _params(config) / world,
                       "ZeRO-3 gives each rank its share of the weights", rtol=0.05)
    ds = config["deepspeed"]
    tokens = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
    tokens *= config["model"]["block_size"]
    assert records[0]["tokens"] == tokens, f"job_b: a step trained on {records[0]['tokens']} tokens, not the " \
                                           "micro-batches the config accumulates"
    _check_learned("job_b", records)

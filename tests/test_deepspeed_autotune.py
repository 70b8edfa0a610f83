"""DeepSpeed's own autotuner (labs_lib.planner.deepspeed_autotune): a real `deepspeed --autotuning tune` run on this
machine, its choice read back; with a hostfile of the local cluster's nodes, the documented stop."""

import json
import shutil

import pytest

from labs_lib.core.config import get_profile
from labs_lib.core.runs import read_json
from labs_lib.models.gpt import GPT
from labs_lib.planner.deepspeed_autotune import (
    RESULTS,
    AutotunerStopped,
    main,
    run_deepspeed_autotuner,
)
from labs_lib.train.deepspeed.config import load_ds_config

RANKS = 2
# ZeRO 0 x micro-batches 2 and 4: lab 07's ci space, two trials with different accumulation (the full autotune.json,
# ZeRO 0 and 1, takes 30 s longer; how the trainer runs each ZeRO stage is tests/test_deepspeed.py's)
SPACE = "autotune_one_stage.json"


def test_deepspeed_autotuner_picks_the_fastest_configuration_of_its_space(tmp_path, ci_data):
    result = run_deepspeed_autotuner(tmp_path / "ds", ds_config=SPACE, procs_per_node=RANKS, progress=False)
    space = load_ds_config(SPACE)
    stages, micro_batches = space["zero_optimization"]["stage"], space["train_micro_batch_size_per_gpu"]
    table = result["table"]
    assert sorted((row["zero_stage"], row["micro_batch"]) for row in table) == sorted(
        (stage, micro) for stage in stages for micro in micro_batches)
    assert all(row["throughput"] > 0 and row["trainer_tokens_per_s"] > 0 and not row["error"] for row in table)
    # One global batch for every trial: the accumulation makes up for the smaller micro-batches
    assert {row["micro_batch"] * row["grad_accum"] * RANKS for row in table} == {max(micro_batches) * RANKS}

    best = result["best"]
    assert best["throughput"] == max(row["throughput"] for row in table)
    assert (best["config"]["zero_optimization"]["stage"], best["config"]["train_micro_batch_size_per_gpu"]) == (
        best["zero_stage"], best["micro_batch"])
    assert "autotuning" not in best["config"]
    assert result["summary"][-1]["tuning_space"] == "global"

    # DeepSpeed's model-info experiment counted the workshop GPT's parameters
    assert result["model_info"]["num_params"] == GPT(get_profile("ci").model).num_params()
    # ... and every trial trained the trainer on the micro-batch, accumulation and stage DeepSpeed chose
    for row in table:
        run = read_json(tmp_path / "ds" / RESULTS / row["experiment"] / "run" / "config.json")
        assert (run["train"]["batch_size"], run["train"]["grad_accum"], run["world_size"]) == (
            row["micro_batch"], row["grad_accum"], RANKS)
        assert run["deepspeed"]["zero_optimization"]["stage"] == row["zero_stage"]
    assert "--autotuning tune --num_nodes 1 --num_gpus 2" in result["command"]


@pytest.mark.skipif(shutil.which("pdsh") is not None, reason="pdsh is installed: this machine may reach its hosts")
def test_a_hostfile_of_the_local_cluster_stops_at_the_first_experiment_for_want_of_ssh(tmp_path):
    # --no_ssh_check and --master_addr get the first launch through; the experiments it launches check ssh again
    with pytest.raises(AutotunerStopped) as stopped:
        run_deepspeed_autotuner(tmp_path / "ds", nodes=["node1", "node2"], procs_per_node=RANKS, progress=False,
                                launcher_args=("--no_ssh_check", "--master_addr", "127.0.0.1"))
    report = str(stopped.value)
    assert "its experiment profile_model_info failed" in report
    assert "--include node1:0,1@node2:0,1" in report  # the scheduler's relaunch: no --no_ssh_check in it
    assert "RuntimeError: Using hostfile at" in report and "host=node1 was not reachable via ssh" in report
    assert "scheduler.py run_experiment()" in report
    assert (tmp_path / "ds" / "hostfile").read_text() == f"node1 slots={RANKS}\nnode2 slots={RANKS}\n"


def test_bad_input_names_the_fix(tmp_path):
    no_tuning = tmp_path / "zero1.json"
    no_tuning.write_text(json.dumps(load_ds_config("zero1.json")))
    with pytest.raises(ValueError, match="autotuning"):
        run_deepspeed_autotuner(tmp_path / "a", ds_config=no_tuning, progress=False)
    with pytest.raises(ValueError, match="at least 1 rank"):
        run_deepspeed_autotuner(tmp_path / "b", procs_per_node=0, progress=False)
    # The training script refuses to run outside an autotuning experiment
    with pytest.raises(ValueError, match="deepspeed --autotuning tune"):
        main(["--deepspeed_config", str(no_tuning), "--profile", "ci"])

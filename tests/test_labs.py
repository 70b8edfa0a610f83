"""The notebooks' helpers (labs_lib.labs.common, lab00 ... lab04): what they compute and read back.

The notebooks themselves, jobs included, run in tests/test_notebooks.py."""

import json

import pytest
import torch

from labs_lib.core import checkpoint
from labs_lib.core.config import GPTConfig, get_profile
from labs_lib.estimates.memory import param_count
from labs_lib.labs import common, lab00, lab02, lab03, lab04
from labs_lib.measure.throughput import checkpointing_step_seconds


def records(losses: dict[int, float]) -> list[dict]:
    return [{"step": step, "loss": loss} for step, loss in losses.items()]


def test_print_setup_names_profile_shape_and_settings(capsys):
    profile = get_profile("ci")
    common.print_setup(profile)
    out = capsys.readouterr().out
    assert "'ci'" in out
    assert f"{param_count(profile.model):,} parameters" in out
    assert f"{profile.model.n_layer} layers" in out and f"{profile.train.max_steps} steps" in out


def test_loss_gaps_pair_steps_not_positions():
    run = records({1: 5.0, 2: 4.0, 3: 3.5})
    reference = records({2: 4.25, 3: 3.0, 4: 2.0})  # step 1 missing, step 4 extra
    assert common.loss_gaps(run, reference) == {2: 0.25, 3: 0.5}
    assert common.largest_loss_gap(run, reference) == 0.5
    assert common.largest_loss_gap(reference, run) == 0.5


def test_loss_gaps_without_common_steps_say_so():
    with pytest.raises(ValueError, match="no logged step in common"):
        common.loss_gaps(records({1: 1.0}), records({2: 1.0}))


def test_run_allreduce_runs_the_real_job_and_reads_its_result(tmp_path, monkeypatch):
    monkeypatch.setenv("LABS_LAUNCHER", "torchrun")  # the Slurm path is lab 00's notebook test
    result = lab00.run_allreduce(tmp_path / "ar")
    assert result["ok"] and result["world_size"] == 4 and result["sum"] == result["expected"] == 10.0
    assert sorted(r["rank"] for r in result["ranks"]) == [0, 1, 2, 3]


def test_top_operators(tmp_path):
    (tmp_path / "trace").mkdir()
    ops = [{"name": f"aten::op{i}", "calls": i, "self_ms": 1.5 * i, "total_ms": 2.0 * i, "flops": 2e9 * i}
           for i in range(20)]
    (tmp_path / "trace" / "ops_rank1.json").write_text(json.dumps(ops))
    rows = lab02.top_operators(tmp_path, rank=1, n=3)
    assert rows == [{"operator": f"aten::op{i}", "calls": i, "self ms": 1.5 * i, "GFLOP": 2.0 * i} for i in range(3)]



def test_held_rows_compare_each_part_and_fold_deepspeeds_master_into_the_optimizer():
    held = {"params": 400, "grads": 200, "optimizer": 300, "master": 100}
    runs = {2: [{"step": 1}, {"step": 2, "mem_rank0": held, "mem_rank1": held}]}
    rows = lab03.held_rows(runs, 2, lambda stage, rank: {"params": 400, "grads": 100, "optimizer": 400}, "ds")
    assert len(rows) == 2 * 3
    by_part = {r["part"]: r for r in rows if r["rank"] == 1}
    assert by_part["optimizer"]["measured MB"] == 400 / 1e6 and by_part["optimizer"]["ratio"] == 1.0
    assert by_part["grads"]["ratio"] == 2.0
    assert held["master"] == 100  # the records are left as they are


def test_accumulation_check_tells_right_wrong_and_unwritten():
    def right(model, x, y, m):
        for xm, ym in zip(x.chunk(m), y.chunk(m)):
            (model(xm, ym)[1] / m).backward()
        return 0.0

    def summed(model, x, y, m):  # forgets to divide by m
        for xm, ym in zip(x.chunk(m), y.chunk(m)):
            model(xm, ym)[1].backward()
        return 0.0

    assert lab03.accumulation_matches_big_batch(right) is True
    assert lab03.accumulation_matches_big_batch(summed) is False
    assert lab03.accumulation_matches_big_batch(lambda *args: ...) is None


def test_checkpointing_step_seconds_times_every_mode_and_restores_threads():
    cfg = GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16)
    threads = torch.get_num_threads()
    times = checkpointing_step_seconds(cfg, batch=2, rounds=2, steps=1)
    assert list(times) == ["none", "selective", "full"]
    assert all(t > 0 for t in times.values())
    assert torch.get_num_threads() == threads


def write_checkpoint(run, model, shards: dict[str, torch.nn.Module]):
    def adam_state(module):
        optimizer = torch.optim.AdamW(module.parameters())
        module(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        return optimizer.state_dict()

    tmp = checkpoint.begin(run / "checkpoints", 5)
    for name, shard in shards.items():
        checkpoint.write_optimizer_shard(tmp, name, adam_state(shard))
    checkpoint.write_main_state(tmp, model.state_dict(), adam_state(model), {"step": 5})
    checkpoint.commit(tmp, keep=1)


def test_params_held_counts_the_optimizer_state_of_a_run_or_a_shard(tmp_path):
    model = torch.nn.Linear(4, 6)  # 30 parameters
    write_checkpoint(tmp_path, model, {"pp0_tp1": torch.nn.Linear(4, 3, bias=False)})
    assert lab04.params_held(tmp_path) == 30
    assert lab04.params_held(tmp_path, "pp0_tp1") == 12
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        lab04.params_held(tmp_path / "missing")


def test_job_start_line_and_parallel_layout(tmp_path):
    (tmp_path / "job.log").write_text("job 7: 2 nodes x 2 ranks\n[0] step 1\n")
    (tmp_path / "config.json").write_text(json.dumps({"parallel": {"dp": 2, "tp": 2, "pp": 1}, "model": {}}))
    assert lab04.job_start_line(tmp_path) == "job 7: 2 nodes x 2 ranks"
    assert lab04.parallel_layout(tmp_path) == {"dp": 2, "tp": 2, "pp": 1}

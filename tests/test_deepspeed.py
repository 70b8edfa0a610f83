"""labs_lib.train.deepspeed.gpt: DeepSpeed ZeRO 0/1/2/3 and ZeRO-Offload against python -m labs_lib.train (torch DDP).

Every run is 2 gloo ranks under torchrun, ci profile (dropout 0), fp32, 8 steps, the same global batch (2 x 8
sequences). The configs copy python -m labs_lib.train's optimizer (AdamW, betas (0.9, 0.95), weight decay 0.1 on
matrices only, clipping 1.0), so the losses agree step for step: measured within 5e-7 of DDP for every stage and for
the offload config (DeepSpeedCPUAdam's own AVX kernel instead of torch's AdamW) on a 2-core CPU.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from labs_lib.core.checkpoint import complete_checkpoints
from labs_lib.core.config import get_profile, override
from labs_lib.core.runs import read_metrics
from labs_lib.estimates.deepspeed import deepspeed_bytes_per_rank
from labs_lib.models.gpt import GPT
from labs_lib.train.deepspeed import config as ds_config
from labs_lib.train.deepspeed import gpt as ds_train
from labs_lib.train.optim import param_groups

from conftest import REPO, run_train

STEPS = 8
CONFIGS = REPO / "configs" / "deepspeed"
STAGES = ("zero0", "zero1", "zero2", "zero3")
TOLERANCE = 1e-5  # fp32: only the summation order of the reductions differs (measured <= 5e-7)


def ds_cmd(out: Path, config: str, *args: str, nproc: int = 2) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [*(launcher if nproc > 1 else [sys.executable]), "-m", "labs_lib.train.deepspeed.gpt", "--profile", "ci",
            "--out", str(out), "--ds-config", str(CONFIGS / config), "--no-progress", *args]


def run_ds(out: Path, config: str, *args: str, nproc: int = 2, check: bool = True):
    result = subprocess.run(ds_cmd(out, config, *args, nproc=nproc), capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"ds_train failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


def losses(out: Path) -> torch.Tensor:
    return torch.tensor([r["loss"] for r in read_metrics(out)], dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ fast: no processes
@pytest.mark.parametrize("name", [*STAGES, "zero2_offload"])
def test_configs_copy_labs_lib_train_optimizer(name):
    ds = json.loads((CONFIGS / f"{name}.json").read_text())
    cfg = get_profile("ci").train
    params = ds["optimizer"]["params"]
    assert ds["optimizer"]["type"] == "AdamW"
    assert params["betas"] == [cfg.beta1, cfg.beta2] and params["weight_decay"] == cfg.weight_decay
    assert ds["gradient_clipping"] == cfg.grad_clip == 1.0
    assert ds["bf16"]["enabled"] is False and "fp16" not in ds
    assert ds["train_micro_batch_size_per_gpu"] == ds["gradient_accumulation_steps"] == "auto"
    ds_config.check_ds_config(ds)
    # torch's AdamW (bit-for-bit python -m labs_lib.train's) everywhere but offload, which needs DeepSpeedCPUAdam
    assert params.get("torch_adam", False) == ("offload" not in name)


def test_auto_values_resolved_from_the_run():
    cfg = override(get_profile("ci").train, dtype="bf16")
    ds = ds_train.resolved_ds_config(ds_config.load_ds_config("zero2.json"), cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == cfg.batch_size and ds["gradient_accumulation_steps"] == 1
    assert ds["train_batch_size"] == cfg.batch_size * 4
    assert ds["optimizer"]["params"]["lr"] == cfg.lr and ds["bf16"]["enabled"] is True
    with pytest.raises(ValueError, match="'auto'"):
        ds_config.resolve_ds_config({"zero_optimization": {"stage": "auto"}}, 1, micro_batch=8)
    with pytest.raises(ValueError, match=r"\['gradient_accumulation_steps'\] are 'auto'"):
        ds_config.resolve_ds_config(ds_config.load_ds_config("zero2.json"), 1, micro_batch=8, lr=1e-3)


def test_check_args_counts_the_steps(tmp_path):
    assert ds_train.check_args(["--out", str(tmp_path), "--profile", "ci", "--max-steps", "7"], world_size=2) == 7
    with pytest.raises(ValueError, match="bad arguments"):
        ds_train.check_args(["--out", str(tmp_path), "--no-such-flag"], world_size=2)


def test_deepspeed_formula_counts_whole_boundary_parameters_and_padding():
    """ZeRO-1/2 gradients at the step: every parameter overlapping the rank's partition, whole, plus the zeros that
    pad the last partition (the group padded to a multiple of 2R elements); offload: exactly the partition."""
    # one group of 10 + 6 elements on 4 ranks: padded to 16, partitions of 4: [0,4) [4,8) [8,12) [12,16)
    grads = [deepspeed_bytes_per_rank([[10, 6]], 4, r, 2)["grads"] // 4 for r in range(4)]
    assert grads == [10, 10, 16, 6]
    # 5 elements on 2 ranks: padded to 8, rank 1 owns [4,8): the 5-element parameter whole + 3 zeros of padding
    assert [deepspeed_bytes_per_rank([[5]], 2, r, 1)["grads"] // 4 for r in (0, 1)] == [5, 8]
    assert deepspeed_bytes_per_rank([[5]], 2, 1, 2, offload=True)["grads"] == 4 * 4
    # master + m + v of the padded partition, plus AdamW's 4-byte step per flat group (none for DeepSpeedCPUAdam)
    assert deepspeed_bytes_per_rank([[5], [3]], 2, 0, 1)["optimizer"] == 12 * (4 + 2) + 4 * 2
    assert deepspeed_bytes_per_rank([[5], [3]], 2, 0, 1, offload=True)["optimizer"] == 12 * (4 + 2)
    z3 = deepspeed_bytes_per_rank([[5], [3]], 2, 0, 3)  # each parameter padded to a multiple of R, split
    assert (z3["params"], z3["grads"], z3["optimizer"]) == (4 * 5, 4 * 5, 12 * 5 + 4 * 2)
    z0 = deepspeed_bytes_per_rank([[5], [3]], 2, 0, 0)
    assert (z0["params"], z0["grads"], z0["optimizer"]) == (4 * 8, 4 * 8, 8 * 8 + 4 * 2)


def bad_config(tmp_path, **changes) -> Path:
    ds = json.loads((CONFIGS / "zero2.json").read_text()) | changes
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(ds))
    return path


@pytest.mark.parametrize("changes, message", [
    (dict(fp16={"enabled": True}), "fp16 needs a CUDA GPU"),
    (dict(zero_optimization={"stage": 4}), "stage=4 does not exist: use 0, 1, 2 or 3"),
    (dict(zero_optimization={"stage": 0, "offload_optimizer": {"device": "cpu"}}), "needs ZeRO stage 1, 2 or 3"),
    (dict(zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}}), "remove \"torch_adam\""),
    (dict(scheduler={"type": "WarmupLR"}), "remove the \"scheduler\" section"),
])
def test_bad_config_is_a_clear_error(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        ds_train.check_args(["--out", str(tmp_path), "--ds-config", str(bad_config(tmp_path, **changes))],
                            world_size=2)


def test_gpu_only_settings_are_checked_for_the_device():
    ds = ds_config.load_ds_config("zero2_offload.json")
    ds["zero_optimization"]["offload_optimizer"]["pin_memory"] = True
    with pytest.raises(ValueError, match="pin_memory needs CUDA"):
        ds_config.check_ds_config(ds, device_type="cpu")
    ds_config.check_ds_config(ds, device_type="cuda")
    both = ds_config.load_ds_config("zero2.json") | {"fp16": {"enabled": True}, "bf16": {"enabled": True}}
    with pytest.raises(ValueError, match="fp16 and bf16 are both enabled"):
        ds_config.check_ds_config(both, device_type="cuda")


def test_fp16_on_cpu_fails_before_deepspeed_starts(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("fp16 is fine on a GPU")
    start = time.monotonic()
    result = run_ds(tmp_path / "run", str(bad_config(tmp_path, fp16={"enabled": True})), nproc=1, check=False)
    assert result.returncode != 0
    assert "invalid configuration: fp16 needs a CUDA GPU" in result.stderr and "--bf16" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()
    assert time.monotonic() - start < 30


# --------------------------------------------------------------------------------------- slow: real 2-rank trainings
@pytest.fixture(scope="module")
def runs(ci_data, tmp_path_factory):
    """Each run once per module, on demand: runs["zero2"] trains it (2 ranks) and returns its folder."""
    subprocess.run([sys.executable, "-m", "labs_lib.train.deepspeed.setup"], check=True, capture_output=True,
                   timeout=600, env=dict(os.environ, TORCH_EXTENSIONS_DIR=os.environ.get(
                       "TORCH_EXTENSIONS_DIR", str(REPO / "build" / "torch_extensions"))))
    root = tmp_path_factory.mktemp("deepspeed")

    class Runs(dict):
        def __missing__(self, name):
            out = root / name
            if name == "ddp":
                run_train(out, nproc=2, max_steps=STEPS)
            else:
                run_ds(out, f"{name}.json", "--max-steps", str(STEPS))
            self[name] = out
            return out

    return Runs()


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_zero_stage_matches_ddp(runs, stage):
    ours, ddp = losses(runs[stage]), losses(runs["ddp"])
    assert len(ours) == len(ddp) == STEPS
    assert torch.allclose(ours, ddp, rtol=0, atol=TOLERANCE), (ours - ddp).abs().max()
    assert ours[-1] < ours[0] - 0.3, "the loss must fall"
    records = read_metrics(runs[stage])
    assert set(records[0]) >= {"step", "loss", "lr", "tokens_per_s", "step_time_s", "mem_rank0", "mem_rank1"}
    assert [r["lr"] for r in records] == [r["lr"] for r in read_metrics(runs["ddp"])]  # labs_lib.train.optim.lr_at


@pytest.mark.slow
def test_offload_trains_and_matches(runs):
    ours, ddp = losses(runs["zero2_offload"]), losses(runs["ddp"])
    assert ours[-1] < ours[0] - 0.3, "the loss must fall"
    # DeepSpeedCPUAdam is another implementation of the same update (its own vectorised C++ loop): same tolerance
    assert torch.allclose(ours, ddp, rtol=0, atol=TOLERANCE), (ours - ddp).abs().max()


@pytest.mark.slow
def test_zero_ranks_hold_what_deepspeed_allocates(runs):
    """Every rank's parameters, gradients (after backward at the boundary) and optimizer state (fp32 master + Adam's
    moments) within 1% of deepspeed_bytes_per_rank, for each stage and ZeRO-Offload; and the ZeRO story
    itself: ZeRO-1/2/3 halve the optimizer state on 2 ranks, ZeRO-2 the gradients (about), ZeRO-3 the weights."""
    model = GPT(get_profile("ci").model)
    n = model.num_params()
    groups = [[p.numel() for p in g["params"]] for g in param_groups(model, 0.1)]
    mem = {s: read_metrics(runs[s])[-1] for s in (*STAGES, "zero2_offload")}
    for name, record in mem.items():
        stage, offload = int(name[4]), name.endswith("offload")
        for rank in (0, 1):
            held = dict(record[f"mem_rank{rank}"])
            held["optimizer"] += held.pop("master")
            formula = deepspeed_bytes_per_rank(groups, 2, rank, stage, offload=offload)
            for part in ("params", "grads", "optimizer"):
                assert held[part] == pytest.approx(formula[part], rel=0.01), (name, rank, part, held, formula)
    zero0 = mem["zero0"]["mem_rank0"]
    assert zero0["optimizer"] == pytest.approx(8 * n, rel=1e-3) and zero0["params"] == 4 * n
    for rank in (0, 1):
        for name in ("zero1", "zero2", "zero3", "zero2_offload"):
            held = mem[name][f"mem_rank{rank}"]
            assert held["optimizer"] == pytest.approx(zero0["optimizer"] / 2, rel=0.01), (name, rank, held)
        assert mem["zero3"][f"mem_rank{rank}"]["params"] == pytest.approx(zero0["params"] / 2, rel=0.01)
        assert mem["zero2"][f"mem_rank{rank}"]["grads"] < 0.7 * zero0["grads"]


@pytest.mark.slow
def test_activation_checkpointing_same_losses(runs, tmp_path):
    run_ds(tmp_path / "ckpt", "zero2.json", "--max-steps", str(STEPS), "--activation-checkpointing")
    assert torch.allclose(losses(tmp_path / "ckpt"), losses(runs["zero2"]), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_resume_continues_the_run(runs, tmp_path):
    """Half the steps, then --resume to the end (same schedule length): the losses of the straight run."""
    out = tmp_path / "resumed"
    run_ds(out, "zero2.json", "--max-steps", str(STEPS // 2), "--lr-decay-steps", str(STEPS),
           "--checkpoint-interval", "1", "--keep-checkpoints", "2")
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS // 2:06d}"
    kept = complete_checkpoints(out / "checkpoints")  # DeepSpeed's tag folders, complete once meta.json is in
    assert [p.name for p in kept] == [f"step_{s:06d}" for s in (STEPS // 2 - 1, STEPS // 2)]
    run_ds(out, "zero2.json", "--max-steps", str(STEPS), "--resume")
    assert [r["step"] for r in read_metrics(out)] == list(range(1, STEPS + 1))
    assert torch.allclose(losses(out), losses(runs["zero2"]), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- through Slurm
@pytest.fixture(scope="module")
def cluster():
    from labs_lib.jobs import slurm

    try:
        return slurm.ensure_local_cluster(quiet=True)
    except slurm.SlurmUnavailable as e:
        if not slurm.available():
            pytest.skip(f"Slurm unavailable: {e}")
        return "site"


@pytest.mark.slow
@pytest.mark.slurm
def test_deepspeed_through_slurm(cluster, ci_data, tmp_path):
    """TRAIN_MODULE=labs_lib.train.deepspeed.gpt sbatch slurm/train_gpt.sbatch: ZeRO-3 on 2 nodes x 2 ranks."""
    from labs_lib.jobs import slurm

    out = tmp_path / "slurm_zero3"
    job = slurm.submit("train_gpt.sbatch", "--ds-config", "configs/deepspeed/zero3.json", "--max-steps", str(STEPS),
                       OUT=out, TRAIN_MODULE="labs_lib.train.deepspeed.gpt")
    job.wait(timeout=600, progress=False)
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records[-1]["loss"] < records[0]["loss"] - 0.3
    assert json.loads((out / "config.json").read_text())["world_size"] == 4
    assert {f"mem_rank{r}" for r in range(4)} <= set(records[-1])
    assert "labs_lib.train.deepspeed.gpt" in job.log_path.read_text()


@pytest.mark.slow
@pytest.mark.slurm
def test_bad_deepspeed_config_fails_fast_in_slurm(cluster, tmp_path):
    from labs_lib.jobs import slurm

    start = time.monotonic()
    job = slurm.submit("train_gpt.sbatch", "--ds-config", str(bad_config(tmp_path, fp16={"enabled": True})),
                       OUT=tmp_path / "bad", TRAIN_MODULE="labs_lib.train.deepspeed.gpt")
    with pytest.raises(slurm.JobFailed) as failed:
        job.wait(timeout=120, progress=False)
    assert time.monotonic() - start < 60
    assert "invalid configuration: fp16 needs a CUDA GPU" in failed.value.log_tail

"""Training end to end with real processes: DDP equals one process, a killed run resumes exactly."""

import json
import subprocess
import sys

import pytest
import torch

from labs_lib.core import checkpoint
from labs_lib.core.config import TrainConfig
from labs_lib.core.runs import read_metrics
from labs_lib.train.optim import lr_at

from conftest import run_train, train_cmd

pytestmark = pytest.mark.slow


# Bit-for-bit comparisons of one-process runs use one thread: MKL picks its threads dynamically (MKL_DYNAMIC), so
# under load two runs of 2 threads can split a matmul differently and round differently (a CI run saw it once).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def losses(out):
    return torch.tensor([r["loss"] for r in read_metrics(out)], dtype=torch.float64)


def final_weights(out):
    return checkpoint.load_model_state(checkpoint.latest_checkpoint(out / "checkpoints"))


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(1, cfg) == pytest.approx(0.1)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(11, cfg) == pytest.approx(1.0)
    assert lr_at(61, cfg) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(111, cfg) == pytest.approx(0.1)
    assert lr_at(500, cfg) == pytest.approx(0.1)


def test_single_process_run(tmp_path, ci_data):
    out = tmp_path / "run"
    run_train(out, max_steps=40, checkpoint_interval=10, keep_checkpoints=2, eval_interval=20)
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, 41))
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm"} <= set(records[0])
    assert "val_loss" in records[19] and "val_loss" in records[39]
    assert records[-1]["loss"] < records[0]["loss"] - 0.5, "the loss must fall"
    kept = [p.name for p in checkpoint.complete_checkpoints(out / "checkpoints")]
    assert kept == ["step_000030", "step_000040"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000040"
    assert (out / "tokenizer.json").exists() and json.loads((out / "config.json").read_text())["world_size"] == 1

    sample = subprocess.run([sys.executable, "-m", "labs_lib.generate", "--checkpoint", str(out),
                             "--prompt", "def ", "--max-new-tokens", "20"], capture_output=True, text=True,
                            timeout=120, check=True)
    assert sample.stdout.startswith("def ") and "step 40" in sample.stderr


def test_ddp_matches_single_process(tmp_path, ci_data):
    """2 ranks x batch 4 and 1 rank x batch 4 x 2 accumulation see the same global batch as 1 rank x batch 8."""
    steps = dict(max_steps=8, eval_interval=0, checkpoint_interval=0)
    run_train(tmp_path / "one", batch_size=8, **steps)
    run_train(tmp_path / "ddp", nproc=2, batch_size=4, **steps)
    run_train(tmp_path / "accum", batch_size=4, grad_accum=2, **steps)
    run_train(tmp_path / "ddp_accum", nproc=2, batch_size=2, grad_accum=2, **steps)
    reference = losses(tmp_path / "one")
    ref_weights = final_weights(tmp_path / "one")
    for name in ("ddp", "accum", "ddp_accum"):
        torch.testing.assert_close(losses(tmp_path / name), reference, rtol=1e-5, atol=1e-5, msg=name)
        weights = final_weights(tmp_path / name)
        for key, value in ref_weights.items():
            torch.testing.assert_close(weights[key], value, rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")


def test_killed_run_resumes_exactly(tmp_path, ci_data):
    """20 steps straight vs. SIGKILL after step 13 (checkpoint at 10), then --resume to 20: identical."""
    settings = dict(max_steps=20, checkpoint_interval=5, eval_interval=0, dropout=0.1)
    run_train(tmp_path / "straight", env=ONE_THREAD, **settings)

    out = tmp_path / "killed"
    killed = run_train(out, check=False, env={**ONE_THREAD, "LABS_FAULT_KILL_AFTER_STEP": "13"}, **settings)
    assert killed.returncode == -9
    assert checkpoint.latest_checkpoint(out / "checkpoints").name == "step_000010"
    assert read_metrics(out)[-1]["step"] == 13
    run_train(out, resume=True, env=ONE_THREAD, **settings)

    assert [r["step"] for r in read_metrics(out)] == list(range(1, 21))
    assert torch.equal(losses(out), losses(tmp_path / "straight"))
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(out)
    assert all(torch.equal(resumed[k], v) for k, v in straight.items())


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, ci_data):
    settings = dict(max_steps=10, checkpoint_interval=5, eval_interval=0)
    run_train(tmp_path / "straight", env=ONE_THREAD, **settings)
    out = tmp_path / "run"
    killed = run_train(out, check=False, env={**ONE_THREAD, "LABS_FAULT_KILL_IN_CHECKPOINT": "10"}, **settings)
    assert killed.returncode == -9
    assert (out / "checkpoints" / "step_000010.tmp").exists()  # the half-written one
    assert checkpoint.latest_checkpoint(out / "checkpoints").name == "step_000005"
    run_train(out, resume=True, env=ONE_THREAD, **settings)
    assert torch.equal(losses(out), losses(tmp_path / "straight"))
    assert not (out / "checkpoints" / "step_000010.tmp").exists()


def test_ddp_run_resumes(tmp_path, ci_data):
    settings = dict(max_steps=12, lr_decay_steps=12, checkpoint_interval=6, eval_interval=0, batch_size=4)
    run_train(tmp_path / "straight", nproc=2, **settings)
    out = tmp_path / "run"
    first = subprocess.run(train_cmd(out, 2, "ci", **dict(settings, max_steps=6)), capture_output=True, timeout=300)
    assert first.returncode == 0
    run_train(out, nproc=2, resume=True, **settings)
    torch.testing.assert_close(losses(out), losses(tmp_path / "straight"), rtol=0, atol=1e-6)

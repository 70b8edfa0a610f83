"""Memory saving: activation checkpointing (labs_lib.parallel.recompute) changes what is kept, not what is computed;
ZeRO by hand through the real CLI under torchrun logs the losses of DDP and holds the bytes the ZeRO formulas
predict."""

import json
import os
import subprocess
import sys

import pytest
import torch

from labs_lib.core import checkpoint
from labs_lib.core.config import GPTConfig, TrainConfig, get_profile, validate
from labs_lib.core.runs import read_metrics
from labs_lib.estimates.memory import activation_bytes_formula, zero_bytes_per_rank
from labs_lib.measure.memory import ActivationMeter
from labs_lib.models.gpt import GPT
from labs_lib.parallel.recompute import CHECKPOINT_MODES, apply_activation_checkpointing
from labs_lib.train.cli import check_args

from conftest import run_train, train_cmd

CFG = GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=64)  # the ci profile's shape
BATCH = 4


def _train_in_process(mode: str, steps: int = 3, dropout: float = 0.0):
    """Losses of a few AdamW steps and the first step's gradients, one process, fp32."""
    torch.manual_seed(0)
    model = apply_activation_checkpointing(GPT(GPTConfig(**{**CFG.to_dict(), "dropout": dropout})), mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(1)
    losses, grads = [], None
    for step in range(steps):
        x = torch.randint(0, CFG.vocab_size, (BATCH, CFG.block_size), generator=data)
        loss = model(x, x.roll(-1, 1))[1]
        loss.backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64), grads


def _block_bytes(mode: str, dtype: str) -> int:
    torch.manual_seed(0)
    model = apply_activation_checkpointing(GPT(CFG), mode)
    x = torch.randn(BATCH, CFG.block_size, CFG.n_embd, requires_grad=True) * 1.0
    with ActivationMeter(model) as meter, torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bf16"):
        model.blocks[0](x)
    return meter.bytes


def test_checkpointing_same_losses_and_gradients():
    reference, ref_grads = _train_in_process("none", dropout=0.1)
    for mode in ("full", "selective"):
        losses, grads = _train_in_process(mode, dropout=0.1)  # the recompute replays the same dropout masks
        torch.testing.assert_close(losses, reference, rtol=0, atol=1e-6, msg=mode)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=0, atol=1e-6, msg=f"{mode}: {name}")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_checkpointing_keeps_less_and_matches_the_formula(dtype):
    kept = {mode: _block_bytes(mode, dtype) for mode in CHECKPOINT_MODES}
    assert kept["full"] < kept["selective"] < kept["none"], kept
    for mode, measured in kept.items():
        assert measured == activation_bytes_formula(CFG, BATCH, dtype=dtype, mode=mode), (mode, measured)
    sbh = BATCH * CFG.block_size * CFG.n_embd
    assert kept["full"] == 4 * sbh  # the block's fp32 input, whatever the compute dtype


def test_checkpointing_errors():
    with pytest.raises(ValueError, match="choose one of none, full, selective"):
        apply_activation_checkpointing(GPT(CFG), "some")
    model = apply_activation_checkpointing(GPT(CFG), "full")
    with pytest.raises(ValueError, match="apply it once"):
        apply_activation_checkpointing(model, "selective")
    with pytest.raises(ValueError, match="activation_checkpointing 'half' does not exist"):
        validate(CFG, TrainConfig(activation_checkpointing="half", tokenizer_vocab=512))


def test_zero_with_tensor_or_pipeline_parallelism_fails_before_spawning():
    args = ["--out", "x", "--profile", "ci", "--zero-stage", "2"]
    with pytest.raises(ValueError, match="drop --tp/--pp, or use --zero-stage 0"):
        check_args(args + ["--tp", "2"], 2)
    with pytest.raises(ValueError, match="drop --tp/--pp, or use --zero-stage 0"):
        check_args(args + ["--pp", "2"], 2)
    with pytest.raises(ValueError, match="launch 2 or more"):
        check_args(args, 1)
    with pytest.raises(ValueError, match="use --dtype bf16"):
        check_args(args + ["--dtype", "fp16"], 2)
    check_args(args, 2)  # fine on 2 data-parallel ranks
    result = subprocess.run([sys.executable, "-m", "labs_lib.train", *args, "--tp", "2"], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "WORLD_SIZE": "2"})
    assert result.returncode != 0 and "invalid configuration" in result.stderr and "--zero-stage 0" in result.stderr


# ------------------------------------------------------------------------------- ZeRO through the CLI, under torchrun
STEPS = dict(max_steps=6, eval_interval=3, checkpoint_interval=0, batch_size=4)


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory, ci_data):
    """2 ranks, 6 steps: DDP (stage 0) and ZeRO-1/2/3 by hand."""
    root = tmp_path_factory.mktemp("zero")
    for stage in (0, 1, 2, 3):
        run_train(root / f"zero{stage}", nproc=2, zero_stage=stage, **STEPS)
    return root


def _losses(out, key="loss"):
    return torch.tensor([r[key] for r in read_metrics(out) if key in r], dtype=torch.float64)


def _weights(out):
    return checkpoint.load_model_state(checkpoint.latest_checkpoint(out / "checkpoints"))


@pytest.mark.slow
def test_zero_stages_log_the_losses_of_ddp(zero_runs):
    reference, ref_weights = _losses(zero_runs / "zero0"), _weights(zero_runs / "zero0")
    for stage in (1, 2, 3):
        out = zero_runs / f"zero{stage}"
        torch.testing.assert_close(_losses(out), reference, rtol=0, atol=1e-5, msg=f"stage {stage}")
        torch.testing.assert_close(_losses(out, "val_loss"), _losses(zero_runs / "zero0", "val_loss"), rtol=0,
                                   atol=1e-5, msg=f"stage {stage} val")
        weights = _weights(out)  # gathered whole on save
        assert weights.keys() == ref_weights.keys()
        for name, w in ref_weights.items():
            torch.testing.assert_close(weights[name], w, rtol=0, atol=1e-5, msg=f"stage {stage}: {name}")
        assert (out / "checkpoints" / "step_000006" / "optimizer_zero_rank1.safetensors").exists()
        assert json.loads((out / "config.json").read_text())["train"]["zero_stage"] == stage


@pytest.mark.slow
def test_zero_ranks_hold_what_the_formula_says(zero_runs):
    n = GPT(get_profile("ci").model).num_params()
    for stage in (0, 1, 2, 3):
        record = read_metrics(zero_runs / f"zero{stage}")[-1]
        formula = zero_bytes_per_rank(n, 2, stage)  # fp32 Adam: 4 + 4 + 8 bytes per parameter
        for rank in (0, 1):
            held = record[f"mem_rank{rank}"]
            for part in ("params", "grads", "optimizer"):
                assert held[part] == pytest.approx(formula[part], rel=0.01), (stage, rank, part, held, formula)


@pytest.mark.slow
def test_zero3_with_checkpointing_and_accumulation_resumes(tmp_path, ci_data):
    """ZeRO-3 + selective recompute + 2 micro-batches equals DDP with 2 micro-batches, and resumes exactly."""
    settings = dict(max_steps=8, lr_decay_steps=8, eval_interval=0, checkpoint_interval=4, batch_size=2,
                    grad_accum=2, dropout=0.1)
    run_train(tmp_path / "ddp", nproc=2, **settings)
    out = tmp_path / "zero3"
    first = subprocess.run(train_cmd(out, 2, "ci", **dict(settings, max_steps=4), zero_stage=3,
                                     activation_checkpointing="selective"), capture_output=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    run_train(out, nproc=2, resume=True, zero_stage=3, activation_checkpointing="full", **settings)
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 9))
    torch.testing.assert_close(_losses(out), _losses(tmp_path / "ddp"), rtol=0, atol=1e-5)
    wrong = run_train(out, nproc=2, resume=True, check=False, zero_stage=2, **settings)
    assert wrong.returncode != 0 and "resume with --zero-stage 3 on 2 ranks" in wrong.stderr

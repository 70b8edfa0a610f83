"""Lab 06: the ViT, the digits data, and DeepSpeed ZeRO-2 + bf16 training of it as a 2-node job (Slurm or torchrun)."""

import json

import matplotlib.pyplot as plt
import pytest
import torch

from labs_lib.data.digits import ShardedLoader, load_digits_split
from labs_lib.jobs.launch import settings_args
from labs_lib.labs import lab06, plots
from labs_lib.measure.flops_report import flops_by_part, flops_profile_summary
from labs_lib.models.vit import ViT, ViTConfig, vit_flops_per_image, vit_param_count, vit_profile
from labs_lib.train.deepspeed import vit as dvt


@pytest.mark.parametrize("patch", [1, 2, 4, 8])
def test_vit_shapes_and_counts(patch):
    c = ViTConfig(patch_size=patch, n_embd=32, n_layer=2, n_head=4)
    model = ViT(c)
    assert c.n_patches == (8 // patch) ** 2 and c.seq_len == c.n_patches + 1
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    assert model(torch.randn(3, 8, 8)).shape == (3, 10)  # grey images without a channel axis
    assert model.num_params() == vit_param_count(c)
    assert model.pos_emb.shape == (1, c.seq_len, 32)


def test_ci_vit_size():
    model = ViT(vit_profile("ci")["model"])
    assert model.num_params() == 102_218


def test_bad_config_names_the_fix():
    with pytest.raises(ValueError, match="divisor of 8"):
        ViTConfig(patch_size=3)
    with pytest.raises(ValueError, match="n_head"):
        ViTConfig(n_embd=30, n_head=4)


def test_flop_formula_equals_deepspeed_profiler():
    """2 x the profiler's multiply-accumulates of a forward pass = our matmul formula, exactly."""
    pytest.importorskip("deepspeed")
    from deepspeed.profiling.flops_profiler import get_model_profile

    for patch in (2, 4):
        c = ViTConfig(patch_size=patch)
        _, macs, params = get_model_profile(ViT(c), input_shape=(3, 1, 8, 8), print_profile=False, as_string=False)
        assert 2 * macs == 3 * vit_flops_per_image(c)
        assert params == vit_param_count(c)
    assert vit_flops_per_image(c, backward=True) == 3 * vit_flops_per_image(c)


def test_digits_split_fixed_and_standardised():
    a, b = load_digits_split(), load_digits_split()
    assert a.x_train.shape == (1437, 1, 8, 8) and a.x_test.shape == (360, 1, 8, 8)
    assert torch.equal(a.y_test, b.y_test) and torch.equal(a.x_train, b.x_train)
    assert abs(a.x_train.mean().item()) < 1e-5 and abs(a.x_train.std().item() - 1) < 1e-5
    counts = torch.bincount(a.y_test)  # stratified: every digit about a tenth of the test set
    assert len(counts) == 10 and counts.min() >= 35 and counts.max() <= 37
    assert a.raw_test.min() == 0 and a.raw_test.max() == 16


def test_sharded_loader_splits_every_epoch_between_ranks():
    x, y = torch.arange(100).float()[:, None], torch.arange(100)
    shards = [list(ShardedLoader(x, y, batch_size=8, rank=r, world_size=3, epoch=1)) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]  # 100 // 24 = 4 full global batches, the rest dropped
    seen = [int(i) for s in shards for _, yb in s for i in yb]
    assert len(seen) == len(set(seen)) == 96
    again = [int(i) for _, yb in ShardedLoader(x, y, 8, rank=0, world_size=3, epoch=1) for i in yb]
    other_epoch = [int(i) for _, yb in ShardedLoader(x, y, 8, rank=0, world_size=3, epoch=2) for i in yb]
    assert again == [int(i) for _, yb in shards[0] for i in yb] and again != other_epoch
    ordered = ShardedLoader(x, y, 8, rank=1, world_size=2, shuffle=False, drop_last=False)
    assert [int(i) for _, yb in ordered for i in yb] == list(range(1, 100, 2))
    with pytest.raises(ValueError, match="lower the batch size"):
        ShardedLoader(x, y, batch_size=64, world_size=2)


def test_check_args_counts_the_steps_and_resolves_the_deepspeed_config():
    assert dvt.check_args(["--out", "x", "--profile", "ci"], world_size=2) == 1437 // (32 * 2) * 12
    s = dvt.settings_from_args(dvt.build_parser().parse_args(["--out", "x", "--profile", "ci", "--lr", "1e-3"]))
    assert s["ds_config"]["zero_optimization"]["stage"] == 2 and s["ds_config"]["bf16"]["enabled"]
    ds = dvt.resolved_ds_config(dict(s, epochs=2), steps_per_epoch=50, world_size=2, flops_profile_file="/tmp/f.txt")
    assert ds["train_batch_size"] == 64 and ds["optimizer"]["params"]["lr"] == 1e-3
    assert ds["scheduler"]["params"]["total_num_steps"] == 100 and ds["scheduler"]["params"]["warmup_num_steps"] == 10
    assert ds["flops_profiler"]["enabled"] and ds["flops_profiler"]["output_file"] == "/tmp/f.txt"
    s = dvt.settings_from_args(dvt.build_parser().parse_args(["--out", "x", "--zero-stage", "3", "--no-bf16"]))
    assert s["ds_config"]["zero_optimization"]["stage"] == 3 and not s["ds_config"]["bf16"]["enabled"]


def test_notebook_settings_become_the_trainers_flags():
    args = settings_args(epochs=3, bf16=False, flops_profile=True, lr=None)
    assert args == ["--epochs", "3", "--no-bf16", "--flops-profile"]
    parsed = dvt.build_parser().parse_args(["--out", "o", *args])
    assert (parsed.epochs, parsed.bf16, parsed.flops_profile, parsed.lr) == (3, False, True, None)
    assert not dvt.build_parser().parse_args(["--out", "o", *settings_args(flops_profile=False)]).flops_profile


@pytest.mark.parametrize("argv, message", [
    (["--patch-size", "3"], "divisor of 8"),
    (["--batch-size", "1000"], "lower the batch size"),
    (["--epochs", "1", "--batch-size", "512", "--flops-profile"], "profile_step"),
    (["--zero-stage", "5"], "bad arguments"),
])
def test_bad_settings_fail_before_spawning(argv, message):
    with pytest.raises(ValueError, match=message):
        dvt.check_args(["--out", "x", "--profile", "ci", *argv], world_size=2)


@pytest.mark.slow
def test_zero2_bf16_on_two_nodes_learns_the_digits(tmp_path):
    """The notebook's run (lab06.train_vit: Slurm on 2 nodes x 1 rank, else torchrun with 2 ranks; gloo): >= 90 %
    held-out accuracy, one record per epoch, the flops profile, what each rank holds."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "vit"
    metrics = lab06.train_vit(out, profile="ci", progress=False, zero_stage=2, bf16=True, flops_profile=True)
    run = lab06.read_run(out)
    assert run["world_size"] == 2 and run["zero_stage"] == 2 and run["dtype"] == "bfloat16"
    assert [r["epoch"] for r in metrics] == list(range(1, run["epochs"] + 1))
    assert [r["step"] for r in metrics] == [e * run["steps_per_epoch"] for e in range(1, run["epochs"] + 1)]
    assert metrics[-1]["test_accuracy"] >= 0.90, metrics[-1]
    assert metrics[-1]["loss"] < metrics[0]["loss"] and all(r["images_per_s"] > 0 for r in metrics)
    assert metrics[0]["lr"] > metrics[-1]["lr"] > 0  # DeepSpeed's WarmupCosineLR, read back by the loop

    preds = lab06.read_predictions(out)
    assert preds["index"] == list(range(360))
    accuracy = sum(p == y for p, y in zip(preds["prediction"], preds["label"])) / 360
    assert accuracy == pytest.approx(metrics[-1]["test_accuracy"])

    # ZeRO-2: every rank holds all bf16 weights, but only half the fp32 master weights and Adam moments.
    n = run["n_params"]
    for held in run["held_bytes"]:
        assert held["params"] == pytest.approx(2 * n, rel=1e-3)
        assert held["master"] + held["optimizer"] == pytest.approx(12 * n / 2, rel=1e-3)

    report = (out / "flops_profile.txt").read_text()
    assert "DeepSpeed Flops Profiler" in report
    for module in ("patch_embed", "blocks", "attn", "qkv", "mlp", "head", "Conv2d", "LayerNorm"):
        assert module in report
    summary = flops_profile_summary(out / "flops_profile.txt")
    assert summary["batch_size"] == 32 and summary["params"] == pytest.approx(n, rel=1e-3)
    # 2 FLOPs per multiply-accumulate, one micro-batch of 32 images: our formula (the report rounds to 4 digits)
    assert 2 * summary["fwd_macs"] == pytest.approx(32 * run["flops_per_image_fwd"], rel=5e-3)
    assert summary["fwd_flops"] > 2 * summary["fwd_macs"]  # norms, GELU, softmax, adds
    modules = summary["modules"]
    assert modules["blocks.0.mlp.fc"]["macs"] == pytest.approx(32 * 5 * 64 * 256, rel=5e-3)
    assert {"patch_embed", "blocks.1.attn.qkv", "head"} <= set(modules)
    assert json.loads((out / "run.json").read_text())["deepspeed"]["flops_profiler"]["enabled"]
    parts = flops_by_part(summary)
    assert sum(parts.values()) == pytest.approx(2 * summary["fwd_macs"], rel=2e-3)
    assert parts["MLP fc"] + parts["MLP proj"] > 0.6 * sum(parts.values())  # 16Td² of 24Td² + 4T²d

    # the lab's figures draw from the run's files
    data = load_digits_split()
    plots.plot_epochs(metrics)
    plots.plot_digits(data.raw_test[:12], preds["label"][:12], preds["prediction"][:12], preds["confidence"][:12])
    plots.plot_patches(data.raw_test[0], run["model"]["patch_size"])
    plots.plot_flops_parts(parts)
    plots.plot_flops_vs_patch([4, 2], [1e6, 3e6], [1e6, 3e6], [0.01, 0.04])
    plt.close("all")

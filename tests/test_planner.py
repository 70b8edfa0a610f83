"""The planner against published numbers (each cited where it is used), its own rules, and its CLI.

Sources:
- ZeRO: Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models", figure 1.
- Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models": table 2 (activation
  memory per layer), section 4.2.2 (GPT-3's 5as/h = 80; selective recomputation saves 70% of GPT-3's activations
  and 65% of MT-NLG's), table 3 (the 22B / 175B / 530B / 1T configurations), the abstract ("reduces activation
  memory by 5x").
- Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM": table 1
  (parameters and throughput of 1.7B ... 1T), eq. 2 (parameters), eq. 3 (FLOPs per iteration with recomputation),
  section 5.1 (GPT-3 175B: 34 days; 1T: 84 days).
- Brown et al. 2020, "Language Models are Few-Shot Learners", table D.1 (GPT-3 175B: 3.14e23 training FLOPs).
- Chowdhery et al. 2022, "PaLM", section 4.1 / appendix B (540B on 6144 TPU v4: 238.3K tokens/s, 46.2% MFU).
- Hugging Face transformers' GPT-2 small: 124,439,808 parameters (tied embeddings).
"""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from labs_lib.core.config import GPTConfig
from labs_lib.estimates.activations import labs_activation_bytes, layers_in_flight, megatron_activation_bytes
from labs_lib.estimates.memory import activation_bytes_formula
from labs_lib.estimates.parallel import bubble_fraction, tensor_parallel_param_count
from labs_lib.measure.flops import mfu
from labs_lib.models.gpt import GPT
from labs_lib.planner.__main__ import main
from labs_lib.planner.plan import (
    GB,
    ClusterSpec,
    ModelSpec,
    Plan,
    check_plan,
    estimate,
    model_flops_per_token,
    model_states_bytes,
    narayanan_train_days,
    stage_params,
)
from labs_lib.planner.presets import cluster_preset, model_preset


def relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ------------------------------------------------------------------------------------------ published: memory
@pytest.mark.parametrize("stage, published_gb", [(0, 120), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_7_5b_on_64_gpus(stage, published_gb):
    # ZeRO figure 1: Ψ = 7.5B, N_d = 64, K = 12 (mixed-precision Adam): 120 / 31.4 / 16.6 / 1.9 GB per GPU
    assert relative(model_states_bytes(7.5e9, 64, stage, "bf16")["total"] / GB, published_gb) < 0.02


def test_zero_states_in_an_estimate_are_the_papers():
    model, cluster = model_preset("gpt3-13b"), cluster_preset("a100-80gb").with_gpus(64)
    est = estimate(model, cluster, Plan(dp=64, zero=2, global_batch=64))
    states = model_states_bytes(stage_params(model, 1, 1, 0), 64, 2, "bf16")
    assert {k: est.memory_bytes[k] for k in ("params", "grads", "optimizer")} == \
        {k: states[k] for k in ("params", "grads", "optimizer")}


# Korthikanti table 3: hidden, heads, layers (t = 8, s = 2048, b = 1)
KORTHIKANTI_MODELS = {"22B": (6144, 64, 48), "175B": (12288, 96, 96), "530B": (20480, 128, 105),
                      "1T": (25600, 160, 128)}


def korthikanti_cfg(name: str) -> GPTConfig:
    h, a, layers = KORTHIKANTI_MODELS[name]
    return GPTConfig(vocab_size=51200, block_size=2048, n_layer=layers, n_head=a, n_embd=h)


def test_korthikanti_table_2_for_gpt3():
    cfg, t = korthikanti_cfg("175B"), 8
    sbh = 2048 * 1 * 12288
    attention = 5 * 96 * 2048 / 12288
    assert attention == 80  # section 4.2.2: "for GPT-3 ... 5as/h = 80"
    expected = {  # table 2, per layer, in units of sbh
        (1, False, "none"): 34 + attention,
        (t, False, "none"): 10 + 24 / t + attention / t,
        (t, True, "none"): (34 + attention) / t,
        (t, False, "selective"): 10 + 24 / t,
        (t, True, "selective"): 34 / t,
        (1, False, "full"): 2,
        (t, False, "full"): 2,
    }
    for (tp, sp, mode), units in expected.items():
        assert megatron_activation_bytes(cfg, 1, tp=tp, sequence_parallel=sp, recompute=mode) == \
            pytest.approx(units * sbh, rel=1e-12), (tp, sp, mode)


@pytest.mark.parametrize("name, saving", [("175B", 0.70), ("530B", 0.65)])
def test_korthikanti_selective_recompute_saving(name, saving):
    # section 4.2.2: selective recomputation cuts the activations of GPT-3 by 70%, of MT-NLG (530B) by 65%
    cfg = korthikanti_cfg(name)
    kept = megatron_activation_bytes(cfg, recompute="selective") / megatron_activation_bytes(cfg)
    assert abs((1 - kept) - saving) < 0.01


@pytest.mark.parametrize("name", KORTHIKANTI_MODELS)
def test_korthikanti_five_times_less_activation_memory(name):
    # abstract: sequence parallelism + selective recomputation "reduces activation memory by 5x" (vs TP alone)
    cfg = korthikanti_cfg(name)
    baseline = megatron_activation_bytes(cfg, tp=8)
    reduced = megatron_activation_bytes(cfg, tp=8, sequence_parallel=True, recompute="selective")
    assert 4.5 < baseline / reduced < 6.5


def test_pipeline_keeps_the_first_stages_micro_batches():
    # Korthikanti 4.2.3 / Narayanan 2.2.2: the first 1F1B stage holds p micro-batches of L/p layers = L layers,
    # interleaving multiplies that by 1 + (p - 1)/(p·v); GPipe holds all m
    assert layers_in_flight(96, 8, 64, "1f1b") == 96
    assert layers_in_flight(96, 8, 64, "1f1b", stage=7) == 12
    assert layers_in_flight(96, 8, 64, "interleaved-1f1b", chunks=3) == pytest.approx(96 * (1 + 7 / 24))
    assert layers_in_flight(96, 8, 64, "gpipe", stage=5) == 64 * 12
    assert layers_in_flight(96, 8, 4, "1f1b") == 4 * 12  # fewer micro-batches than stages: all of them


def test_labs_activations_reduce_to_the_single_rank_count():
    cfg = GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=64)
    for dtype in ("fp32", "bf16"):
        for mode in ("none", "selective", "full"):
            assert labs_activation_bytes(cfg, 4, dtype=dtype, recompute=mode) == \
                activation_bytes_formula(cfg, 4, dtype=dtype, mode=mode)
            tp2 = labs_activation_bytes(cfg, 4, dtype=dtype, tp=2, recompute=mode)
            sp2 = labs_activation_bytes(cfg, 4, dtype=dtype, tp=2, sequence_parallel=True, recompute=mode)
            one = activation_bytes_formula(cfg, 4, dtype=dtype, mode=mode)
            assert sp2 < one and sp2 <= tp2 <= one and (mode == "full" or tp2 < one)


# ------------------------------------------------------------------------------------- published: parameters
def test_gpt2_small_parameters_and_the_labs_gpt():
    assert model_preset("gpt2-small").params() == 124_439_808  # transformers' GPT2LMHeadModel, tied
    for cfg in (GPTConfig(vocab_size=512, block_size=64, n_layer=3, n_head=4, n_embd=64),
                GPTConfig(vocab_size=640, block_size=32, n_layer=2, n_head=2, n_embd=32, bias=False)):
        with torch.device("meta"):
            gpt = GPT(cfg)
        spec = ModelSpec.from_gpt_config(cfg)
        assert spec.kind == "labs" and spec.params() == gpt.num_params()
        assert spec.flops_per_token() == gpt.flops_per_token()
        for tp in (2, 4):  # the real shards' count (labs_lib.parallel.tensor_parallel's split)
            assert stage_params(spec, tp, 1, 0) == tensor_parallel_param_count(cfg, tp)


@pytest.mark.parametrize("billions, heads, hidden, layers", [(145.6, 96, 12288, 80), (310.1, 128, 16384, 96),
                                                             (529.6, 128, 20480, 105), (1008.0, 160, 25600, 128)])
def test_megatron_table_1_parameters(billions, heads, hidden, layers):
    # Narayanan table 1 (vocabulary 51200, sequence 2048; eq. 2 leaves out the final LayerNorm's 2h)
    spec = ModelSpec("m", layers=layers, hidden=hidden, heads=heads, vocab=51200, seq=2048)
    assert relative(spec.params() / 1e9, billions) < 1e-3
    assert model_preset("megatron-1t").params() == ModelSpec("x", 128, 25600, 160, 51200, 2048).params()


def test_gpt3_training_compute():
    # Brown et al. table D.1: 3.14e23 FLOPs for 300B tokens (6·N·D, attention left out)
    assert relative(6 * model_preset("gpt3-175b").params() * 300e9, 3.14e23) < 0.01


# -------------------------------------------------------------------------------------- published: time, MFU
def test_gpt3_175b_trains_in_34_days_on_1024_a100():
    # Narayanan 5.1: 8·T·P/(n·X) with T = 300B tokens, P = 175B, n = 1024, X = 140 TFLOP/s: about 34 days
    assert relative(narayanan_train_days(300e9, 175e9, 1024, 140e12), 34) < 0.02
    # the same through the planner's step time: compute at 140 TFLOP/s, links made free (no pipeline, no bubble)
    a100 = cluster_preset("a100-80gb")
    cluster = replace(a100.with_gpus(1024), compute_efficiency=140e12 / a100.peak_flops, latency_s=0.0,
                      intra_node_busbw=float("inf"), inter_node_busbw=float("inf"))
    est = estimate(model_preset("gpt3-175b"), cluster, Plan(dp=128, tp=8, global_batch=1536, recompute="full"),
                   tokens=300e9)
    assert relative(est.train_days, 34) < 0.05  # + the attention FLOPs 8·T·P leaves out (s/6h = 2.8%)


def test_megatron_1t_on_3072_a100_52_percent_of_peak():
    # Narayanan table 1: 1T (tp 8, pp 64, 3072 GPUs, batch 3072) at 163 TFLOP/s per GPU, 502 PFLOP/s, 52% of peak;
    # their FLOPs (eq. 3) include the full recomputation: 96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h))
    model, cluster = model_preset("megatron-1t"), cluster_preset("a100-80gb").with_gpus(3072)
    plan = Plan(dp=6, tp=8, pp=64, micro_batch=1, global_batch=3072, recompute="full")
    est = estimate(model, cluster, plan, tokens=450e9)
    B, s, layers, h, V = 3072, 2048, 128, 25600, 51200
    eq3 = 96 * B * s * layers * h**2 * (1 + s / (6 * h) + V / (16 * layers * h))
    assert relative(est.hardware_flops_per_step, eq3) < 0.005
    step_s = eq3 / (3072 * 163e12)  # the iteration time their throughput implies
    assert relative(est.hardware_flops_per_step / step_s / 1e15, 502) < 0.005
    assert abs(est.hardware_flops_per_step / step_s / (3072 * cluster.peak_flops) - 0.52) < 0.005
    assert est.flops_per_step / est.hardware_flops_per_step == pytest.approx(0.75, abs=0.01)  # MFU = 3/4 of HFU
    assert est.fits, est.reason  # they ran it on 80 GB A100s
    # section 5.1: 450B tokens at 163 TFLOP/s per GPU: 84 days
    assert relative(narayanan_train_days(450e9, model.params(), 3072, 163e12), 84) < 0.02


def test_palm_540b_mfu():
    # PaLM 4.1 / appendix B: 540.35B parameters, 118 layers, 48 heads of 256, sequence 2048; 238.3K tokens/s on
    # 6144 TPU v4 chips (275 TFLOP/s bf16 each) is 46.2% MFU with 6N + 12·L·H·Q·T FLOPs per token
    per_token = model_flops_per_token(540.35e9, 118, 48 * 256, 2048)
    assert abs(mfu(per_token, 238.3e3, 6144 * 275e12) - 0.462) < 0.002


# ------------------------------------------------------------------------------------------------- behaviour
GPT3 = model_preset("gpt3-175b")
A100_1024 = cluster_preset("a100-80gb").with_gpus(1024)


def test_a_plan_that_does_not_fit_says_why_and_what_fits():
    est = estimate(GPT3, A100_1024, Plan(dp=128, tp=8, global_batch=1536))
    assert not est.fits and est.memory_bytes["total"] > A100_1024.memory_bytes
    assert f"needs {est.memory_bytes['total'] / GB:.1f} GB per GPU > 80.0 GB" in est.reason
    assert "try --zero 3" in est.reason  # the one change that fits: the parameters sharded over 128 ranks
    fixed = estimate(GPT3, A100_1024, Plan(dp=128, tp=8, zero=3, global_batch=1536))
    assert fixed.fits and fixed.reason == ""
    # Megatron's way: pipeline + sequence parallelism + selective recomputation
    three_d = Plan(dp=16, tp=8, pp=8, zero=1, global_batch=1536, recompute="selective", sequence_parallel=True)
    assert estimate(GPT3, A100_1024, three_d).fits


def test_memory_and_time_follow_the_knobs():
    base = Plan(dp=16, tp=8, pp=8, global_batch=1536)
    e = {name: estimate(GPT3, A100_1024, plan) for name, plan in {
        "base": base, "zero1": replace(base, zero=1), "sp": replace(base, sequence_parallel=True),
        "gpipe": replace(base, schedule="gpipe"), "interleaved": replace(base, schedule="interleaved-1f1b", chunks=2),
        "offload": replace(base, zero=1, offload=True), "full": replace(base, recompute="full")}.items()}
    act = {k: v.memory_bytes["activations"] for k, v in e.items()}
    assert e["zero1"].memory_bytes["optimizer"] == pytest.approx(e["base"].memory_bytes["optimizer"] / 16)
    assert e["offload"].memory_bytes["optimizer"] == 0
    assert act["sp"] < act["base"] < act["interleaved"] < act["gpipe"] and act["full"] < act["sp"]
    assert e["full"].hardware_flops_per_step > e["base"].hardware_flops_per_step == e["base"].flops_per_step
    m = base.gradient_accumulation
    for name, v in (("base", 1), ("interleaved", 2)):  # the bubble: (p-1)/(v·m+p-1) of the step's compute time
        share = e[name].bubble_time_s / (e[name].bubble_time_s + e[name].compute_time_s)
        assert share == pytest.approx(bubble_fraction(8, m, v))
    assert set(e["sp"].comm_bytes) >= {"dp all-reduce", "sp all-gather + reduce-scatter", "pp send/recv"}
    assert e["base"].tokens_per_s == pytest.approx(1536 * 2048 / e["base"].step_time_s)


def test_ranks_sharing_cores_share_the_compute():
    small = ModelSpec.from_gpt_config(GPTConfig(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=64))
    cpu = ClusterSpec("cpu", gpus=8, gpus_per_node=4, memory_bytes=4e9, peak_flops=1e10, intra_node_busbw=1e9,
                      inter_node_busbw=5e8)
    plan = Plan(dp=8, global_batch=64, precision="fp32")
    alone, shared = estimate(small, cpu, plan), estimate(small, replace(cpu, shared_cores=2), plan)
    assert shared.compute_time_s == pytest.approx(4 * alone.compute_time_s)


def test_shared_cores_time_collectives_between_the_link_alone_and_oversubscribed():
    """A CPU cluster measured alone and with 2 ranks per core: 1 rank per core pays the link alone, 2 the contended
    line, 4 the line through both extended (linear in the ranks per core)."""
    small = ModelSpec.from_gpt_config(GPTConfig(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=64))
    cpu = ClusterSpec("cpu", gpus=4, gpus_per_node=4, memory_bytes=4e9, peak_flops=1e10, intra_node_busbw=1e9,
                      inter_node_busbw=5e8, latency_s=1e-4, contended={"all_reduce": (4e-4, 5e8)}, contended_share=2)
    plan = Plan(dp=4, global_batch=16, precision="fp32")
    ring = 2 * 3 / 4 * stage_params(small, 1, 1, 0) * 4  # fp32 gradients, one bucket
    alone, contended = 1e-4 + ring / 1e9, 4e-4 + ring / 5e8
    for cores, expected in ((4, alone), (2, contended), (1, alone + 3 * (contended - alone))):
        e = estimate(small, replace(cpu, shared_cores=cores), plan)
        assert e.comm_time_s["dp all-reduce"] == pytest.approx(expected), cores
    no_measurement = replace(cpu, shared_cores=2, contended=None)  # the link's time, twice over
    assert estimate(small, no_measurement, plan).comm_time_s["dp all-reduce"] == pytest.approx(2 * alone)


def test_optimizer_and_recompute_costs_come_from_the_cluster():
    """A calibrated optimizer cost is paid once per step for the parameters a rank updates (ZeRO: its shard), outside
    the pipeline bubble; a measured per-mode layer cost replaces the scaled one."""
    small = ModelSpec.from_gpt_config(GPTConfig(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=64))
    cpu = ClusterSpec("cpu", gpus=2, gpus_per_node=2, memory_bytes=4e9, peak_flops=1e10, intra_node_busbw=1e9,
                      inter_node_busbw=5e8, layer_overhead_s=1e-3)
    adam = replace(cpu, optimizer_s_per_param=1e-8)
    n = stage_params(small, 1, 1, 0)
    for zero, updated in ((0, n), (1, n / 2)):
        plan = Plan(dp=2, zero=zero, global_batch=8, precision="fp32")
        extra = estimate(small, adam, plan).compute_time_s - estimate(small, cpu, plan).compute_time_s
        assert extra == pytest.approx(updated * 1e-8), zero
    piped = Plan(pp=2, global_batch=8, precision="fp32")
    assert estimate(small, adam, piped).bubble_time_s == pytest.approx(estimate(small, cpu, piped).bubble_time_s)
    assert cpu.layer_overhead("full") == pytest.approx(4 / 3 * 1e-3) and cpu.layer_overhead("selective") == 1e-3
    measured = replace(cpu, recompute_overhead_s={"selective": 5e-3})
    assert measured.layer_overhead("selective") == 5e-3
    assert measured.layer_overhead("full") == cpu.layer_overhead("full")
    plan = Plan(dp=2, global_batch=8, recompute="selective", precision="fp32")
    extra = estimate(small, measured, plan).compute_time_s - estimate(small, cpu, plan).compute_time_s
    assert extra == pytest.approx(small.layers * plan.gradient_accumulation * 4e-3)


def test_collectives_slower_than_the_all_reduce_time_zero_and_sequence_parallelism():
    """A cluster whose reduce-scatter and all-gather run at their own (measured) rates: ZeRO-2 and TP + SP take the
    longer, plain data parallelism and TP without SP (all-reduces only) do not move."""
    small = ModelSpec.from_gpt_config(GPTConfig(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=64))
    cpu = ClusterSpec("cpu", gpus=4, gpus_per_node=4, memory_bytes=4e9, peak_flops=1e10, intra_node_busbw=1e9,
                      inter_node_busbw=5e8, latency_s=1e-4)
    slow = replace(cpu, collectives={"reduce_scatter": ((3e-4, 4e8), (3e-4, 2e8)),
                                     "all_gather": ((2e-4, 5e8), (2e-4, 2.5e8))})
    assert slow.link("reduce_scatter", 4) == (3e-4, 4e8) and slow.link("all_gather", 8) == (2e-4, 2.5e8)
    assert slow.link("all_reduce", 4) == cpu.link("all_reduce", 4) == (1e-4, 1e9)
    plans = {"dp": Plan(dp=4, global_batch=16, precision="fp32"),
             "zero2": Plan(dp=4, zero=2, global_batch=16, precision="fp32"),
             "tp": Plan(dp=2, tp=2, global_batch=16, precision="fp32"),
             "tp+sp": Plan(dp=2, tp=2, global_batch=16, precision="fp32", sequence_parallel=True)}
    for name, plan in plans.items():
        before, after = estimate(small, cpu, plan), estimate(small, slow, plan)
        assert after.comm_bytes == before.comm_bytes, name
        if name in ("dp", "tp"):
            assert after.step_time_s == pytest.approx(before.step_time_s), name
        else:
            assert after.step_time_s > before.step_time_s, name
    zero = estimate(small, slow, plans["zero2"]).comm_time_s
    n = stage_params(small, 1, 1, 0) * 4  # fp32 gradients, one bucket
    assert zero["zero reduce-scatter"] == pytest.approx(4 * (3e-4 + n * 3 / 4 / 4e8))  # 4 micro-batches, 1 bucket


@pytest.mark.parametrize("plan, fix", [
    (Plan(dp=128, tp=7), "does not divide heads=96"),
    (Plan(dp=12, tp=8), "set --dp 128"),
    (Plan(dp=16, tp=8, pp=8, zero=2, global_batch=128), "use --zero 1"),
    (Plan(dp=1024, sequence_parallel=True, global_batch=1024), "--tp 2 or more"),
    (Plan(dp=128, tp=8, global_batch=100), "--global-batch 128"),
    (Plan(dp=128, tp=8, global_batch=128, offload=True), "--zero 1, 2 or 3"),
    (Plan(dp=16, tp=8, pp=8, global_batch=64), "at least 8"),
])
def test_bad_plans_name_the_fix(plan, fix):
    with pytest.raises(ValueError, match=fix.replace("-", "\\-").replace("+", "\\+")):
        check_plan(GPT3, A100_1024, plan)


def test_unknown_presets_list_the_names():
    with pytest.raises(ValueError, match="gpt3-175b"):
        model_preset("gpt-5")
    with pytest.raises(ValueError, match="h100-80gb"):
        cluster_preset("tpu")


# ------------------------------------------------------------------------------------------------------- CLI
def test_cli_json():
    out = subprocess.run([sys.executable, "-m", "labs_lib.planner", "--model", "gpt3-175b", "--gpus", "1024",
                          "--gpus-per-node", "8", "--gpu", "a100-80gb", "--dp", "16", "--tp", "8", "--pp", "8",
                          "--zero", "1", "--micro-batch", "1", "--global-batch", "1536", "--recompute",
                          "selective", "--sequence-parallel", "--precision", "bf16", "--tokens", "300e9", "--json"],
                         capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    assert set(got["memory_bytes"]) >= {"params", "grads", "optimizer", "activations", "total"}
    assert got["fits"] is True and got["reason"] == ""
    for key in ("step_time_s", "tokens_per_s", "mfu", "train_days"):
        assert got[key] > 0
    assert got["train_days"] == pytest.approx(300e9 / got["tokens_per_s"] / 86400)


@pytest.mark.parametrize("argv, fix", [
    (["--model", "gpt3-175b", "--gpus", "1024", "--tp", "7", "--dp", "128"], "does not divide heads=96"),
    (["--model", "gpt3-175b", "--gpus", "1024", "--dp", "12", "--tp", "8"], "set --dp 128"),
    (["--model", "gpt-5"], "choose one of gpt2-small"),
    (["--model", "gpt2-small", "--layers", "4"], "pass one or the other"),
    (["--model", "gpt2-small", "--gpu", "tpu"], "unknown GPU preset"),
])
def test_cli_bad_input_exits_2_with_one_line(argv, fix, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fix in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_table(capsys):
    assert main(["--model", "gpt2-small", "--gpu", "h100-80gb", "--gpus", "8", "--global-batch", "64"]) == 0
    out = capsys.readouterr().out
    assert "gpt2-small: 0.124 B parameters; fits" in out and "tokens/s" in out

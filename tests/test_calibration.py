"""The local cluster preset measured (labs_lib.planner.calibrate): both links as real all-reduce jobs, GEMM FLOP/s
and the GPT's step costs with every core busy. It runs before the notebooks (file order), which then find the
calibration saved in build/cache/planner/local.json, as tests/test_planner_accuracy.py does."""

import pytest

from labs_lib.core.config import CHECKPOINT_MODES
from labs_lib.measure.bandwidth import COLLECTIVES, bus_bandwidth, bus_factor, check_args
from labs_lib.planner.calibrate import CALIBRATION_MODEL, calibrate, fit_link, fit_step_costs, local_cluster


@pytest.fixture(scope="module")
def calibration():
    """This machine measured now (links as real jobs, GEMM, the GPT's step): the local preset the tests use."""
    return calibrate(progress=False)


def test_bus_bandwidth_is_nccl_tests_formula():
    assert bus_bandwidth(10e9, 2) == pytest.approx(10e9)  # 2(n-1)/n = 1
    assert bus_bandwidth(100e9, 8) == pytest.approx(175e9)


def test_bandwidth_job_checks_its_groups_before_launching():
    assert bus_factor("send_recv", 4) == 1 and bus_factor("reduce_scatter", 4) == pytest.approx(3 / 4)
    assert check_args(["--out", "x", "--group-size", "2", "--collectives", *COLLECTIVES], 4) == 8 * 4
    for argv, world, fix in ((["--group-size", "3"], 4, "divide the 4 ranks"), (["--group-size", "1"], 2, ">= 2"),
                             (["--compute-between-s", "-1"], 2, ">= 0")):
        with pytest.raises(ValueError, match=fix):
            check_args(["--out", "x", *argv], world)


def test_step_cost_fit_recovers_efficiency_overheads_and_the_optimizer():
    """Step times made from known costs (labs_lib.planner.specs' FLOPs) give those costs back."""
    import torch

    from labs_lib.models.gpt import GPT
    from labs_lib.planner.specs import ModelSpec, recompute_flops_per_token

    cfg, peak, efficiency, per_param = CALIBRATION_MODEL, 1e11, 0.6, 4e-9
    overhead = {"none": 1e-3, "selective": 4e-3, "full": 2e-3}
    with torch.device("meta"):
        gpt = GPT(cfg)
    params, spec = sum(p.numel() for p in gpt.parameters()), ModelSpec.from_gpt_config(cfg)
    rows = []
    for mode in CHECKPOINT_MODES:
        flops = (gpt.flops_per_token() + recompute_flops_per_token(spec, mode)) * cfg.block_size
        for b in (1, 2, 4, 8):
            optimizer = params * per_param
            rows.append({"micro_batch": b, "recompute": mode, "optimizer_s": optimizer,
                         "step_s": cfg.n_layer * overhead[mode] + b * flops / (peak * efficiency) + optimizer})
    fit = fit_step_costs(rows, cfg, peak)
    assert fit["compute_efficiency"] == pytest.approx(efficiency)
    assert fit["layer_overhead_s"] == pytest.approx(overhead["none"])
    assert fit["optimizer_s_per_param"] == pytest.approx(per_param)
    assert fit["recompute_overhead_s"] == pytest.approx({k: v for k, v in overhead.items() if k != "none"})


def test_link_fit_recovers_latency_and_bandwidth():
    latency, busbw, world = 50e-6, 2e9, 4
    rows = [{"bytes": n, "time_s": latency + n * 2 * (world - 1) / world / busbw} for n in (1024, 65536, 2**22)]
    assert fit_link(rows, world) == pytest.approx((latency, busbw), rel=1e-6)


def test_calibration_measures_both_links_and_the_compute(calibration):
    links = {**calibration["links"], "contended": calibration["contended"]}
    for name, link in links.items():
        assert link["group_size"] == 2, name and len(link["rows"]) >= 6
        assert link["compute_between_s"] > 0  # each collective after compute, as in a training step
        assert all(r["time_s"] > 0 and r["busbw"] > 0 for r in link["rows"])
        assert link["latency_s"] > 0 and link["busbw"] > 0
        assert [r["bytes"] for r in link["rows"]] == calibration["message_sizes"]
        # every collective measured at the same sizes, each with its own fit (the all-reduce's: the link's)
        assert set(link["collectives"]) == set(COLLECTIVES)
        for fit in link["collectives"].values():
            assert [r["bytes"] for r in fit["rows"]] == calibration["message_sizes"]
            assert fit["latency_s"] >= 0 and fit["busbw"] > 0
        assert (link["collectives"]["all_reduce"]["latency_s"], link["collectives"]["all_reduce"]["busbw"]) == (
            link["latency_s"], link["busbw"])
    assert links["intra_node"]["world_size"] == links["inter_node"]["world_size"] == 2
    # two ranks per core, in pairs measuring at once
    assert links["contended"]["world_size"] == 2 * calibration["cores"] and links["contended"]["share"] == 2
    assert calibration["peak_flops"] == max(r["flops"] for r in calibration["gemm"]) > 1e8
    assert 0 < calibration["compute_efficiency"] <= 1.5 and calibration["layer_overhead_s"] >= 0
    assert calibration["optimizer_s_per_param"] > 0 and set(calibration["recompute_overhead_s"]) == {"selective",
                                                                                                   "full"}
    cluster = local_cluster(measure_if_missing=False)
    assert (cluster.name, cluster.gpus, cluster.shared_cores) == ("local", 8, calibration["cores"])
    intra = calibration["links"]["intra_node"]["collectives"]["reduce_scatter"]
    assert cluster.link("reduce_scatter", 2) == (intra["latency_s"], intra["busbw"])
    contended = calibration["contended"]["collectives"]["send_recv"]
    assert cluster.contended["send_recv"] == (contended["latency_s"], contended["busbw"])
    assert cluster.contended_share == 2 and cluster.recompute_overhead_s == calibration["recompute_overhead_s"]

"""The local cluster preset measured (labs_lib.planner.calibrate): both links as real all-reduce jobs, GEMM FLOP/s
and the GPT's step costs with every core busy. It runs before the notebooks (file order), which then find the
calibration saved in build/cache/planner/local.json, as tests/test_planner_accuracy.py does."""

import pytest

from labs_lib.measure.bandwidth import bus_bandwidth
from labs_lib.planner.calibrate import calibrate, fit_link, local_cluster


@pytest.fixture(scope="module")
def calibration():
    """This machine measured now (links as real jobs, GEMM, the GPT's step): the local preset the tests use."""
    return calibrate(progress=False)


def test_bus_bandwidth_is_nccl_tests_formula():
    assert bus_bandwidth(10e9, 2) == pytest.approx(10e9)  # 2(n-1)/n = 1
    assert bus_bandwidth(100e9, 8) == pytest.approx(175e9)


def test_link_fit_recovers_latency_and_bandwidth():
    latency, busbw, world = 50e-6, 2e9, 4
    rows = [{"bytes": n, "time_s": latency + n * 2 * (world - 1) / world / busbw} for n in (1024, 65536, 2**22)]
    assert fit_link(rows, world) == pytest.approx((latency, busbw), rel=1e-6)


def test_calibration_measures_both_links_and_the_compute(calibration):
    for name in ("intra_node", "inter_node"):
        link = calibration["links"][name]
        assert link["world_size"] == 2 and len(link["rows"]) >= 6
        assert all(r["time_s"] > 0 and r["busbw"] > 0 for r in link["rows"])
        assert link["latency_s"] > 0 and link["busbw"] > 0
        assert [r["bytes"] for r in link["rows"]] == calibration["message_sizes"]
        # reduce-scatter and all-gather measured at the same sizes, each with its own fit (the all-reduce's: the link's)
        assert set(link["collectives"]) == {"all_reduce", "reduce_scatter", "all_gather"}
        for fit in link["collectives"].values():
            assert [r["bytes"] for r in fit["rows"]] == calibration["message_sizes"]
            assert fit["latency_s"] >= 0 and fit["busbw"] > 0
        assert (link["collectives"]["all_reduce"]["latency_s"], link["collectives"]["all_reduce"]["busbw"]) == (
            link["latency_s"], link["busbw"])
    assert calibration["peak_flops"] == max(r["flops"] for r in calibration["gemm"]) > 1e8
    assert 0 < calibration["compute_efficiency"] <= 1.5 and calibration["layer_overhead_s"] >= 0
    cluster = local_cluster(measure_if_missing=False)
    assert (cluster.name, cluster.gpus, cluster.shared_cores) == ("local", 8, calibration["cores"])
    intra = calibration["links"]["intra_node"]["collectives"]["reduce_scatter"]
    assert cluster.link("reduce_scatter", 2) == (intra["latency_s"], intra["busbw"])



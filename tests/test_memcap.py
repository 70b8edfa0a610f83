"""A memory cap per rank plays a GPU's memory (labs_lib.core.memcap): past it an allocation is an out-of-memory error
naming the cap and the planner's estimate, and through the one launcher a plan that needs far more than the cap
fails with that message while a plan that needs far less runs under the same cap."""

import resource

import pytest
import torch

from labs_lib.core.config import get_profile
from labs_lib.core.memcap import CAP_ENV, ESTIMATE_ENV, OutOfMemoryError, cap_environment, data_bytes, memory_cap
from labs_lib.estimates.memory import activation_bytes_formula
from labs_lib.jobs.process import LaunchError

MB = 1_000_000


def test_an_allocation_past_the_cap_is_an_out_of_memory_error_naming_the_cap():
    before = resource.getrlimit(resource.RLIMIT_DATA)
    with pytest.raises(OutOfMemoryError) as failure:
        with memory_cap(3, cap_bytes=50 * MB, estimate_bytes=73 * MB):
            kept = torch.ones(10 * MB, dtype=torch.uint8)  # well under the cap: fine
            torch.empty(200 * MB, dtype=torch.uint8)
    assert str(failure.value).startswith("out of memory: rank 3 needs more than the 0.05 GB memory cap (the planner "
                                         "estimated 0.07 GB per rank for this plan); tried to allocate 0.200 GB")
    assert kept.sum() == 10 * MB
    assert resource.getrlimit(resource.RLIMIT_DATA) == before, "the limit is lifted on the way out"
    torch.empty(200 * MB, dtype=torch.uint8)  # and allocating works again


def test_pythons_memory_error_and_the_environment_cap(monkeypatch):
    monkeypatch.setenv(CAP_ENV, str(30 * MB))
    monkeypatch.delenv(ESTIMATE_ENV, raising=False)
    with pytest.raises(OutOfMemoryError, match=r"rank 0 needs more than the 0.03 GB memory cap \(no planner estimate"):
        with memory_cap(0):
            bytearray(300 * MB)
    with pytest.raises(ZeroDivisionError), memory_cap(0):  # other errors pass through unchanged
        1 / 0  # noqa: B018


def test_without_a_cap_nothing_changes(monkeypatch):
    monkeypatch.delenv(CAP_ENV, raising=False)
    before = resource.getrlimit(resource.RLIMIT_DATA)
    with memory_cap(0):
        assert resource.getrlimit(resource.RLIMIT_DATA) == before
    assert data_bytes() > 0


def test_bad_caps_are_refused_naming_the_fix(tmp_path):
    from labs_lib.jobs.launch import launch

    assert cap_environment(0.5, 0.73) == {CAP_ENV: "500000000", ESTIMATE_ENV: "730000000"}
    assert cap_environment(None) == {}
    with pytest.raises(ValueError, match="give memory_cap_gb too"):
        cap_environment(None, 0.73)
    with pytest.raises(ValueError, match="memory_cap_gb must be a positive number of GB"):
        cap_environment(-1)
    with pytest.raises(ValueError, match="does not apply a memory cap: drop memory_cap_gb"):
        launch("labs_lib.core.dist", [], tmp_path / "ar", nproc_per_node=2, memory_cap_gb=0.5, progress=False)
    assert not (tmp_path / "ar").exists()


# ----------------------------------------------------------------------- through the launcher: torchrun, 2 ranks
CAP_GB = 0.1  # a run of the ci model at batch 8 needs ~10 MB of tensors and ~20-30 MB of allocator and threads
RUN = dict(max_steps=2, warmup_steps=1, eval_interval=0, checkpoint_interval=0)


@pytest.mark.slow
def test_a_plan_over_the_cap_fails_with_the_cap_and_the_estimate_and_one_under_it_runs(tmp_path, monkeypatch,
                                                                                        ci_data):
    from labs_lib.jobs.launch import train_gpt

    monkeypatch.setenv("LABS_LAUNCHER", "torchrun")
    cfg, big_batch = get_profile("ci").model, 2048
    estimate_gb = cfg.n_layer * activation_bytes_formula(cfg, big_batch) / 1e9  # the blocks alone: ~1.1 GB
    assert estimate_gb > 10 * CAP_GB
    with pytest.raises(LaunchError) as failure:
        train_gpt(tmp_path / "big", nodes=1, nproc_per_node=2, profile="ci", progress=False, batch_size=big_batch,
                  memory_cap_gb=CAP_GB, memory_estimate_gb=estimate_gb, **RUN)
    message = str(failure.value)
    assert (f"needs more than the {CAP_GB:.2f} GB memory cap (the planner estimated {estimate_gb:.2f} GB per rank "
            "for this plan)") in message, message
    assert "OutOfMemoryError: out of memory: rank " in message
    records = train_gpt(tmp_path / "small", nodes=1, nproc_per_node=2, profile="ci", progress=False, batch_size=8,
                        memory_cap_gb=CAP_GB, memory_estimate_gb=0.01, **RUN)
    assert [r["step"] for r in records] == [1, 2]

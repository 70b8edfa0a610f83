"""The pipeline job (labs_lib.train.pipeline_job) as lab 05 drives it (labs_lib.labs.lab05, through the launcher):
ranks writing per-rank files and rank 0 writing metrics.jsonl.

* 1F1B and interleaved 1F1B on 2 ranks give the losses of the same steps on one process (reference mode);
* every rank's file holds its layout, a timeline of each step, the idle fraction and the activation peaks;
* metrics.jsonl holds one record per step (the progress bar's), with those per-step fields;
* torch.distributed.pipelining's 1F1B over the same stages (impl="torch") does too;
* a bad layout raises ``ValueError`` naming the fix before any process starts.
"""

import subprocess

import matplotlib.pyplot as plt
import pytest

from labs_lib.core.runs import read_metrics
from labs_lib.labs import plots
from labs_lib.labs.lab05 import measured_bubble, order, read_results, run, run_reference
from labs_lib.train.pipeline_job import check_args

STEPS, N_LAYER = 3, 4


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ci_data):
    return run_reference(tmp_path_factory.mktemp("ref"), steps=STEPS, profile="ci", progress=False, n_layer=N_LAYER)


@pytest.mark.slow
@pytest.mark.parametrize("schedule, m, v", [("1f1b", 4, 1), ("interleaved", 4, 2)])
def test_pipeline_job_matches_one_process(tmp_path, reference, schedule, m, v):
    results = run(tmp_path / "pp", pp=2, micro_batches=m, schedule=schedule, steps=STEPS, profile="ci",
                  progress=False, n_layer=N_LAYER)
    assert [r["rank"] for r in results] == [0, 1]
    assert sorted(p.name for p in (tmp_path / "pp").glob("pipeline_rank*.json")) == ["pipeline_rank0.json",
                                                                                     "pipeline_rank1.json"]
    assert len(reference["losses"]) == STEPS
    for r in results:
        assert r["losses"] == pytest.approx(reference["losses"], abs=1e-5), r["rank"]
        assert r["chunks"] == v and len(r["per_step"]) == STEPS and 2 <= r["shown_step"] <= STEPS
        # Each rank computes every (chunk, micro-batch) once forward and once backward per step.
        assert sorted(order(r)) == sorted(f"{k}{i}" + "'" * c for k in "FB" for i in range(m) for c in range(v))
        assert 0 <= r["idle_fraction"] < 1 and r["peak_activation_bytes"] > 0
    # Layers split evenly over the v·p virtual stages; the first holds the embeddings, the last the head.
    stages = sorted((s for r in results for s in r["stages"]), key=lambda s: s["stage_index"])
    assert [s["layers"] for s in stages] == [list(range(i, i + N_LAYER // (2 * v)))
                                            for i in range(0, N_LAYER, N_LAYER // (2 * v))]
    assert stages[0]["modules"] == ["tok_emb", "pos_emb"] and stages[-1]["modules"] == ["ln_f", "lm_head"]
    if schedule == "1f1b":  # stage r keeps p − r micro-batches
        assert [r["peak_in_flight"] for r in results] == [2, 1]
        assert order(results[1]) == [f"{k}{i}" for i in range(m) for k in "FB"]
    assert 0 <= measured_bubble(results) < 1
    assert read_results(tmp_path / "pp") == results
    records = read_metrics(tmp_path / "pp")  # rank 0's steps
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in records] == results[0]["losses"]
    for record, step in zip(records, results[0]["per_step"]):
        assert {"step_time_s", "tokens_per_s", "idle_fraction", "peak_in_flight", "peak_activation_bytes"} <= set(
            record)
        assert step == record | {"timeline": step["timeline"]}

    # The lab's figures draw from these results.
    axes = plots.plot_pipeline_timelines(results, results)
    assert len(axes) == 2 and len(axes[0].collections) == sum(len(r["timeline"]) for r in results)
    plots.plot_bubble({m: measured_bubble(results)}, pp=2, chunks=v)
    peak = {m: results[0]["peak_in_flight"]}
    mb = {m: results[0]["peak_activation_bytes"] / 1e6}
    plots.plot_pipeline_memory({"gpipe": peak, "1f1b": peak}, {"gpipe": mb, "1f1b": mb}, pp=2)
    plt.close("all")


@pytest.mark.slow
def test_torch_pipelining_job_matches_one_process(tmp_path, reference):
    """impl="torch": torch.distributed.pipelining's Schedule1F1B over the same stages, the production comparison."""
    results = run(tmp_path / "torch", pp=2, micro_batches=4, schedule="1f1b", steps=STEPS, profile="ci",
                  progress=False, n_layer=N_LAYER, impl="torch")
    for r in results:
        assert r["impl"] == "torch" and r["timeline"] == []
        assert r["losses"] == pytest.approx(reference["losses"], abs=1e-5), r["rank"]


@pytest.mark.parametrize("settings, fix", [
    (dict(pp=3, micro_batches=4, n_layer=4), "choose pp among the divisors of n_layer"),
    (dict(pp=2, micro_batches=1, schedule="1f1b"), "raise --micro-batches to at least 2"),
    (dict(pp=2, micro_batches=3, schedule="gpipe"), "divisors of the batch size"),
    (dict(pp=2, micro_batches=2, schedule="zero-bubble"), "bad arguments"),
    (dict(pp=2, micro_batches=4, schedule="interleaved", n_layer=2), "not divisible by pp\\*chunks=4"),
    (dict(pp=2, micro_batches=2, steps=0), "--steps must be >= 1"),
])
def test_bad_config_raises_before_spawning(tmp_path, monkeypatch, settings, fix):
    def no_process(*args, **kwargs):
        raise AssertionError("a process was started for a bad configuration")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    with pytest.raises(ValueError, match=fix):
        run(tmp_path / "bad", profile="ci", progress=False, **settings)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("argv, world_size, fix", [
    (["--pp", "2", "--micro-batches", "2"], 4, "--pp 2 needs one process per stage, not 4"),
    (["--reference"], 2, "--reference runs on one process, not 2"),
])
def test_check_args_wants_one_process_per_stage(argv, world_size, fix):
    with pytest.raises(ValueError, match=fix):
        check_args(["--out", "unused", "--profile", "ci", *argv], world_size)
    assert check_args(["--out", "unused", "--profile", "ci", "--steps", "5", *argv], 1 if "--reference" in argv
                      else 2) == 5

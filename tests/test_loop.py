"""labs_lib.train.loop.run_loop, the one training loop: records, cadence, and nothing left open when a step fails."""

import json

import pytest
import torch

from labs_lib.train.loop import Loop, run_loop


class Recorder:
    def __init__(self):
        self.entered = self.exited = False
        self.steps = 0

    def __enter__(self):
        self.entered = True
        return self

    def __exit__(self, *exc):
        self.exited = True

    def step(self):
        self.steps += 1


def test_records_cadence_and_metrics_file(tmp_path):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    saved, evaluated, prof = [], [], Recorder()
    records = run_loop(lambda step: {"loss": float(step), "grad_norm": 0.5, "extra": step}, Loop(
        out=tmp_path, max_steps=6, samples_per_step=100, start=1, log_every=1, eval_every=2, checkpoint_every=4,
        progress=False), optimizer=optimizer, lr_of=lambda step: step / 10,
        evaluate=lambda step: evaluated.append(step) or {"val_loss": -step}, save=saved.append, profiler=prof)
    assert [r["step"] for r in records] == [2, 3, 4, 5, 6]
    assert saved == [4, 6] and evaluated == [2, 4, 6]  # the cadence, and always the last step
    assert records[0]["lr"] == pytest.approx(0.2) and records[0]["tokens"] == 200 and records[0]["extra"] == 2
    assert records[-1]["val_loss"] == -6 and "val_loss" not in records[1]
    assert prof.steps == 5 and prof.exited
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == records


def test_one_record_per_log_window_averages_its_steps(tmp_path):
    records = run_loop(lambda step: {"loss": float(step)}, Loop(out=tmp_path, max_steps=6, samples_per_step=10,
                                                                 unit="images", log_every=3, progress=False))
    assert [(r["step"], r["loss"]) for r in records] == [(3, 2.0), (6, 5.0)]
    assert records[0]["images"] == 30 and records[0]["images_per_s"] > 0 and records[0]["lr"] is None


def test_a_failing_step_closes_the_profiler_and_keeps_what_was_written(tmp_path):
    prof = Recorder()

    def step(n):
        if n == 3:
            raise RuntimeError("boom")
        return {"loss": 1.0}

    with pytest.raises(RuntimeError, match="boom"):
        run_loop(step, Loop(out=tmp_path, max_steps=5, samples_per_step=1, progress=False), profiler=prof)
    assert prof.entered and prof.exited
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_record_fields_are_built_after_the_step_is_timed(tmp_path):
    """The collectives that only build a record (loss averaged over ranks, bytes gathered) are not the step's time."""
    import time

    def slow_fields(result):
        time.sleep(0.2)
        return {"loss": result}

    records = run_loop(lambda step: 1.5, Loop(out=tmp_path, max_steps=2, samples_per_step=1, progress=False),
                       record_fields=slow_fields)
    assert [r["loss"] for r in records] == [1.5, 1.5]
    assert all(r["step_time_s"] < 0.1 for r in records) and records[-1]["elapsed_s"] >= 0.4

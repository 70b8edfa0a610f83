"""TensorBoard (labs_lib.measure.tensorboard): every trainer's loop writes its metrics as event files that hold what
metrics.jsonl holds, a killed and resumed run shows each step once, and a real TensorBoard server on 127.0.0.1 serves
the run's scalars and, through the PyTorch Profiler plugin, its profiler trace."""

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from labs_lib.core.runs import read_metrics
from labs_lib.measure.tensorboard import read_scalars, scalars_of, serve

TRAIN = [sys.executable, "-m", "labs_lib.train", "--profile", "ci", "--no-progress", "--max-steps", "6",
         "--warmup-steps", "1", "--checkpoint-interval", "3"]


def train(out, *flags, env=None):
    import os

    subprocess.run([*TRAIN, "--out", str(out), *flags], check=env is None, capture_output=True, timeout=300,
                   env={**os.environ, **(env or {})})


def test_a_record_becomes_its_numbers_under_train_and_val():
    record = {"step": 3, "loss": 2.5, "val_loss": 2.75, "lr": 1e-3, "tokens_per_s": 900, "elapsed_s": 1.0,
              "mem_rank0": {"params": 10}, "grad_norm": None, "flag": True}
    assert scalars_of(record) == {"train/loss": 2.5, "val/loss": 2.75, "train/lr": 1e-3, "train/tokens_per_s": 900.0}


def test_events_hold_the_metrics_and_a_resumed_run_shows_each_step_once(tmp_path):
    out = tmp_path / "run"
    train(out, "--eval-interval", "3", env={"LABS_FAULT_KILL_AFTER_STEP": "4"})  # killed after step 4
    assert [step for step, _ in read_scalars(out)["train/loss"]] == [1, 2, 3, 4]  # flushed as it went
    train(out, "--eval-interval", "3", "--resume")  # from the step-3 checkpoint: steps 4-6 again
    scalars, records = read_scalars(out), read_metrics(out)
    assert len(list((out / "tensorboard").iterdir())) == 2
    assert scalars["train/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in records]
    assert [s for s, _ in scalars["train/lr"]] == [1, 2, 3, 4, 5, 6]
    assert scalars["val/loss"] == [(r["step"], pytest.approx(r["val_loss"])) for r in records if "val_loss" in r]


def get(url):
    return json.loads(urllib.request.urlopen(url, timeout=10).read())


def wait_for(fetch, timeout=60):
    deadline = time.monotonic() + timeout
    while not (value := fetch()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return value


def test_the_server_serves_the_scalars_and_the_profiler_trace_on_localhost(tmp_path):
    train(tmp_path / "traced", "--max-steps", "8", "--eval-interval", "0", "--trace-steps", "2")
    with serve(tmp_path) as server:
        assert server.url.startswith("http://127.0.0.1:")
        tags = wait_for(lambda: get(server.url + "/data/plugin/scalars/tags"))
        assert "train/loss" in tags["traced/tensorboard"]
        served = get(server.url + "/data/plugin/scalars/scalars?run=traced/tensorboard&tag=train/loss")
        assert [(step, value) for _, step, value in served] == [
            (r["step"], pytest.approx(r["loss"])) for r in read_metrics(tmp_path / "traced")]
        runs = wait_for(lambda: get(server.url + "/data/plugin/pytorch_profiler/runs")["runs"])
        assert runs == ["traced/trace"]
        workers = wait_for(lambda: get(server.url + "/data/plugin/pytorch_profiler/workers?run=traced/trace"
                                       "&view=Overview"))
        assert workers == ["rank0"]
    assert server.process.poll() is not None

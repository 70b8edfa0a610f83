"""labs_lib.jobs: run_child (a job as a child process) and launch (the one launcher every lab's job goes through)."""

import sys
import time

import pytest

from labs_lib.jobs.process import LaunchError, run_child


def test_a_failing_job_raises_with_its_exit_code_and_log_tail(tmp_path):
    polls = []
    cmd = [sys.executable, "-c", "import sys; print('step 1 ok'); print('boom: out of memory'); sys.exit(3)"]
    with pytest.raises(LaunchError) as failure:
        run_child(cmd, tmp_path / "job.log", lambda: polls.append(1), what="test")
    assert failure.value.returncode == 3
    assert "boom: out of memory" in failure.value.log_tail and "the test job failed" in str(failure.value)
    assert polls, "the progress callback runs at least once, after the job ends"


def test_a_job_past_its_time_limit_is_stopped(tmp_path):
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="ran past 1 s"):
        run_child([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "job.log", timeout_s=1)
    assert time.monotonic() - start < 20


def test_a_good_job_returns_and_logs_its_command(tmp_path):
    run_child([sys.executable, "-c", "print('hello from the child')"], tmp_path / "job.log")
    log = (tmp_path / "job.log").read_text()
    assert log.startswith("$ ") and "hello from the child" in log


def test_a_failed_jobs_error_names_the_first_error_above_the_tail(tmp_path):
    script = ("import sys; print('RuntimeError: rank 1 lost its peer'); "
              "[print(f'launcher report {i}') for i in range(40)]; sys.exit(1)")
    with pytest.raises(LaunchError) as failure:
        run_child([sys.executable, "-c", script], tmp_path / "job.log")
    assert "--- first error in the log ---\nRuntimeError: rank 1 lost its peer" in str(failure.value)
    assert "launcher report 39" in failure.value.log_tail


def test_exit_process_flushes_what_the_rank_wrote(tmp_path):
    """A rank leaves with exit_process (no interpreter teardown): its unflushed output and log records still land."""
    log_file = tmp_path / "rank.log"
    script = ("import logging, sys; from labs_lib.core.dist import exit_process; "
              f"logging.basicConfig(filename={str(log_file)!r}, level=logging.INFO); logging.info('saved step 5'); "
              "sys.stdout.write('no newline, not flushed'); sys.stderr.write('to stderr'); exit_process(); "
              "print('never reached')")
    run_child([sys.executable, "-c", script], tmp_path / "job.log")
    out = (tmp_path / "job.log").read_text().split("\n", 1)[1]  # after the echoed command
    assert "no newline, not flushed" in out and "to stderr" in out and "never reached" not in out
    assert "saved step 5" in log_file.read_text()


def test_launch_runs_a_job_module_and_reads_back_its_files(tmp_path, monkeypatch, capsys):
    """Without Slurm (LABS_LAUNCHER=torchrun) the same job runs on this machine, after a notice saying so."""
    from labs_lib.core.runs import read_json
    from labs_lib.jobs.launch import launch

    monkeypatch.setenv("LABS_LAUNCHER", "torchrun")
    (tmp_path / "ar").mkdir()
    (tmp_path / "ar" / "stale.json").write_text("{}")
    launch("labs_lib.core.dist", [], tmp_path / "ar", nodes=1, nproc_per_node=2, progress=False, timeout_s=120)
    result = read_json(tmp_path / "ar" / "allreduce.json")
    assert result["ok"] and result["world_size"] == 2 and result["sum"] == 3.0 and len(result["ranks"]) == 2
    assert not (tmp_path / "ar" / "stale.json").exists(), "a new run starts in an empty folder"
    assert "torchrun" in capsys.readouterr().out and (tmp_path / "ar" / "job.log").exists()


def test_launch_refuses_a_bad_configuration_before_anything_starts(tmp_path):
    from labs_lib.jobs.launch import launch

    with pytest.raises(ValueError, match="--backend nccl needs CUDA"):
        launch("labs_lib.core.dist", ["--backend", "nccl"], tmp_path / "bad", nodes=1, nproc_per_node=2)
    with pytest.raises(ValueError, match="bad arguments"):
        launch("labs_lib.train.gpt", ["--no-such-flag"], tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_launch_of_a_failing_job_raises_with_the_first_error(tmp_path, monkeypatch):
    from labs_lib.jobs.launch import train_gpt

    monkeypatch.setenv("LABS_LAUNCHER", "torchrun")
    monkeypatch.setenv("LABS_FAULT_KILL_AFTER_STEP", "1")  # a real SIGKILL of the rank after its first step
    with pytest.raises(LaunchError) as failure:
        train_gpt(tmp_path / "run", nodes=1, nproc_per_node=1, profile="ci", max_steps=3, warmup_steps=1,
                  eval_interval=0, progress=False)
    assert failure.value.returncode != 0 and "job.log" in str(failure.value)

"""labs_lib.launch.run_child: the one way the notebooks run a job as a child process."""

import sys
import time

import pytest

from labs_lib.launch import LaunchError, run_child


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
    script = ("import logging, sys; from labs_lib.dist import exit_process; "
              f"logging.basicConfig(filename={str(log_file)!r}, level=logging.INFO); logging.info('saved step 5'); "
              "sys.stdout.write('no newline, not flushed'); sys.stderr.write('to stderr'); exit_process(); "
              "print('never reached')")
    run_child([sys.executable, "-c", script], tmp_path / "job.log")
    out = (tmp_path / "job.log").read_text().split("\n", 1)[1]  # after the echoed command
    assert "no newline, not flushed" in out and "to stderr" in out and "never reached" not in out
    assert "saved step 5" in log_file.read_text()

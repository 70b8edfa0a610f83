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

"""The real Slurm path: the local 2-node cluster, jobs on it, and what a notebook sees of failures and cancels.

The session fixture starts the cluster (slurm/local/up.sh; on a fresh root machine it installs Slurm first). Only
when Slurm cannot be installed here (exit code 3) and CI is not set are these tests skipped; under CI they fail.
"""

import os
import subprocess
import time

import pytest

from labs_lib import slurm

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="session")
def cluster():
    try:
        kind = slurm.ensure_local_cluster(quiet=True)
    except slurm.SlurmUnavailable as e:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must have Slurm: {e}")
        pytest.skip(f"Slurm unavailable: {e}")
    return kind


def wait_for(job, state, timeout=60):
    deadline = time.monotonic() + timeout
    while (now := job.state) != state:
        assert now in ("PENDING", "CONFIGURING"), f"job {job.id} is {now}, waiting for {state}"
        assert time.monotonic() < deadline, f"job {job.id} still {now} after {timeout} s"
        time.sleep(0.2)


def script(tmp_path, body: str):
    path = tmp_path / "job.sbatch"
    path.write_text("#!/usr/bin/env bash\n" + body)
    return path


def test_two_idle_nodes(cluster):
    if cluster != "local":
        pytest.skip("a site cluster: its nodes are its own")
    nodes = subprocess.run(["sinfo", "-h", "-N", "-p", "cpu", "-o", "%N %T"], capture_output=True, text=True,
                           check=True).stdout.split("\n")
    assert sorted(filter(None, nodes)) == ["node1 idle", "node2 idle"]


def test_up_is_idempotent(cluster):
    if cluster != "local":
        pytest.skip("a site cluster")
    pids = {p.name: p.read_text() for p in (slurm.build_dir() / "slurm" / "pids").glob("*.pid")}
    start = time.monotonic()
    again = subprocess.run(["bash", str(slurm.UP_SCRIPT)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("already running") == 4, again.stderr
    assert time.monotonic() - start < 10
    assert {p.name: p.read_text() for p in (slurm.build_dir() / "slurm" / "pids").glob("*.pid")} == pids


def test_allreduce_two_nodes(cluster):
    job = slurm.submit("allreduce.sbatch")
    assert job.wait(timeout=120, progress=False) == ("COMPLETED", 0)
    log = job.log_path.read_text()
    assert log.count("all_reduce(sum of rank+1)=10 expected=10") == 4, log
    assert "all-reduce OK across 4 process(es)" in log
    assert {line.split("node=")[1].split()[0] for line in log.splitlines() if "node=" in line} == {"node1", "node2"}
    assert job.state == "COMPLETED"


def test_failing_job_raises_with_log_tail(cluster, tmp_path):
    job = slurm.submit(script(tmp_path, 'echo "about to fail on $SLURMD_NODENAME"\nexit 7\n'), nodes=1,
                       job_name="fails")
    with pytest.raises(slurm.JobFailed) as failed:
        job.wait(timeout=60, progress=False)
    assert not isinstance(failed.value, slurm.JobCancelled)
    assert failed.value.state == "FAILED" and failed.value.exit_code == 7
    assert "about to fail on node1" in failed.value.log_tail and "about to fail" in str(failed.value)
    assert job.log_path.name == f"fails-{job.id}.out"


def test_env_and_args_reach_the_job(cluster, tmp_path):
    job = slurm.submit(script(tmp_path, 'echo "args=$* greeting=$GREETING"\n'), "a", "b c", GREETING="hello")
    job.wait(timeout=60, progress=False)
    assert "args=a b c greeting=hello" in job.tail()
    with pytest.raises(TypeError, match="upper case"):
        slurm.submit("allreduce.sbatch", node=2)


def test_cancel_is_reported(cluster, tmp_path):
    job = slurm.submit(script(tmp_path, "echo started\nsleep 60\n"), nodes=1)
    wait_for(job, "RUNNING")
    job.cancel()
    start = time.monotonic()
    with pytest.raises(slurm.JobCancelled) as cancelled:
        job.wait(timeout=60, progress=False)
    assert time.monotonic() - start < 30
    assert cancelled.value.state == job.state == "CANCELLED"
    assert "cancelled" in str(cancelled.value).lower()


def test_state_from_accounting(cluster, tmp_path):
    """After MinJobAge the controller forgets a finished job; its state then comes from sacct (-c locally)."""
    job = slurm.submit(script(tmp_path, "exit 3\n"), nodes=1)
    with pytest.raises(slurm.JobFailed):
        job.wait(timeout=60, progress=False)
    assert job._accounting() == ("FAILED", 3)

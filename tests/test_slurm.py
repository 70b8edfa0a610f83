"""The real Slurm path: the local 2-node cluster, jobs on it, and what a notebook sees of failures and cancels.

The session fixture starts the cluster (slurm/local/up.sh; on a fresh root machine it installs Slurm first). Only
when Slurm cannot be installed here (exit code 3) and CI is not set are these tests skipped; under CI they fail.
"""

import json
import os
import subprocess
import time

import pytest
import torch

from labs_lib.core import checkpoint
from labs_lib.core.runs import read_metrics
from labs_lib.jobs import slurm
from labs_lib.jobs.process import failure_report, first_error

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


def test_up_refuses_ports_another_cluster_holds(cluster, tmp_path):
    """A second checkout's up.sh (its own build folder) on this cluster's ports fails before starting anything, and
    says how out: otherwise its sinfo and sbatch would quietly talk to this cluster."""
    if cluster != "local":
        pytest.skip("a site cluster")
    port = os.environ.get("LABS_SLURM_PORT", "16817")
    other = subprocess.run(["bash", str(slurm.UP_SCRIPT)], capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, LABS_BUILD_DIR=str(tmp_path / "other")))
    assert other.returncode == 1, other.stderr
    assert f"port {port} (slurmctld), {int(port) + 1} (slurmd node1)" in other.stderr, other.stderr
    assert "slurm/local/down.sh" in other.stderr and f"LABS_SLURM_PORT={int(port) + 100}" in other.stderr
    assert not list((tmp_path / "other" / "slurm" / "pids").glob("*.pid")), "it started a daemon"


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


def test_ranks_on_simulated_nodes_share_the_hosts_cores(cluster, tmp_path):
    """The two simulated nodes are one host: a job of 2 nodes x 1 rank must split its cores, not run 2 threads
    per rank on 2 cores (each node's LOCAL_WORLD_SIZE is 1; oversubscribed, steps ran ~2x slower)."""
    from labs_lib.core.runs import read_json
    from labs_lib.jobs.launch import launch

    launch("labs_lib.core.dist", [], tmp_path / "ar", nodes=2, nproc_per_node=1, progress=False, timeout_s=120)
    ranks = read_json(tmp_path / "ar" / "allreduce.json")["ranks"]
    assert {r["node"] for r in ranks} == {"node1", "node2"}
    assert all(r["threads"] >= 1 for r in ranks)
    assert sum(r["threads"] for r in ranks) <= max(len(os.sched_getaffinity(0)), len(ranks)), ranks
    # ... and each saw its group's wire: gloo's TCP connection to the other rank, not the rendezvous store's
    assert [(r["transport"], r["connections"]) for r in ranks] == [("TCP", 1), ("TCP", 1)], ranks


def test_failing_job_raises_with_log_tail_and_first_error(cluster, tmp_path):
    body = ('echo "ValueError: bad batch size on $SLURMD_NODENAME"\n'
            'for i in $(seq 30); do echo "launcher noise $i"; done\n'
            'echo "about to fail on $SLURMD_NODENAME"\nexit 7\n')
    job = slurm.submit(script(tmp_path, body), nodes=1, job_name="fails")
    with pytest.raises(slurm.JobFailed) as failed:
        job.wait(timeout=60, progress=False)
    assert not isinstance(failed.value, slurm.JobCancelled)
    assert failed.value.state == "FAILED" and failed.value.exit_code == 7
    assert "about to fail on node1" in failed.value.log_tail and "about to fail" in str(failed.value)
    # the cause, 30 lines above the tail, is in the message too
    assert "--- first error in the log ---\nValueError: bad batch size on node1" in str(failed.value)
    assert job.log_path.name == f"fails-{job.id}.out"


# From a two-node DeepSpeed job whose rank 1 aborted at exit: the launchers' reports fill the tail.
ABORTED_RANK_LOG = """0: done: final test accuracy 96.39%; metrics in runs/lab06_vit/metrics.jsonl
1: terminate called without an active exception
1: E1126 03:38:13.475000 674 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: -6)
1: Traceback (most recent call last):
1:   File "torch/distributed/launcher/api.py", line 383, in launch_agent
1: torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
0: torch.distributed.elastic.multiprocessing.api.SignalException: Process 673 got signal: 15
srun: error: node1: task 0: Exited with exit code 1"""


@pytest.mark.parametrize("log, expected", [
    (ABORTED_RANK_LOG, "1: terminate called without an active exception"),
    ("step 1\nTraceback (most recent call last):\n  File \"x.py\", line 3, in <module>\n    raise ValueError(\"no\")\n"
     "ValueError: tp=3 does not divide n_head=4\n", "ValueError: tp=3 does not divide n_head=4"),
    ("0: [rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB\n",
     "0: [rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB"),
    ("sbatch: error: Batch job submission failed: Invalid partition name specified\n",
     "sbatch: error: Batch job submission failed: Invalid partition name specified"),
    ("epoch 1 loss 2.0\nepoch 2 loss 1.5\n", ""),
])
def test_first_error_finds_the_cause(log, expected):
    assert first_error(log) == expected


def test_failure_report_adds_the_first_error_only_when_the_tail_lacks_it():
    report = failure_report(ABORTED_RANK_LOG, n=3)
    assert report.startswith("--- first error in the log ---\n1: terminate called without an active exception\n")
    assert report.endswith("srun: error: node1: task 0: Exited with exit code 1")
    assert "first error" not in failure_report(ABORTED_RANK_LOG, n=20)


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


# Training through slurm/train_gpt.sbatch: 2 nodes x 2 ranks (srun + torchrun), profile ci. Long enough (~5 s of
# steps) that the cancel test's scancel, sent at the first checkpoint, lands well before the end.
STEPS = 150
TRAIN_ARGS = ("--max-steps", str(STEPS), "--checkpoint-interval", "10", "--eval-interval", "0")


def losses(out):
    return torch.tensor([r["loss"] for r in read_metrics(out)], dtype=torch.float64)


@pytest.fixture(scope="module")
def straight_run(cluster, ci_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("slurm_train") / "straight"
    job = slurm.submit("train_gpt.sbatch", *TRAIN_ARGS, OUT=out)
    job.wait(timeout=600, progress=False)
    return out, job


@pytest.mark.slow
def test_train_two_nodes(straight_run):
    out, job = straight_run
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records[-1]["loss"] < records[0]["loss"] - 1.0, "the loss must fall"
    assert json.loads((out / "config.json").read_text())["world_size"] == 4
    assert "2 nodes (node[1-2]) x 2 ranks" in job.log_path.read_text()


@pytest.mark.slow
def test_bad_training_config_fails_fast(cluster, tmp_path):
    start = time.monotonic()
    job = slurm.submit("train_gpt.sbatch", "--n-head", "3", OUT=tmp_path / "bad")
    with pytest.raises(slurm.JobFailed) as failed:
        job.wait(timeout=120, progress=False)
    assert time.monotonic() - start < 60
    assert failed.value.state == "FAILED" and failed.value.exit_code == 1
    assert "invalid configuration:" in failed.value.log_tail and "n_head=3" in failed.value.log_tail


@pytest.mark.slow
def test_cancel_and_resubmit_resumes(cluster, ci_data, tmp_path):
    """scancel after the first checkpoint, submit again with the same OUT: the run ends exactly as a straight one.

    One flat gradient all-reduce (--no-ddp-overlap) makes the comparison bitwise. With DDP's overlapped buckets the
    losses differ from the step after the resume on (measured 5e-7, growing to 1e-3 by step 150): DDP regroups its
    buckets after a process's first step, so the resumed run's first step sums gradients in other groups."""
    args = (*TRAIN_ARGS, "--no-ddp-overlap")
    straight = slurm.submit("train_gpt.sbatch", *args, OUT=tmp_path / "straight")
    out = tmp_path / "run"
    job = slurm.submit("train_gpt.sbatch", *args, OUT=out)
    deadline = time.monotonic() + 300
    while checkpoint.latest_checkpoint(out / "checkpoints") is None:
        assert job.state in ("PENDING", "CONFIGURING", "RUNNING"), job.tail()
        assert time.monotonic() < deadline, "no checkpoint after 5 minutes"
        time.sleep(0.2)
    job.cancel()
    with pytest.raises(slurm.JobCancelled):
        job.wait(timeout=60, progress=False)
    assert read_metrics(out)[-1]["step"] < STEPS, "the job finished before it was cancelled: make it longer"

    again = slurm.submit("train_gpt.sbatch", *args, OUT=out)
    again.wait(timeout=600, progress=False)
    straight.wait(timeout=600, progress=False)
    assert "resuming" in again.log_path.read_text()
    assert [r["step"] for r in read_metrics(out)] == list(range(1, STEPS + 1))
    assert torch.equal(losses(out), losses(tmp_path / "straight"))

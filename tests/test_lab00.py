"""Lab 00's new parts: the job-script exercise checked by running the learner's script on the cluster, NCCL's
transport read from its INFO lines, and the topology text (tests/test_slurm.py checks gloo's transport report)."""

import os

import pytest

from labs_lib.jobs.launch import use_slurm
from labs_lib.labs import lab00

SCRIPT = """#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=2
#SBATCH --time=00:01:00
srun bash -c 'echo "task $SLURM_PROCID on $SLURMD_NODENAME"'
"""

# NCCL_DEBUG=INFO lines as NCCL 2.x prints them, with srun's --label prefix
NCCL_LOG = """\
0: node1:4242:4300 [0] NCCL INFO NET/IB : Using [0]mlx5_0:1/IB ; OOB ib0:10.0.0.1<0>
0: node1:4242:4300 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[1] via P2P/CUMEM/read
0: node1:4242:4300 [0] NCCL INFO Channel 00/0 : 3[1] -> 0[0] [receive] via NET/IB/0
1: node1:4243:4301 [1] NCCL INFO Channel 00/0 : 1[1] -> 2[0] [send] via NET/IB/0
1: node1:4243:4301 [1] NCCL INFO Channel 01/0 : 1[1] -> 2[0] [send] via NET/IB/0
0: node1:4242:4300 [0] NCCL INFO comm 0x5 rank 0 nRanks 4 nNodes 2 localRanks 2 localRank 0 MNNVL 0
"""


def test_nccl_transports_are_read_per_rank_from_the_log():
    assert lab00.nccl_transports(NCCL_LOG) == {0: ["NET/IB/0", "P2P/CUMEM/read"], 1: ["NET/IB/0"]}
    assert lab00.nccl_transports("no nccl here\n") == {}


def test_topology_names_the_gpus_links_or_the_cpus():
    text = lab00.topology()
    assert "GPU0" in text or "CPU(s):" in text


def test_a_job_script_is_checked_by_running_it(tmp_path, capsys):
    if not use_slurm(quiet=True) and os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        pytest.skip("no Slurm cluster here to run the script on")
    assert lab00.check_job_script(None, tmp_path / "none") is False
    assert "not answered yet" in capsys.readouterr().out
    assert lab00.check_job_script(SCRIPT, tmp_path / "good") is True
    with pytest.raises(AssertionError, match=r"1 'task \.\.\. on \.\.\.' line\(s\) on 1 node"):
        lab00.check_job_script(SCRIPT.replace("srun ", ""), tmp_path / "no_srun")  # one task, on the first node

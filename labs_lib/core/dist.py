"""Process-group setup that works the same under torchrun, under Slurm, and as one plain process.

    python -m labs_lib.core.dist                                   # one process: prints the all-reduce check
    python -m labs_lib.core.dist --out build/runs/ar               # ... and writes build/runs/ar/allreduce.json
    python -m labs_lib.core.dist --backend nccl                    # a group of one: the NCCL path on a one-GPU machine
    torchrun --nproc-per-node=2 -m labs_lib.core.dist              # 2 processes, gloo on CPU / NCCL on GPU
    srun --nodes=2 --ntasks-per-node=2 python -m labs_lib.core.dist   # Slurm tasks mapped to ranks

Under Slurm without torchrun, ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID`` become the rank, world size
and local rank, and the head node's address comes from ``scontrol show node`` (simulated node names do not
resolve; real clusters' NodeAddr is their routable address).
"""

from __future__ import annotations

import builtins
import datetime
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from labs_lib.core.config import parse_job_args

# torch 2.13 renamed the flat-tensor collectives (the old names still work, with a FutureWarning; the package allows
# torch >= 2.4, which has only those): one name for each, whichever torch runs.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 now (held together while chosen, so they differ): rendezvous
    endpoints and the local servers (Triton, TensorBoard)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None  # None: a single process, no process group
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


_info = DistInfo()


def _slurm_head_address() -> str:
    nodelist = os.environ["SLURM_JOB_NODELIST"]
    head = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                          check=True).stdout.split()[0]
    node = subprocess.run(["scontrol", "show", "node", head], capture_output=True, text=True, check=True).stdout
    for token in node.split():
        if token.startswith("NodeAddr="):
            return token.split("=", 1)[1]
    return head


def _env_from_slurm() -> None:
    """Fill torchrun's variables from Slurm's when the script was started by ``srun`` directly."""
    os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
    os.environ.setdefault("WORLD_SIZE", os.environ["SLURM_NTASKS"])
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    tasks_per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0] or "1"
    os.environ.setdefault("LOCAL_WORLD_SIZE", tasks_per_node)
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = _slurm_head_address()
    # A port per job, so two jobs sharing a node do not collide.
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))


def init_distributed(backend: str | None = None, timeout_s: float = 300) -> DistInfo:
    """Join the process group described by the environment (torchrun, Slurm) or run as one process.

    The backend is NCCL when CUDA is available, else gloo. Each process binds to GPU ``LOCAL_RANK``. A single
    process joins a group of one only when ``backend`` is named (to exercise NCCL on a one-GPU machine).
    CPU threads are split between the processes on a host so that they do not oversubscribe its cores
    (:func:`_share_cores`), unless ``OMP_NUM_THREADS`` says otherwise.
    """
    global _info
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        _env_from_slurm()
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))

    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    if (world_size > 1 or backend) and not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), rank=rank,
                                world_size=world_size, device_id=device if backend == "nccl" else None)
    elif world_size == 1 and not dist.is_initialized():
        backend = None
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        _share_cores(_ranks_on_this_host() if dist.is_initialized() else local_world_size)
    _info = DistInfo(rank, world_size, local_rank, local_world_size, backend, device)
    return _info


def _ranks_on_this_host() -> int:
    """How many ranks of the job run on this machine: the local cluster's simulated nodes are one host, so a job of
    2 nodes x 1 rank has 2 processes on its cores though each node's LOCAL_WORLD_SIZE is 1."""
    hosts = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    return hosts.count(socket.gethostname())


def _share_cores(processes: int) -> None:
    """One equal share of this process's cores per process on the host (2 ranks on 2 cores: one thread each;
    oversubscribed, every matmul and every gloo hop waits for a core)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // max(processes, 1)))


def cleanup() -> None:
    """Leave the process group cleanly (a barrier first, so no rank exits while others still talk)."""
    global _info
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _info = DistInfo()


def exit_process() -> None:
    """End a rank process whose work is done and whose group is left: flush, then exit without the interpreter's
    teardown. Only for a job's rank, after its ``main()`` (``if __name__ == "__main__"``), never in a notebook.

    Process groups outlive ``destroy_process_group`` while something still holds them: here a GPT run keeps the
    default group's two gloo worker threads running to the end, a DeepSpeed run four (its engine, ZeRO optimizer and
    parameters hold their groups). When Python then finalizes, a worker thread that frees a tensor needs the GIL of an
    interpreter that is going away, and the process aborts ("terminate called without an active exception",
    SIGABRT): about one two-node DeepSpeed job in 80 on the local cluster, a finished run that srun and torchrun
    report as failed. Every result is written by now, so skip the teardown."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def print0(*args, **kwargs) -> None:
    """``print`` on rank 0 only."""
    if _info.is_main:
        builtins.print(*args, **kwargs, flush=True)


def print_all(*args, **kwargs) -> None:
    """``print`` on every rank, prefixed with the rank."""
    builtins.print(f"[rank {_info.rank}/{_info.world_size}]", *args, **kwargs, flush=True)


@torch.no_grad()
def all_reduce_flat_(tensors: list[torch.Tensor], group=None, divide_by: int = 1) -> None:
    """Sum ``tensors`` over ``group`` in place in one flat all-reduce (one latency, not one per tensor), then divide
    them by ``divide_by`` (the ranks, for a mean)."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    if divide_by != 1:
        flat /= divide_by
    for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(chunk.view_as(t))


def all_reduce_mean(value: float | torch.Tensor) -> float:
    """Mean of a scalar over all ranks (a plain float back); the value itself on one process."""
    t = torch.as_tensor(value, dtype=torch.float64, device=_info.device).detach().clone()
    if _info.distributed:
        dist.all_reduce(t)
        t /= _info.world_size
    return t.item()


def build_parser():
    import argparse

    p = argparse.ArgumentParser(prog="python -m labs_lib.core.dist",
                                description="All-reduce check: every rank contributes rank+1; all must see "
                                            "world*(world+1)/2.")
    p.add_argument("--backend", choices=("nccl", "gloo"), help="force a backend (also for a single process)")
    p.add_argument("--out", help="folder for allreduce.json: the sum, the expected sum, every rank's host "
                                           "and threads")
    p.add_argument("--no-progress", action="store_true", help="accepted like every job module's (no bar here)")
    return p


def check_args(argv: list[str], world_size: int) -> None:
    """The pre-launch check (labs_lib.jobs.launch): the flags parse and a backend named is usable here."""
    args = parse_job_args(build_parser(), argv)
    if args.backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("--backend nccl needs CUDA GPUs: drop --backend (gloo on CPU)")
    if world_size < 1:
        raise ValueError(f"the all-reduce needs at least one rank, got {world_size}")


def gloo_transport() -> dict:
    """What gloo's process group talks over, seen from this process's open sockets (call it after a collective):
    the transport (TCP: torch's gloo on Linux), the local interface and address, and the peers' addresses. The
    rendezvous store's connections (MASTER_PORT) are not the group's."""
    import psutil

    store = int(os.environ.get("MASTER_PORT", 0))
    pairs = [c for c in psutil.Process().net_connections(kind="tcp") if c.status == psutil.CONN_ESTABLISHED
             and c.raddr and store not in (c.laddr.port, c.raddr.port)]
    local = sorted({c.laddr.ip.removeprefix("::ffff:") for c in pairs})
    names = {a.address: name for name, addrs in psutil.net_if_addrs().items() for a in addrs}
    return {"transport": os.environ.get("GLOO_DEVICE_TRANSPORT", "TCP").upper(),
            "interface": ",".join(sorted({names.get(ip, "?") for ip in local})) or "-",
            "address": ",".join(local) or "-", "connections": len(pairs),
            "peers": ",".join(sorted({c.raddr.ip.removeprefix("::ffff:") for c in pairs})) or "-"}


def main(argv: list[str] | None = None) -> None:
    import socket

    args = build_parser().parse_args(argv)
    os.environ.setdefault("NCCL_DEBUG", "INFO")  # NCCL names the transport of every channel in the job's log
    os.environ.setdefault("NCCL_DEBUG_SUBSYS", "INIT,NET")
    info = init_distributed(args.backend)
    t = torch.tensor([float(info.rank + 1)], device=info.device)
    if info.distributed:
        dist.all_reduce(t)
    expected = info.world_size * (info.world_size + 1) / 2
    me = {"rank": info.rank, "host": socket.gethostname(), "node": os.environ.get("SLURMD_NODENAME", "-"),
          "backend": info.backend, "device": str(info.device), "threads": torch.get_num_threads(), "sum": t.item()}
    if info.distributed and info.backend == "gloo":
        me.update(gloo_transport())
    print_all(f"host={me['host']} node={me['node']} backend={info.backend} device={info.device} "
              f"all_reduce(sum of rank+1)={t.item():g} expected={expected:g}")
    ranks = [None] * info.world_size
    if info.distributed:
        dist.all_gather_object(ranks, me)
    else:
        ranks = [me]
    ok = all(r["sum"] == expected for r in ranks)
    if ok:
        print0(f"all-reduce OK across {info.world_size} process(es)")
    if args.out and info.is_main:
        from labs_lib.core.runs import write_json

        os.makedirs(args.out, exist_ok=True)
        write_json(os.path.join(args.out, "allreduce.json"),
                   {"world_size": info.world_size, "sum": t.item(), "expected": expected, "ok": ok, "ranks": ranks})
    cleanup()
    if not ok:
        raise SystemExit("all-reduce gave the wrong sum")


if __name__ == "__main__":
    main()
    exit_process()  # not the interpreter's teardown: leftover gloo threads can abort it

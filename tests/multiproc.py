"""Run a test function on N real gloo ranks (spawned processes) and collect what each rank returns.

    results = run_ranks(my_check, 2, arg)   # my_check(rank, world_size, arg) at module level of a test file

Each rank joins a fresh gloo process group on 127.0.0.1; a failure on any rank raises with that rank's traceback.
"""

from __future__ import annotations

import os
import queue as queue_lib
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue, release):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        dist.barrier()
        queue.put((rank, True, result))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    try:
        # Tensors travel through shared memory that this process serves: stay alive until the parent has them.
        release.wait(timeout=120)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 300) -> list:
    """``fn(rank, world_size, *args)`` on each of ``world_size`` gloo ranks; returns the results by rank."""
    ctx = mp.get_context("spawn")
    queue, release = ctx.Queue(), ctx.Event()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, release), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    while len(results) < world_size and not errors:
        try:
            rank, ok, payload = queue.get(timeout=1)
        except queue_lib.Empty:
            dead = [i for i, p in enumerate(procs) if not p.is_alive() and p.exitcode != 0]
            if dead or time.monotonic() > deadline:
                errors.append(f"rank(s) {dead} died (exit codes {[procs[i].exitcode for i in dead]})" if dead
                              else f"timed out after {timeout} s")
            continue
        if ok:
            results[rank] = payload
        else:
            errors.append(f"rank {rank}:\n{payload}")
    release.set()
    for p in procs:
        p.join(timeout=5 if errors else timeout)
        if p.is_alive():
            p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]

"""Run a test function on N real gloo ranks (spawned processes) and collect what each rank returns.

    results = run_ranks(my_check, 2, arg)   # my_check(rank, world_size, arg) at module level of a test file

Each rank joins a fresh gloo process group on 127.0.0.1; a failure on any rank raises with that rank's traceback.
Ranks are forked from a forkserver that imported torch once for the whole test session (a spawned rank spends ~1.5 s
of CPU importing torch: 4 ranks on 2 cores, ~4.5 s a call; forked, ~0.15 s). Like a spawned process, each rank gets
the caller's environment, working directory and sys.path of the moment it starts.
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


# Only imports that read no environment: the forkserver keeps what they did at its start for the whole session.
_CONTEXT = mp.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["torch", "torch.distributed", "torch.nn.functional", "numpy"])


def _worker(rank, world_size, port, fn, args, queue, release, environ):
    os.environ.clear()
    os.environ.update(environ)
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
    queue, release = _CONTEXT.Queue(), _CONTEXT.Event()
    port, environ = free_port(), dict(os.environ)
    procs = [_CONTEXT.Process(target=_worker, args=(r, world_size, port, fn, args, queue, release, environ),
                              daemon=True) for r in range(world_size)]
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

"""A memory cap per rank that plays the part of a GPU's memory: past it, an allocation is an out-of-memory error that
names the cap and the planner's estimate, the way CUDA's names the GPU's capacity.

    launch(..., memory_cap_gb=0.5, memory_estimate_gb=0.73)     # labs_lib.jobs.launch sets, for every rank:
    LABS_MEMORY_CAP_BYTES=500000000 LABS_MEMORY_ESTIMATE_BYTES=730000000
    with memory_cap(info.rank):   # each rank, after start-up (imports, process group, corpus): the cap starts
        train(...)                # an allocation past it raises OutOfMemoryError("out of memory: rank 0 needs ...")

How: ``setrlimit(RLIMIT_DATA, VmData now + cap)``. Since Linux 4.7 RLIMIT_DATA bounds the private writable memory
(VmData in /proc/self/status: the heap, anonymous mmaps, thread stacks), which is where torch's CPU allocator puts
tensors, and leaves out what is no "GPU memory": shared libraries and memory-mapped files (the token shards).
RLIMIT_AS would count those too, and every reservation glibc and the gloo threads make. The baseline is what the
process holds when the cap is set, plus ``torch._dynamo``, which torch.optim imports when the first optimizer is
built (about 800 modules, 70 MB of Python objects in every process). What the cap then counts is the run's
tensors (parameters, gradients, optimizer state, activations, communication buffers) and the allocator's and new
threads' overhead (tens of MB, measured: tests/test_memcap.py), as a GPU's memory also holds the CUDA context
and the caching allocator's slack. torch's "DefaultCPUAllocator: can't allocate memory" and Python's MemoryError
become :class:`OutOfMemoryError`; a C++ thread of its own (gloo's) that fails to allocate aborts the process instead.

Under Slurm the cap is this module's too: the local cluster runs with ``TaskPlugin=task/none``, which enforces no
``sbatch --mem``.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource

CAP_ENV = "LABS_MEMORY_CAP_BYTES"  # the cap each rank sets itself
ESTIMATE_ENV = "LABS_MEMORY_ESTIMATE_BYTES"  # the planner's estimate per rank, for the error message only
GB = 1e9

_FAILED_ALLOCATION = re.compile(r"can't allocate memory|Cannot allocate memory|std::bad_alloc|can't start new thread")


class OutOfMemoryError(MemoryError):
    """An allocation went past this rank's memory cap (torch.OutOfMemoryError's part, on CPU)."""


def cap_environment(cap_gb: float | None, estimate_gb: float | None = None) -> dict[str, str]:
    """The variables that give every rank of a job a cap of ``cap_gb`` GB (1e9 bytes), with the planner's
    ``estimate_gb`` for its error message; {} without a cap."""
    if cap_gb is None:
        if estimate_gb is not None:
            raise ValueError("memory_estimate_gb only goes into the message of a memory cap: give memory_cap_gb too")
        return {}
    for name, value in (("memory_cap_gb", cap_gb), ("memory_estimate_gb", estimate_gb)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be a positive number of GB, got {value!r}")
    env = {CAP_ENV: str(int(cap_gb * GB))}
    if estimate_gb is not None:
        env[ESTIMATE_ENV] = str(int(estimate_gb * GB))
    return env


def data_bytes() -> int:
    """This process's private writable memory (VmData), what RLIMIT_DATA bounds."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmData line: the memory cap needs Linux")


def is_allocation_failure(error: BaseException) -> bool:
    """True for the ways an allocation past the cap surfaces in Python: MemoryError, torch's allocator error."""
    return isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and
                                              bool(_FAILED_ALLOCATION.search(str(error))))


def _env_bytes(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def out_of_memory_message(rank: int, cap_bytes: int, estimate_bytes: int | None, error: BaseException,
                          in_use_bytes: int) -> str:
    """CUDA's kind of message: the cap, the planner's estimate, the allocation that failed, what was in use."""
    estimate = (f"the planner estimated {estimate_bytes / GB:.2f} GB per rank for this plan" if estimate_bytes
                else "no planner estimate was given")
    tried = re.search(r"allocate (\d+) bytes", str(error))
    attempt = f"tried to allocate {int(tried.group(1)) / GB:.3f} GB with " if tried else ""
    return (f"out of memory: rank {rank} needs more than the {cap_bytes / GB:.2f} GB memory cap ({estimate}); "
            f"{attempt}{in_use_bytes / GB:.3f} GB in use above the start-up baseline. Give each rank a larger cap "
            f"(memory_cap_gb, {CAP_ENV}) or choose a plan that needs less")


@contextlib.contextmanager
def memory_cap(rank: int, cap_bytes: int | None = None, estimate_bytes: int | None = None):
    """Inside the block, this process may allocate ``cap_bytes`` more than it holds now (default: $LABS_MEMORY_CAP_
    BYTES; neither: no cap, nothing changes); an allocation past that raises :class:`OutOfMemoryError` naming
    ``rank``, the cap and ``estimate_bytes`` (default $LABS_MEMORY_ESTIMATE_BYTES). The limit is lifted on exit."""
    cap_bytes = cap_bytes if cap_bytes is not None else _env_bytes(CAP_ENV)
    if cap_bytes is None:
        yield
        return
    estimate_bytes = estimate_bytes if estimate_bytes is not None else _env_bytes(ESTIMATE_ENV)
    import torch._dynamo  # noqa: F401  (part of every process's baseline: torch.optim imports it lazily)

    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    baseline = data_bytes()
    limit = baseline + cap_bytes
    if hard != resource.RLIM_INFINITY and limit > hard:
        raise ValueError(f"a memory cap of {cap_bytes / GB:.2f} GB goes past this process's hard RLIMIT_DATA of "
                         f"{(hard - baseline) / GB:.2f} GB above what it holds: choose a smaller cap")
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    try:
        yield
    except Exception as error:
        if not is_allocation_failure(error):
            raise
        in_use = data_bytes() - baseline  # before the failed frames let go of their tensors
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))  # room to build the message
        raise OutOfMemoryError(out_of_memory_message(rank, cap_bytes, estimate_bytes, error, in_use)) from None
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))

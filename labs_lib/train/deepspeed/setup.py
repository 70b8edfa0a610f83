"""Build DeepSpeed's CPU ops once, at setup time, so that no lab waits a minute for a compiler.

    python -m labs_lib.train.deepspeed.setup      # what `make setup` runs; prints what it built, skips what is cached

DeepSpeed installs from its sdist without compiled ops and JIT-compiles each one (with ninja and the C++ compiler)
the first time it is used, into ``$TORCH_EXTENSIONS_DIR/<op>/``. The labs use two:

    deepspeed_shm_comm   built by every ``deepspeed.init_distributed`` / ``deepspeed.initialize`` (26-70 s)
    cpu_adam             DeepSpeedCPUAdam, the optimizer of ZeRO-Offload (~45 s)

Without this step every fresh machine, and every rank racing for the same build lock, pays for both inside the
first training job. :func:`configure_environment` puts the cache in the project's build folder (the Makefile
exports the same) so that the setup's builds are the ones the jobs find.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from labs_lib.core.dist import free_ports
from labs_lib.core.paths import build_dir

OPS = ("deepspeed_shm_comm", "cpu_adam")


def configure_environment() -> Path:
    """Defaults for DeepSpeed on this project: CPU accelerator without a GPU, the op cache in build/, and the
    venv's ``ninja`` on PATH (torch looks for it there; a venv used without activation does not put it there).
    Call before ``import deepspeed``. Returns the op cache folder."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed warns while it guesses
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(build_dir() / "torch_extensions"))
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def is_cached(op: str) -> bool:
    """True when the op's shared library is already in the cache (a later load only checks it is up to date)."""
    folder = Path(os.environ.get("TORCH_EXTENSIONS_DIR", build_dir() / "torch_extensions")) / op
    return any(folder.glob(f"{op}*.so"))


def start():
    """Join (or make) the process group and hand it to DeepSpeed; returns ``(deepspeed, DistInfo)``.

    What every DeepSpeed trainer here does first: the environment above, quiet logs, and a group of one for a single
    plain process (DeepSpeed still wants a group)."""
    import warnings

    import torch

    from labs_lib.core.dist import init_distributed

    configure_environment()  # before import deepspeed: CPU accelerator, the op cache of `make setup`
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel("WARNING")  # DeepSpeed logs every setting at INFO, on every rank
    # DeepSpeed 0.19.8 calls collectives torch 2.13 renamed: one FutureWarning per call and rank, nothing to act on
    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.distributed\.\w+` is deprecated")
    info = init_distributed()
    if not info.distributed:
        os.environ.setdefault("MASTER_PORT", str(free_ports(1)[0]))
        info = init_distributed(backend="nccl" if torch.cuda.is_available() else "gloo")
    for name, value in (("RANK", info.rank), ("WORLD_SIZE", info.world_size), ("LOCAL_RANK", info.local_rank)):
        os.environ.setdefault(name, str(value))  # DeepSpeed's engine reads them (torchrun sets them, plain srun not)
    deepspeed.init_distributed(dist_backend=info.backend, verbose=False)  # wraps the group that exists
    return deepspeed, info


def _build_shm_comm() -> None:
    """A one-process ``deepspeed.init_distributed``: exactly what a training job does first (and builds)."""
    import deepspeed
    import torch.distributed as dist

    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_ports(1)[0]))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        dist.barrier()
        dist.destroy_process_group()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _build_cpu_adam() -> None:
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(4))])


def _used_here(op: str) -> bool:
    """Whether this machine's accelerator uses the op (a CUDA machine has no shm_comm: NCCL does the talking)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    name = {"deepspeed_shm_comm": "ShareMemCommBuilder", "cpu_adam": "CPUAdamBuilder"}[op]
    builder = get_accelerator().create_op_builder(name)
    return builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False)


def warm(ops: tuple[str, ...] = OPS, quiet: bool = False) -> dict[str, float | None]:
    """Build the ops not yet in the cache. Returns {op: seconds it took to build, or None when it was cached}."""
    cache = configure_environment()
    import logging

    import deepspeed  # noqa: F401  (imported after the environment is set)

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    builders = {"deepspeed_shm_comm": _build_shm_comm, "cpu_adam": _build_cpu_adam}
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    took: dict[str, float | None] = {}
    for op in ops:
        if not _used_here(op):
            say(f"deepspeed op {op}: not used with the {os.environ.get('DS_ACCELERATOR', 'detected')} accelerator")
            took[op] = None
            continue
        if is_cached(op):
            say(f"deepspeed op {op}: cached in {cache / op}")
            took[op] = None
            continue
        say(f"deepspeed op {op}: building into {cache / op} (once per machine, about a minute) ...")
        t0 = time.perf_counter()
        builders[op]()
        took[op] = time.perf_counter() - t0
        if not is_cached(op):
            raise RuntimeError(f"building the DeepSpeed op {op} left nothing in {cache / op}")
        say(f"deepspeed op {op}: built in {took[op]:.0f} s")
    return took


if __name__ == "__main__":
    warm()

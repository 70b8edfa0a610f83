"""Checkpoints of ``python -m labs_lib.train``: written by every rank at once, committed atomically, resumed safely.

    save_checkpoint(out, step, strategy, batches, meta, info, cfg)   # a collective: every rank calls it
    check_resumable(saved, parallel, cfg, world_size, path)          # before anything is written to the run folder

The weights are single-device whatever the layout (``python -m labs_lib.generate`` reads them with any);
optimizer state is saved per shard (ZeRO rank, or (pp, tp) place), so resuming needs the layout it was written
with: :func:`check_resumable` says which flags to resume with. ``LABS_FAULT_KILL_IN_CHECKPOINT=N`` SIGKILLs
rank 0 while it writes the checkpoint of step N, before the commit (the resume tests' real kill; the previous
checkpoint survives).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch.distributed as dist

from labs_lib.core import checkpoint
from labs_lib.core.config import ParallelConfig, TrainConfig
from labs_lib.core.dist import DistInfo

KILL_IN_CHECKPOINT = "LABS_FAULT_KILL_IN_CHECKPOINT"


def check_resumable(saved: dict, parallel: ParallelConfig, cfg: TrainConfig, world_size: int, path: Path) -> None:
    """Raise ValueError naming the flags to resume with when the checkpoint's optimizer shards (``saved``: its
    meta.json) were written for another TP/PP/EP layout or another ZeRO stage or number of ZeRO ranks."""
    keys = ("tp", "pp", "pp_chunks", "ep")
    was = {k: saved.get("parallel", {}).get(k, 1) for k in keys}
    now = {k: getattr(parallel, k) for k in keys}
    readable = "(its weights are single-device: python -m labs_lib.generate reads them anyway)"
    if was != now:
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in was.items())
        raise ValueError(f"{path} was written with {was}, this run has {now}: resume with {flags} {readable}")
    was_stage, was_world = saved.get("train", {}).get("zero_stage", 0), saved.get("world_size")
    if now["ep"] > 1 and was_world != world_size:  # each rank saved its own experts' optimizer state
        raise ValueError(f"{path} was written by {was_world} expert-parallel rank(s), this run has {world_size}: "
                         f"resume on {was_world} ranks with --ep {now['ep']} {readable}")
    if was_stage != cfg.zero_stage or (cfg.zero_stage and was_world != world_size):
        how = f"--zero-stage {was_stage}" + (f" on {was_world} ranks" if was_stage else "")
        raise ValueError(f"{path} was written with --zero-stage {was_stage} on {was_world} rank(s), this run has "
                         f"--zero-stage {cfg.zero_stage} on {world_size}: resume with {how} {readable}")


def save_checkpoint(out: Path, step: int, strategy, batches, meta: dict, info: DistInfo, cfg: TrainConfig) -> None:
    """Every rank writes its part into ``checkpoints/step_N.tmp``; once all are on disk, rank 0 renames it into
    place and prunes to the newest ``cfg.keep_checkpoints``."""
    tmp = checkpoint.begin(out / "checkpoints", step)
    model_state, optimizer_state = strategy.checkpoint_state(tmp)
    if info.is_main:
        if os.environ.get(KILL_IN_CHECKPOINT) == str(step):
            checkpoint.write_main_state(tmp, model_state, None, {})  # files written, the folder never committed
            os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.write_main_state(tmp, model_state, optimizer_state, dict(meta, step=step, data=batches.state_dict()))
    if info.distributed:
        dist.barrier()  # every rank's files are on disk before the folder is committed
    if info.is_main:
        checkpoint.commit(tmp, keep=cfg.keep_checkpoints)
    if info.distributed:
        dist.barrier()

"""The 3D layout: which ranks form the tensor-, data- and pipeline-parallel groups (picotron's process-group manager).

World ranks sit on a (pp, dp, tp) grid, TP fastest-varying, then DP, then PP (Megatron-LM's order)::

    rank = (pp_rank * dp + dp_rank) * tp + tp_rank

    8 ranks, dp = tp = pp = 2:   TP groups [0, 1] [2, 3] [4, 5] [6, 7]
                                 DP groups [0, 2] [1, 3] [4, 6] [5, 7]
                                 PP groups [0, 4] [1, 5] [2, 6] [3, 7]

Why: TP all-reduces activations twice per layer, forward and backward, on the critical path, so its ranks are
neighbours (one node, the fastest links). DP all-reduces the gradients once per step: next. PP sends one activation
per micro-batch to the next stage only, the least traffic: outermost, across nodes. The group of a pipeline's first
and last stage, which share the tied embedding, is made by its :class:`~labs_lib.parallel.pipeline.GPTStage`.

:func:`check_layout` is every check of a layout in one place, with no process group needed: run it before spawning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from labs_lib.core.config import GPTConfig, ParallelConfig, TrainConfig, validate
from labs_lib.parallel.pipeline import check_pipeline
from labs_lib.parallel.tensor_parallel import check_tensor_parallel

__all__ = ["Mesh", "build_mesh", "check_layout"]


def check_layout(model: GPTConfig, train: TrainConfig, parallel: ParallelConfig, world_size: int,
                 device_type: str = "cpu") -> ParallelConfig:
    """Raise ``ValueError`` naming the fix for a configuration that cannot run; returns ``parallel`` with dp resolved.

    world = dp·tp·pp, heads and vocabulary divisible by tp, layers by pp (config.validate); sequence length for
    sequence parallelism (check_tensor_parallel); schedule, micro-batches and batch size (check_pipeline)."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    validate(model, train, parallel, world_size, device_type)
    p = parallel.resolved(world_size)
    check_tensor_parallel(model, p.tp, model.block_size, p.sequence_parallel)
    if p.pp > 1:
        check_pipeline(model.n_layer, p.pp, train.batch_size, p.micro_batches, p.pp_schedule, p.pp_chunks)
    else:
        need(p.micro_batches == 1 and p.pp_chunks == 1,
             f"micro_batches={p.micro_batches} and pp_chunks={p.pp_chunks} split the batch and the model for a "
             "pipeline, but pp=1: add --pp N, or split the batch with --grad-accum instead")
    need(not p.sequence_parallel or p.tp > 1, "sequence parallelism splits activations over the tensor-parallel "
                                              "ranks: add --tp N (N > 1) or drop --sequence-parallel")
    if p.ep > 1:
        need(model.n_experts > 0, f"--ep {p.ep} spreads the experts of MoE layers, and this GPT has none: add "
                                  "--n-experts N (a multiple of the ep size) or drop --ep")
        need(p.dp % p.ep == 0, f"--ep {p.ep} must divide the {p.dp} data-parallel ranks: choose ep among "
                               f"{', '.join(map(str, [d for d in range(1, p.dp + 1) if p.dp % d == 0]))}")
        need(model.n_experts % p.ep == 0, f"{model.n_experts} experts cannot be spread over --ep {p.ep}: choose ep "
                                          f"among the divisors of {model.n_experts}")
        need(not train.zero_stage and not train.compile,
             "expert parallelism runs on DDP, eager: drop --zero-stage and --compile with --ep")
    if p.tp * p.pp > 1:
        need(not train.compile, "--compile is not supported with tensor or pipeline parallelism: use --no-compile")
        need(train.dtype != "fp16", "fp16 loss scaling is not supported with tensor or pipeline parallelism: use "
                                    "--dtype bf16")
    return p


@dataclass(frozen=True)
class Mesh:
    """This rank's coordinates on the grid and its three process groups."""

    dp: int
    tp: int
    pp: int
    dp_rank: int
    tp_rank: int
    pp_rank: int
    dp_group: dist.ProcessGroup
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup

    @property
    def shard_name(self) -> str:
        """Names this rank's slice of the model (the same in every DP replica), e.g. for its optimizer state."""
        return f"pp{self.pp_rank}_tp{self.tp_rank}"


def build_mesh(parallel: ParallelConfig, rank: int, world_size: int) -> Mesh:
    """Create every DP, TP and PP group (a collective: every rank calls it, in the same order) and place ``rank``."""
    p = parallel.resolved(world_size)
    grid = torch.arange(world_size).view(p.pp, p.dp, p.tp)
    pp_rank, dp_rank, tp_rank = (grid == rank).nonzero()[0].tolist()
    # Each row below is one group; every rank creates all groups and keeps the one it belongs to.
    tp_group = dist.new_subgroups_by_enumeration(grid.reshape(-1, p.tp).tolist())[0]
    dp_group = dist.new_subgroups_by_enumeration(grid.transpose(1, 2).reshape(-1, p.dp).tolist())[0]
    pp_group = dist.new_subgroups_by_enumeration(grid.permute(1, 2, 0).reshape(-1, p.pp).tolist())[0]
    return Mesh(p.dp, p.tp, p.pp, dp_rank, tp_rank, pp_rank, dp_group, tp_group, pp_group)

"""The GPT on a DP × TP × PP mesh: the single-device model, with each parallelism applied from outside, in order.

    mesh = build_mesh(parallel, rank, world_size)
    torch.manual_seed(seed)                         # the same full weights on every rank...
    model = Parallel3D(GPT(cfg), mesh, parallel)    # ...each keeps its TP shard of its pipeline stage(s)
    loss = model.forward_backward(x, y, grad_accum)   # every rank of a DP replica passes the same batch (the loss:
                                                      # on the last stage, model.holds_loss)
    (average the gradients over mesh.dp_group)      # data parallelism, last
    model.clip_grad_norm_(1.0); optimizer.step()     # the optimizer holds this rank's parameters only

Tensor parallelism splits every layer (apply_tensor_parallel on the TP group, sequence parallelism included), then
the pipeline cuts the model at block boundaries (partition_gpt on the PP group), then data parallelism replicates
the whole pipeline.

Data parallelism is one all-reduce of the gradients over the DP group after the step, not torch DDP: inside a
pipeline schedule every micro-batch runs its own backward, and DDP would all-reduce after each of them (the schedule
cannot put the others under no_sync). Megatron-LM likewise reduces its gradient buffer after the pipeline flush.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn

from labs_lib.core.config import ParallelConfig
from labs_lib.models.gpt import GPT
from labs_lib.parallel.mesh import Mesh
from labs_lib.parallel.pipeline import gpt_loss, make_schedule, partition_gpt
from labs_lib.parallel.tensor_parallel import (
    apply_tensor_parallel,
    gather_full_state_dict,
    vocab_parallel_cross_entropy,
)

__all__ = ["Parallel3D"]


class Parallel3D(nn.Module):
    """This rank's part of the GPT: its TP shard of its pipeline stage(s) (of the whole model when pp = 1)."""

    def __init__(self, model: GPT, mesh: Mesh, parallel: ParallelConfig, measure: bool = False):
        super().__init__()
        self.mesh, self.config = mesh, model.config
        if mesh.tp > 1:
            model = apply_tensor_parallel(model, mesh.tp_group, parallel.sequence_parallel)
        self.schedule = None
        if mesh.pp > 1:
            self.stages = nn.ModuleList(partition_gpt(model, mesh.pp_rank, mesh.pp, mesh.pp_group, chunk,
                                                      parallel.pp_chunks) for chunk in range(parallel.pp_chunks))
            # measure=False: no step barriers, no activation metering (on: the trainer's --measure-activations).
            self.schedule = make_schedule(parallel.pp_schedule, list(self.stages), parallel.micro_batches,
                                          loss_fn=self._scaled_loss, measure=measure, broadcast_loss=False)
        else:
            self.stages = nn.ModuleList([model])
        self._grad_accum = 1

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.mesh.tp > 1:  # the logits are this rank's vocabulary shard
            return vocab_parallel_cross_entropy(logits, targets, self.mesh.tp_group)
        return gpt_loss(logits, targets)

    def _scaled_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._loss(logits, targets) / self._grad_accum

    def forward_backward(self, idx: torch.Tensor, targets: torch.Tensor, grad_accum: int = 1) -> torch.Tensor:
        """Forward and backward of one batch (in micro-batches through the pipeline), the loss divided by
        ``grad_accum``; gradients accumulate. Returns that loss on the ranks that compute it (:attr:`holds_loss`:
        all of them without a pipeline, the last stage's through one), 0 on the others: the trainer's record gathers
        it (labs_lib.train.steps.step_fields), so the schedule does not broadcast it every step."""
        if self.schedule is None:
            loss = self.stages[0](idx, targets)[1] / grad_accum
            loss.backward()
            return loss.detach()
        self._grad_accum = grad_accum
        return torch.tensor(self.schedule.step(idx, targets), device=idx.device)

    @property
    def holds_loss(self) -> bool:
        """Whether :meth:`forward_backward` returns the loss on this rank (the last pipeline stage's ranks)."""
        return self.schedule is None or self.stages[-1].is_last

    def forward(self, idx: torch.Tensor, targets: torch.Tensor):
        """(logits or None, the batch's loss) on every rank of the replica. Through a pipeline this is a forward
        pass only (evaluation): train with :meth:`forward_backward`."""
        if self.schedule is None:
            return self.stages[0](idx, targets)
        return None, self._pipeline_loss(idx, targets)

    @torch.no_grad()
    def _pipeline_loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The whole batch through the stages in pipeline order (blocking send/recv); the last stage's loss is
        broadcast over the pipeline."""
        loss = torch.zeros((), device=idx.device)
        dtype = next(self.parameters()).dtype
        for stage in self.stages:  # a rank's chunks in order: chunk c + 1 waits for chunk c of the last rank
            if stage.is_first:
                x = idx
            else:
                x = torch.empty(stage.hidden_shape(*idx.shape), dtype=dtype, device=idx.device)
                dist.recv(x, stage.prev_rank)
            y = stage(x)
            if stage.is_last:
                loss = self._loss(y, targets).float()
            else:
                dist.send(y.contiguous(), stage.next_rank)
        dist.broadcast(loss, src=self.stages[0].ranks[-1], group=self.mesh.pp_group)
        return loss

    def _counted_once(self) -> list[nn.Parameter]:
        """This rank's parameters whose gradients add to the global norm: TP shards on every TP rank, replicated
        parameters on TP rank 0 only, and the tied embedding on the first stage only (the last holds a copy)."""
        skip = set()
        if self.mesh.pp > 1 and self.stages[-1].is_last:
            skip.add(id(self.stages[-1].lm_head.weight))
        return [p for p in self.parameters()
                if p.grad is not None and id(p) not in skip and (hasattr(p, "tp_dim") or self.mesh.tp_rank == 0)]

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale all gradients so that their global norm, over every TP and PP shard, is at most ``max_norm``
        (as torch.nn.utils.clip_grad_norm_ on the single-device model); returns the norm before clipping.
        DP replicas hold the same (averaged) gradients, so the norm is summed over TP and PP only."""
        grads = [p.grad for p in self._counted_once()]
        square_sum = torch.zeros((), dtype=torch.float32, device=next(self.parameters()).device)
        for g in grads:
            square_sum += g.float().pow(2).sum()
        for size, group in ((self.mesh.tp, self.mesh.tp_group), (self.mesh.pp, self.mesh.pp_group)):
            if size > 1:  # a group of one would still cost a collective call, every step
                dist.all_reduce(square_sum, group=group)
        norm = square_sum.sqrt()
        if max_norm < math.inf:
            clip_coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.mul_(clip_coef)
        return norm

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The single-device GPT's state dict (on CPU) on global rank 0, None on the others. A collective of DP
        replica 0: the TP shards are all-gathered, then every stage's tensors are gathered by pipeline rank 0."""
        if self.mesh.dp_rank != 0:
            return None
        state = {}
        for stage in self.stages:
            state.update({k: v.cpu() for k, v in gather_full_state_dict(stage, self.mesh.tp_group).items()})
        if self.mesh.tp_rank != 0:
            return None
        if self.mesh.pp > 1:
            stage_states = [None] * self.mesh.pp if self.mesh.pp_rank == 0 else None
            dist.gather_object(state, stage_states, group=self.mesh.pp_group, group_dst=0)
            if self.mesh.pp_rank != 0:
                return None
            state = {k: v for s in stage_states for k, v in s.items()}
        state["lm_head.weight"] = state["tok_emb.weight"]  # tied again: stored once, as a single-device checkpoint
        return state

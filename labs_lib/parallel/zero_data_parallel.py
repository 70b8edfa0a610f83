"""ZeRO by hand behind one interface for the training loop: stage 1, 2 or 3 of a data-parallel model.

``--zero-stage`` of ``python -m labs_lib.train`` (plain data parallelism only) uses labs_lib.parallel.zero::

    0  torch DistributedDataParallel + AdamW (labs_lib.train's default path)
    1  DataParallel (all-reduce, no_sync for accumulation) + ShardedOptimizer: Adam's state split over the ranks
    2  ShardedOptimizer(shard_gradients=True): gradients reduce-scattered during every backward, 1/N kept
    3  FullyShardedModule: parameters too; AdamW on the flat shards. Weight decay goes on matrices only, as in
       labs_lib.train.optim.param_groups, but a flat shard mixes matrices and biases, so the shards' AdamW has no weight
       decay and ``step`` first applies AdamW's decoupled decay (p -= lr·wd·p) through a 0/1 mask per element.

Gradient clipping uses the global norm over every rank's gradient shards (one all-reduce). Checkpoints: the weights
are gathered whole (ZeRO-3: an all-gather) and written once by rank 0, single-device as always; each rank writes
its own optimizer shard (``optimizer_zero_rank<r>.safetensors``, torch's format of the inner optimizer over that
rank's flat shards), so resuming needs the same ``--zero-stage`` and number of ranks.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn

from labs_lib.measure.memory import held_bytes
from labs_lib.parallel.data_parallel import DataParallel
from labs_lib.parallel.zero import FullyShardedModule, ShardedOptimizer

__all__ = ["ZeroDataParallel", "clip_sharded_grad_norm_"]


@torch.no_grad()
def clip_sharded_grad_norm_(grads: list[torch.Tensor], max_norm: float, group=None) -> torch.Tensor:
    """Clip gradients split over the ranks of ``group`` (each element on exactly one rank) to a global norm of
    ``max_norm``, as torch.nn.utils.clip_grad_norm_ does for whole gradients; returns the global norm."""
    local = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else None)
    for g in grads:
        local += g.float().pow(2).sum()
    dist.all_reduce(local, group=group)
    norm = local.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return norm


class _ShardAdamW(torch.optim.AdamW):
    """AdamW over ZeRO-3's flat shards; decoupled weight decay only where ``masks`` (one per shard) are 1."""

    def __init__(self, shards: list[nn.Parameter], masks: list[torch.Tensor], weight_decay: float, **kwargs):
        super().__init__([{"params": shards, "masked_weight_decay": weight_decay}], weight_decay=0.0, **kwargs)
        self.masks = masks

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            decay = group["lr"] * group["masked_weight_decay"]
            for p, mask in zip(group["params"], self.masks):
                if p.grad is not None and decay:
                    p.mul_(1.0 - decay * mask)  # AdamW's p.mul_(1 - lr·wd), for the matrices' elements
        return super().step(closure)


def _decay_mask(flat, decayed: set[str]) -> torch.Tensor:
    """1 for this rank's shard elements that belong to a parameter named in ``decayed``, else 0."""
    decay = {i for *_, name, i in flat.slots if name in decayed}  # a tied parameter fills several slots
    parts = [torch.ones(shape) if i in decay else torch.zeros(shape) for i, shape in enumerate(flat.shapes)]
    return flat.layout.shard_of(parts, like=flat.shard.detach())


class ZeroDataParallel:
    """ZeRO stage 1, 2 or 3 of ``model`` over ``process_group`` (default: the world), for the training loop.

    ``self(x, y)`` runs the forward, ``self.optimizer`` is the step, and per micro-batch::

        with zero.micro_batch(last):   # stage 1: no_sync but for the last one; 2/3: reduce-scatter each backward
            loss = zero(x, y)[1] / grad_accum
            loss.backward()
        grad_norm = zero.clip_grad_norm_(1.0); zero.optimizer.step(); zero.optimizer.zero_grad()

    ``param_groups``: the optimizer's groups of ``model``'s parameters, each with its ``weight_decay``
    (labs_lib.train.optim.param_groups). ``forward_model``: what runs the forward for stages 1 and 2 (e.g.
    ``torch.compile(model)``); default ``model``.
    """

    def __init__(self, model: nn.Module, stage: int, param_groups: list[dict], lr: float,
                 betas: tuple[float, float], bucket_size_mb: float = 25.0, process_group=None,
                 forward_model: nn.Module | None = None):
        if stage not in (1, 2, 3):
            raise ValueError(f"ZeroDataParallel takes stage 1, 2 or 3, got {stage} (stage 0 is plain DDP)")
        self.stage, self.module, self.process_group = stage, model, process_group
        adamw = {"lr": lr, "betas": betas}
        if stage == 1:
            self.model = DataParallel(forward_model or model, bucket_size_mb=bucket_size_mb,
                                      process_group=process_group)
            self.optimizer = ShardedOptimizer(param_groups, torch.optim.AdamW, process_group,
                                              bucket_size_mb=bucket_size_mb, **adamw)
        elif stage == 2:
            self.model = forward_model or model
            self.optimizer = ShardedOptimizer(param_groups, torch.optim.AdamW, process_group,
                                              shard_gradients=True, bucket_size_mb=bucket_size_mb, **adamw)
        else:
            decayed_ids = {id(p) for g in param_groups if g["weight_decay"] for p in g["params"]}
            decayed = {name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in decayed_ids}
            weight_decay = max(g["weight_decay"] for g in param_groups)
            self.model = FullyShardedModule(model, process_group=process_group)
            flats = list(self.model.flat_params)
            self.optimizer = _ShardAdamW([f.shard for f in flats], [_decay_mask(f, decayed) for f in flats],
                                         weight_decay, **adamw)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def train(self, mode: bool = True):
        self.model.train(mode)
        return self

    def eval(self):
        return self.train(False)

    @contextlib.contextmanager
    def micro_batch(self, last: bool):
        """Around one micro-batch's forward and backward: accumulate locally (stage 1) or reduce-scatter (2, 3)."""
        with self.model.no_sync() if self.stage == 1 and not last else contextlib.nullcontext():
            yield
        if self.stage == 1:
            if last:
                self.model.finish_gradient_synchronization()
        elif self.stage == 2:
            self.optimizer.finish_gradient_synchronization()  # the slices of successive backwards add up
        else:
            self.model.finish_gradient_synchronization()

    def grad_shards(self) -> list[torch.Tensor]:
        if self.stage == 2:
            return [b.grad_shard for b in self.optimizer.buckets if b.grad_shard is not None]
        return [f.shard.grad for f in self.model.flat_params if f.shard.grad is not None]

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip to a global gradient norm; returns it (the same on every rank)."""
        if self.stage == 1:  # every rank holds the whole averaged gradients
            return torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
        return clip_sharded_grad_norm_(self.grad_shards(), max_norm, self.process_group)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The single-device weights (ZeRO-3: all-gathered, a collective: call it on every rank)."""
        if self.stage == 3:
            return self.model.gather_full_params()
        return self.module.state_dict()  # views of the flat buffers, whole on every rank after each step

    def held_bytes(self) -> dict[str, int]:
        return held_bytes(self.model if self.stage == 3 else self.module, self.optimizer)

    def shard_name(self, rank: int) -> str:
        return f"zero_rank{rank}"

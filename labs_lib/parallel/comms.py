"""Tensor-parallel collectives as autograd Functions, named after Megatron-LM's operators.

A tensor-parallel layer is ordinary math between two of these. Each pairs a forward collective with the backward
collective that makes the gradient right (Shoeybi et al. 2019, fig. 3; Korthikanti et al. 2022, fig. 5)::

    operator (function)                        forward                     backward
    f  copy_to_tensor_parallel_region          identity                    all-reduce
    g  reduce_from_tensor_parallel_region      all-reduce                  identity
       scatter_to_tensor_parallel_region       split last dim              all-gather last dim
       gather_from_tensor_parallel_region      all-gather last dim         split last dim
    ḡ  gather_from_sequence_parallel_region    all-gather sequence dim     reduce-scatter sequence dim
    ḡ* reduce_scatter_to_sequence_parallel_region  reduce-scatter sequence  all-gather sequence dim

f and g are conjugate (one's forward is the other's backward); so are the last two, which replace f and g when
activations outside the tensor-parallel region are split along the sequence (sequence parallelism). Activations
are (batch, seq, features) here, so the sequence dim is 1 (Megatron keeps it first). Every function takes a
process group, the world by default, and is the identity on a group of one.

On torch 2.13 gloo (CPU) every collective used here works: ``all_gather_single`` and ``reduce_scatter_single``
(the new names of ``all_gather_into_tensor`` / ``reduce_scatter_tensor``, which now warn) included, so no
all-reduce-and-slice stand-in is needed. Older torch (the package allows >= 2.4) falls back to the old names.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from labs_lib.core.dist import all_gather_single, reduce_scatter_single

__all__ = ["CopyToTensorParallelRegion", "ReduceFromTensorParallelRegion", "ScatterToTensorParallelRegion",
           "GatherFromTensorParallelRegion", "GatherFromSequenceParallelRegion",
           "ReduceScatterToSequenceParallelRegion", "copy_to_tensor_parallel_region",
           "reduce_from_tensor_parallel_region", "scatter_to_tensor_parallel_region",
           "gather_from_tensor_parallel_region", "gather_from_sequence_parallel_region",
           "reduce_scatter_to_sequence_parallel_region", "group_size", "group_rank"]

SEQ_DIM = 1  # activations are (batch, seq, features)

# torch 2.13 renamed the single-tensor collectives and deprecated the old names (a FutureWarning per call).


def group_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def group_rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


# ---------------------------------------------------------------------------------------------------------------
# Plain collectives along any dim. The single-tensor collectives concatenate along dim 0, so the dim is moved
# to the front and back again.


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.clone()  # autograd may still need the input, so never reduce in place
    dist.all_reduce(x, group=group)
    return x


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((n * front.size(0), *front.shape[1:]))
    all_gather_single(out, front, group=group)
    return out.movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    if x.size(dim) % n:
        raise ValueError(f"cannot reduce-scatter a dim of size {x.size(dim)} over {n} ranks: make it divisible")
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((front.size(0) // n, *front.shape[1:]))
    reduce_scatter_single(out, front, group=group)
    return out.movedim(0, dim)


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    if x.size(dim) % n:
        raise ValueError(f"cannot split a dim of size {x.size(dim)} over {n} ranks: make it divisible")
    return x.chunk(n, dim)[group_rank(group)].contiguous()


# ---------------------------------------------------------------------------------------------------------------
# The operators. ``group`` is a forward argument, so backward returns None for it.


class CopyToTensorParallelRegion(torch.autograd.Function):
    """f: forward identity (every rank has the whole input); backward all-reduce (each rank's grad is partial)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class ReduceFromTensorParallelRegion(torch.autograd.Function):
    """g: forward all-reduce (sum the partial outputs); backward identity (the sum's grad goes to each part)."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class ScatterToTensorParallelRegion(torch.autograd.Function):
    """Forward: keep this rank's slice of the last dim; backward: all-gather the slices' grads."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, -1, ctx.group), None


class GatherFromTensorParallelRegion(torch.autograd.Function):
    """Forward: all-gather the last dim from every rank; backward: keep this rank's slice of the grad."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, -1, ctx.group), None


class GatherFromSequenceParallelRegion(torch.autograd.Function):
    """Forward: all-gather the sequence shards; backward: reduce-scatter (sum the grads, keep this rank's shard)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, SEQ_DIM, ctx.group), None


class ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    """Forward: reduce-scatter (sum the partial outputs, keep this rank's sequence shard); backward: all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, SEQ_DIM, ctx.group), None


def copy_to_tensor_parallel_region(x: torch.Tensor, group=None) -> torch.Tensor:
    return CopyToTensorParallelRegion.apply(x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group=None) -> torch.Tensor:
    return ReduceFromTensorParallelRegion.apply(x, group)


def scatter_to_tensor_parallel_region(x: torch.Tensor, group=None) -> torch.Tensor:
    return ScatterToTensorParallelRegion.apply(x, group)


def gather_from_tensor_parallel_region(x: torch.Tensor, group=None) -> torch.Tensor:
    return GatherFromTensorParallelRegion.apply(x, group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group=None) -> torch.Tensor:
    return GatherFromSequenceParallelRegion.apply(x, group)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group=None) -> torch.Tensor:
    return ReduceScatterToSequenceParallelRegion.apply(x, group)

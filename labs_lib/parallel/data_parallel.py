"""Data parallelism by hand: every rank holds the whole model, sees its own slice of the batch, and the gradients are
averaged across ranks before the optimizer step, so every rank takes the same step as one process on the full batch.

    model = DataParallel(GPT(cfg), bucket_size_mb=25)   # broadcasts rank 0's weights
    for micro_batch in micro_batches[:-1]:
        with model.no_sync():                           # accumulate locally, no communication
            (model(x, y)[1] / n_micro).backward()
    (model(x, y)[1] / n_micro).backward()               # all-reduces launch while backward still runs
    model.finish_gradient_synchronization()             # wait for them, grads are now averaged
    optimizer.step()

The all-reduces overlap with backward: a hook on each parameter (``register_post_accumulate_grad_hook``) fires as
soon as its gradient is final and launches an asynchronous all-reduce, while autograd goes on computing the
gradients of the layers below. With ``bucket_size_mb=None`` each parameter is its own all-reduce; with buckets,
gradients are copied into one flat buffer per bucket (parameters in reverse order, the order backward produces
them), so a few large messages replace many small ones (each message pays a fixed latency), as torch DDP does.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["DataParallel", "broadcast_from_first_rank"]


@torch.no_grad()
def broadcast_from_first_rank(tensors, process_group=None) -> None:
    """Overwrite ``tensors`` on every rank with the group's first rank's values (same initial weights everywhere)."""
    for t in tensors:
        dist.broadcast(t, group_src=0, group=process_group)


class _Bucket:
    """Parameters whose gradients are all-reduced together as one message."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.ready: set[nn.Parameter] = set()  # parameters whose gradient is final in this backward
        self.flat: torch.Tensor | None = None  # the message in flight (bucket mode only)
        self.handle = None

    def launch(self, process_group) -> None:
        if len(self.params) == 1:  # one parameter: reduce its gradient in place, no copies
            self.handle = dist.all_reduce(self.params[0].grad, group=process_group, async_op=True)
            return
        self.flat = torch.cat([p.grad.reshape(-1) for p in self.params])
        self.handle = dist.all_reduce(self.flat, group=process_group, async_op=True)

    def finish(self, world_size: int) -> None:
        self.handle.wait()
        if self.flat is None:
            self.params[0].grad.div_(world_size)  # sum → mean (gloo has no ReduceOp.AVG)
        else:
            offset = 0
            for p in self.params:
                p.grad.copy_(self.flat[offset:offset + p.numel()].view_as(p.grad)).div_(world_size)
                offset += p.numel()
        self.flat, self.handle = None, None
        self.ready.clear()


class DataParallel(nn.Module):
    """Wrap ``module`` so that ``backward`` also averages its gradients over ``process_group`` (default: world).

    Only parameters with ``requires_grad`` take part; a parameter shared by several modules (tied weights) is one
    tensor with one gradient, so it is reduced once. Every trainable parameter must get a gradient in every synced
    backward (like torch DDP without ``find_unused_parameters``): a bucket is sent when all its gradients are ready.
    """

    def __init__(self, module: nn.Module, bucket_size_mb: float | None = None, process_group=None):
        super().__init__()
        self.module = module
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.require_backward_grad_sync = True
        broadcast_from_first_rank([*module.parameters(), *module.buffers()], process_group)

        params = [p for p in module.parameters() if p.requires_grad]  # parameters() yields a tied tensor once
        self.buckets = self._make_buckets(params, bucket_size_mb)
        self._bucket_of = {p: b for b in self.buckets for p in b.params}
        self._launched: list[_Bucket] = []  # in launch order
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_grad_ready)

    @staticmethod
    def _make_buckets(params: list[nn.Parameter], bucket_size_mb: float | None) -> list[_Bucket]:
        if bucket_size_mb is None:
            return [_Bucket([p]) for p in params]
        cap = bucket_size_mb * 2**20
        buckets, current, size = [], [], 0
        for p in reversed(params):  # backward produces the last layers' gradients first
            current.append(p)
            size += p.numel() * p.element_size()
            if size >= cap:
                buckets.append(_Bucket(current))
                current, size = [], 0
        if current:
            buckets.append(_Bucket(current))
        return buckets

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        if not self.require_backward_grad_sync:
            return
        bucket = self._bucket_of[param]
        bucket.ready.add(param)
        if len(bucket.ready) == len(bucket.params):
            bucket.launch(self.process_group)
            self._launched.append(bucket)

    def finish_gradient_synchronization(self) -> None:
        """Wait for the all-reduces launched during backward; afterwards every rank holds the averaged gradients."""
        missing = [p for b in self.buckets if 0 < len(b.ready) < len(b.params) for p in b.params if p not in b.ready]
        if missing:
            names = {p: n for n, p in self.module.named_parameters()}
            raise RuntimeError(f"parameters {[names[p] for p in missing]} got no gradient in this backward, so their "
                               "bucket was never sent: every trainable parameter must take part in the loss")
        for bucket in self._launched:
            bucket.finish(self.world_size)
        self._launched = []

    @contextlib.contextmanager
    def no_sync(self):
        """Backward inside accumulates gradients locally; the next backward outside reduces the accumulated sum."""
        previous, self.require_backward_grad_sync = self.require_backward_grad_sync, False
        try:
            yield
        finally:
            self.require_backward_grad_sync = previous

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

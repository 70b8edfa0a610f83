"""ZeRO by hand (Rajbhandari et al. 2020): data parallelism where each of N ranks keeps only 1/N of the model states.

Plain data parallelism repeats everything on every rank. With fp32 Adam that is 16 bytes per parameter
(4 weights + 4 gradients + 8 for Adam's m and v); each ZeRO stage shards one more of them::

    stage 1  optimizer state / N            ShardedOptimizer(params, AdamW, lr=...) on a DataParallel model
    stage 2  + gradients / N                ShardedOptimizer(params, AdamW, shard_gradients=True, lr=...) on the
                                            plain model: it reduce-scatters the gradients itself during backward
    stage 3  + parameters / N (FSDP)        FullyShardedModule(model); AdamW(fsdp_model.parameters())

    model = DataParallel(GPT(cfg))                                        # ZeRO-1
    optimizer = ShardedOptimizer(model.parameters(), torch.optim.AdamW, lr=3e-4)
    model(x, y)[1].backward(); model.finish_gradient_synchronization(); optimizer.step()

    model = FullyShardedModule(GPT(cfg), compute_dtype=torch.bfloat16)  # ZeRO-3
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)           # the parameters are this rank's shards
    model(x, y)[1].backward(); model.finish_gradient_synchronization(); optimizer.step()

Layout (all stages): parameters are flattened into flat buffers (one per ~bucket_size_mb bucket for stages 1-2,
one per unit for stage 3), each padded to a multiple of N and cut into N equal contiguous shards; rank r owns shard
r of every buffer (``FlatShard``). Whole parameters per rank would be simpler to read, but a
small GPT's sizes are very uneven (the tied embedding is a large share of it), so ranks would hold unequal parts;
the flat layout gives each rank exactly 1/N (plus fewer than N elements of padding per buffer), and one collective
per buffer instead of one per parameter. Frozen parameters (``requires_grad=False``) are kept apart: a flat shard
is stepped as a whole, and a frozen slice would still move under weight decay and momentum.

labs_lib.measure.memory.held_bytes measures what a rank holds (each storage counted once) and
labs_lib.estimates.memory.zero_bytes_per_rank is the paper's formula, so a lab can put them side by side.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn

from labs_lib.core.dist import all_gather_single, reduce_scatter_single
from labs_lib.parallel.data_parallel import broadcast_from_first_rank

__all__ = ["FlatShard", "ShardedOptimizer", "FullyShardedModule", "reduce_scatter"]



class _AllReduceThenSlice:
    """Reduce-scatter for backends without one: all-reduce, then keep this rank's slice after the wait."""

    def __init__(self, output: torch.Tensor, input: torch.Tensor, group):
        self.output, self.input, self.rank = output, input, dist.get_rank(group)
        self.handle = dist.all_reduce(input, group=group, async_op=True)

    def wait(self) -> None:
        self.handle.wait()
        self.output.copy_(self.input.view(-1, self.output.numel())[self.rank])


def reduce_scatter(output: torch.Tensor, input: torch.Tensor, group=None):
    """Launch a sum of ``input`` over the ranks of which this rank keeps slice ``rank`` in ``output``; returns a
    handle to ``wait()`` on. ``input`` may be overwritten.

    gloo implements reduce-scatter on torch 2.13 (checked); where a backend does not, the fallback all-reduces and
    keeps the slice. The memory saving is then logical, not communication-optimal: the rank still keeps 1/N of the
    gradients afterwards, but it moves twice the bytes and briefly holds the whole sum.
    """
    try:
        return reduce_scatter_single(output, input, group=group, async_op=True)
    except (RuntimeError, NotImplementedError):
        return _AllReduceThenSlice(output, input, group)


class FlatShard:
    """How tensors of ``numels`` elements lie in one flat buffer, padded to a multiple of ``world_size`` and cut
    into equal shards; this rank owns elements ``start:end``."""

    def __init__(self, numels: list[int], world_size: int, rank: int):
        self.numels = numels
        self.offsets = [sum(numels[:i]) for i in range(len(numels))]
        self.shard_numel = math.ceil(sum(numels) / world_size)
        self.padded_numel = self.shard_numel * world_size
        self.start, self.end = rank * self.shard_numel, (rank + 1) * self.shard_numel

    def flatten(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        return torch.nn.functional.pad(flat, (0, self.padded_numel - flat.numel()))

    def views(self, flat: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
        return [flat[o:o + n].view(s) for o, n, s in zip(self.offsets, self.numels, shapes)]

    def shard_of(self, tensors: list[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
        """This rank's shard of the flattened ``tensors`` (None counts as zeros), copying only the overlapping parts;
        dtype and device of ``like``."""
        out = like.new_zeros(self.shard_numel)
        for t, offset, n in zip(tensors, self.offsets, self.numels):
            lo, hi = max(offset, self.start), min(offset + n, self.end)
            if t is not None and lo < hi:
                out[lo - self.start:hi - self.start] = t.reshape(-1)[lo - offset:hi - offset]
        return out


# ---------------------------------------------------------------------------------------------------------------
# ZeRO-1 and ZeRO-2


class _OptimizerBucket:
    """Some parameters re-homed as views of one flat buffer; ``shard`` (a view too) is what this rank steps."""

    def __init__(self, params: list[nn.Parameter], process_group):
        self.params, self.process_group = params, process_group
        self.world_size = dist.get_world_size(process_group)
        self.layout = FlatShard([p.numel() for p in params], self.world_size, dist.get_rank(process_group))
        self.flat = self.layout.flatten([p.detach() for p in params])
        broadcast_from_first_rank([self.flat], process_group)  # start from rank 0's weights, as DataParallel does
        for p, view in zip(params, self.layout.views(self.flat, [p.shape for p in params])):
            p.data = view  # the model now computes with the flat buffer: the all-gather updates it in place
        self.shard = self.flat[self.layout.start:self.layout.end]  # stepping this view updates the parameters
        self.grad_shard: torch.Tensor | None = None  # ZeRO-2: this rank's slice of the summed gradients
        self.ready: set[nn.Parameter] = set()
        self.pending = None  # ZeRO-2: (handle, output, input) of the reduce-scatter in flight

    def launch_reduce_scatter(self) -> None:
        flat_grad = self.layout.flatten([p.grad for p in self.params])
        for p in self.params:
            p.grad = None  # the full gradients are gone once they are in the message: that is the ZeRO-2 saving
        out = flat_grad.new_empty(self.layout.shard_numel)
        self.pending = (reduce_scatter(out, flat_grad, self.process_group), out, flat_grad)

    def finish_reduce_scatter(self) -> None:
        handle, out, _ = self.pending
        handle.wait()
        out.div_(self.world_size)  # sum → mean
        self.grad_shard = out if self.grad_shard is None else self.grad_shard.add_(out)  # accumulation adds up
        self.pending = None
        self.ready.clear()


def _buckets_by_size(params: list[nn.Parameter], bucket_size_mb: float) -> list[list[nn.Parameter]]:
    """Consecutive runs of ``params`` in reverse order (the order backward finishes them), each ~bucket_size_mb."""
    cap, buckets, current, size = bucket_size_mb * 2**20, [], [], 0
    for p in reversed(params):
        current.append(p)
        size += p.numel() * p.element_size()
        if size >= cap:
            buckets.append(current)
            current, size = [], 0
    return buckets + [current] if current else buckets


class ShardedOptimizer(torch.optim.Optimizer):
    """ZeRO-1 (and ZeRO-2 with ``shard_gradients=True``): ``optimizer_cls`` runs on this rank's shard only.

    Each param group's trainable parameters are split into buckets of ~``bucket_size_mb`` and each bucket into N
    equal flat shards; the inner ``optimizer_cls(..., **kwargs)`` holds state only for this rank's shards. After
    its step, every rank all-gathers the updated shards into the parameters (which are views of the buckets from
    now on: build the optimizer after moving the model to its device).

    ZeRO-1 expects gradients already averaged over the ranks (wrap the model in DataParallel). With
    ``shard_gradients=True`` (ZeRO-2) use the plain model instead: a hook per parameter reduce-scatters each bucket
    as soon as its gradients are ready during backward and frees the full gradients, so a rank keeps only its 1/N
    slice (each bucket's ``grad_shard``); ``step`` (or ``finish_gradient_synchronization``) waits for the last
    ones. Gradient accumulation just sums the slices over backwards. Every trainable parameter must get a gradient
    in every backward, or its bucket is never sent (an error says so).

    ``state_dict`` / ``load_state_dict`` are this rank's shard (the inner optimizer's, in torch's format):
    checkpoint one file per rank. Changes to ``param_groups`` (learning-rate schedules) reach the inner optimizer.
    """

    def __init__(self, params, optimizer_cls: type[torch.optim.Optimizer], process_group=None,
                 shard_gradients: bool = False, bucket_size_mb: float = 25, **kwargs):
        super().__init__(params, kwargs)
        self.process_group, self.shard_gradients = process_group, shard_gradients
        self.buckets: list[_OptimizerBucket] = []
        inner_groups = []
        for group in self.param_groups:
            trainable = list({id(p): p for p in group["params"] if p.requires_grad}.values())  # tied: once
            group_buckets = [_OptimizerBucket(b, process_group) for b in _buckets_by_size(trainable, bucket_size_mb)]
            self.buckets += group_buckets
            inner_groups.append({**self._hyperparameters(group), "params": [b.shard for b in group_buckets]})
        self.optimizer = optimizer_cls(inner_groups, **kwargs)
        for group, inner in zip(self.param_groups, self.optimizer.param_groups):
            for key, value in self._hyperparameters(inner).items():
                group.setdefault(key, value)  # the inner optimizer's defaults, visible to schedulers
        self._bucket_of = {p: b for b in self.buckets for p in b.params}
        self._launched: list[_OptimizerBucket] = []
        if shard_gradients:
            for p in self._bucket_of:
                p.register_post_accumulate_grad_hook(self._on_grad_ready)

    @staticmethod
    def _hyperparameters(group: dict) -> dict:
        return {k: v for k, v in group.items() if k != "params"}

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        bucket = self._bucket_of[param]
        bucket.ready.add(param)
        if len(bucket.ready) == len(bucket.params):
            bucket.launch_reduce_scatter()
            self._launched.append(bucket)

    def finish_gradient_synchronization(self) -> None:
        """ZeRO-2: wait for the reduce-scatters launched during backward (``step`` calls it; a no-op for ZeRO-1)."""
        missing = [p for b in self.buckets if b.ready for p in b.params if p not in b.ready]
        if missing:
            raise RuntimeError(f"{len(missing)} parameter(s) of shapes {[tuple(p.shape) for p in missing]} got no "
                               "gradient in this backward, so their bucket was never reduced: every trainable "
                               "parameter must take part in the loss")
        for bucket in self._launched:
            bucket.finish_reduce_scatter()
        self._launched = []

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, inner in zip(self.param_groups, self.optimizer.param_groups):
            inner.update(self._hyperparameters(group))
        self.finish_gradient_synchronization()
        for b in self.buckets:
            if not self.shard_gradients and any(p.grad is not None for p in b.params):
                # ZeRO-1: cut this rank's slice out of the full, already averaged gradients
                b.grad_shard = b.layout.shard_of([p.grad for p in b.params], like=b.flat)
            b.shard.grad = b.grad_shard
        self.optimizer.step()
        # Each rank updated only its shard: gather everyone's (the input is a copy, it lies inside the output).
        work = [all_gather_single(b.flat, b.shard.clone(), group=self.process_group, async_op=True)
                for b in self.buckets]
        for w in work:
            w.wait()
        if not self.shard_gradients:
            for b in self.buckets:
                b.grad_shard = b.shard.grad = None  # a transient copy: ZeRO-1 keeps the full gradients
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for b in self.buckets:
            if set_to_none or b.grad_shard is None:
                b.grad_shard = b.shard.grad = None
            else:
                b.grad_shard.zero_()

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)
        for group, inner in zip(self.param_groups, self.optimizer.param_groups):
            group.update(self._hyperparameters(inner))


# ---------------------------------------------------------------------------------------------------------------
# ZeRO-3


class _GatherParameters(torch.autograd.Function):
    """Forward: all-gather a flat parameter's full value. Backward: reduce-scatter its gradient into the shard."""

    @staticmethod
    def forward(ctx, shard: torch.Tensor, flat_param: _FlatParameter) -> torch.Tensor:
        ctx.flat_param = flat_param
        return flat_param.all_gather()

    @staticmethod
    def backward(ctx, full_grad: torch.Tensor):
        ctx.flat_param.launch_reduce_scatter(full_grad)
        return None, None  # the shard's .grad is written once the reduce-scatter is done


class _FlatParameter(nn.Module):
    """Some parameters of a model kept as one flat fp32 shard per rank (``shard``), whole only while in use.

    ``slots`` are (module, attribute name, qualified name, parameter); a tied parameter fills several slots and is
    stored once. The parameters are removed from their modules; before each use ``gather`` all-gathers them (cast
    to ``compute_dtype``) and sets the modules' attributes to views of the full buffer, ``free`` releases it.
    """

    def __init__(self, slots: list[tuple[nn.Module, str, str, nn.Parameter]], compute_dtype, process_group):
        super().__init__()
        unique = list({id(p): p for *_, p in slots}.values())
        index = {id(p): i for i, p in enumerate(unique)}
        self.slots = [(module, attr, name, index[id(p)]) for module, attr, name, p in slots]
        self.shapes = [p.shape for p in unique]
        self.process_group, self.compute_dtype = process_group, compute_dtype or unique[0].dtype
        self.world_size = dist.get_world_size(process_group)
        self.layout = FlatShard([p.numel() for p in unique], self.world_size, dist.get_rank(process_group))
        flat = self.layout.flatten([p.detach() for p in unique])
        broadcast_from_first_rank([flat], process_group)
        self.shard = nn.Parameter(flat[self.layout.start:self.layout.end].clone(), unique[0].requires_grad)
        for module, attr, *_ in self.slots:
            del module._parameters[attr]  # from now on a plain attribute, set on every gather
        self.full: torch.Tensor | None = None  # the gathered buffer (compute dtype) of the last forward
        self.pending: list = []  # reduce-scatters in flight: (handle, output, input)

    def all_gather(self) -> torch.Tensor:
        full = self.shard.new_empty(self.layout.padded_numel, dtype=self.compute_dtype)
        all_gather_single(full, self.shard.detach().to(self.compute_dtype), group=self.process_group)
        return full

    def gather(self) -> None:
        """Before forward: the full parameters, as a differentiable function of the shard."""
        self.full = _GatherParameters.apply(self.shard, self)
        views = self.layout.views(self.full, self.shapes)
        for module, attr, _, i in self.slots:
            setattr(module, attr, views[i])

    def regather(self) -> None:
        """Before backward: refill the freed buffer in place, since autograd saved views of it for backward."""
        if self.full is None or self.full.untyped_storage().nbytes() > 0:
            return
        self.full.untyped_storage().resize_(self.full.numel() * self.full.element_size())
        # Same values again, not a modification: keep autograd's version check quiet (FSDP2 does the same).
        with torch.autograd._unsafe_preserve_version_counter(self.full):
            all_gather_single(self.full, self.shard.detach().to(self.compute_dtype), group=self.process_group)

    def free(self) -> None:
        if self.full is not None:
            self.full.untyped_storage().resize_(0)  # the memory goes; the views (and autograd's references) stay

    def launch_reduce_scatter(self, full_grad: torch.Tensor) -> None:
        full_grad = full_grad.to(torch.float32).contiguous()  # reduce in fp32 whatever the compute dtype
        out = full_grad.new_empty(self.layout.shard_numel)
        self.pending.append((reduce_scatter(out, full_grad, self.process_group), out, full_grad))
        self.free()  # backward is done with this unit's parameters

    def finish_reduce_scatter(self) -> None:
        for handle, out, _ in self.pending:
            handle.wait()
            out.div_(self.world_size)  # sum → mean
            self.shard.grad = out if self.shard.grad is None else self.shard.grad.add_(out)
        self.pending = []


def _param_slots(module: nn.Module, prefix: str, skip: set[nn.Module]) -> list:
    """(owner, attribute, qualified name, parameter) for each parameter under ``module``, outside ``skip``."""
    if module in skip:
        return []
    slots = [(module, attr, prefix + attr, p) for attr, p in module._parameters.items() if p is not None]
    for name, child in module.named_children():
        slots += _param_slots(child, f"{prefix}{name}.", skip)
    return slots


class FullyShardedModule(nn.Module):
    """ZeRO-3 / FSDP: each rank keeps 1/N of every parameter; a unit's full parameters exist only while it runs.

    Units: each module in ``units`` (default: ``module.blocks``, the transformer blocks) plus the root unit, which
    takes every other parameter (embeddings, final norm, and the head tied to the token embedding, so the tied
    pair stays one tensor). A block's parameters are all-gathered by a forward pre-hook and freed after its
    forward; a hook on the block's output re-gathers them when backward reaches it, and the gradient is
    reduce-scattered into the fp32 shard's ``.grad`` as soon as the unit's backward is done. The root unit stays
    gathered from forward to the end of backward (backward starts at its head).

    ``compute_dtype`` (e.g. torch.bfloat16): the parameters are all-gathered in that dtype and forward/backward run
    in it; shards, gradients after reduction and the optimizer stay fp32. ``parameters()`` yields the shards:
    build the optimizer on them. Call ``finish_gradient_synchronization()`` after backward, before the step.
    Activation checkpointing goes inside a unit (checkpoint the block's ``forward``): the recompute then runs
    between the unit's re-gather and its reduce-scatter, with its parameters whole.
    """

    def __init__(self, module: nn.Module, compute_dtype: torch.dtype | None = None, process_group=None, units=None):
        super().__init__()
        self.module = module
        self.process_group = process_group
        units = list(module.blocks if units is None and hasattr(module, "blocks") else units or [])
        broadcast_from_first_rank(list(module.buffers()), process_group)
        slots_of = {unit: _param_slots(unit, self._prefix(unit), set(units) - {unit}) for unit in units}
        slots_of[module] = _param_slots(module, "", set(units))
        self._check_no_parameter_shared_between_units(slots_of)
        self.flat_params = nn.ModuleList()
        self._flat_params_of: dict[nn.Module, list[_FlatParameter]] = {}
        for unit, slots in slots_of.items():
            groups = [[s for s in slots if s[3].requires_grad], [s for s in slots if not s[3].requires_grad]]
            flats = [_FlatParameter(g, compute_dtype, process_group) for g in groups if g]  # frozen kept apart
            self.flat_params.extend(flats)
            self._flat_params_of[unit] = flats
        for unit in units:
            unit.register_forward_pre_hook(self._before_unit_forward)
            unit.register_forward_hook(self._after_unit_forward)

    def _prefix(self, unit: nn.Module) -> str:
        return next(f"{name}." if name else "" for name, m in self.module.named_modules() if m is unit)

    @staticmethod
    def _check_no_parameter_shared_between_units(slots_of: dict) -> None:
        owner = {}
        for unit, slots in slots_of.items():
            for _, _, name, p in slots:
                if owner.setdefault(id(p), (unit, name))[0] is not unit:
                    raise ValueError(f"{name} is the same tensor as {owner[id(p)][1]} in another unit: tied "
                                     "parameters must live in one unit (leave both modules to the root)")

    def _before_unit_forward(self, unit: nn.Module, args) -> None:
        for flat in self._flat_params_of[unit]:
            flat.gather()

    def _after_unit_forward(self, unit: nn.Module, args, output):
        for flat in self._flat_params_of[unit]:
            flat.free()
        if torch.is_grad_enabled():
            for t in output if isinstance(output, (tuple, list)) else (output,):
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(lambda grad, unit=unit: self._before_unit_backward(unit))

    def _before_unit_backward(self, unit: nn.Module) -> None:
        for flat in self._flat_params_of[unit]:
            flat.regather()

    def forward(self, *args, **kwargs):
        root = self._flat_params_of[self.module]
        for flat in root:
            flat.gather()
        output = self.module(*args, **kwargs)
        if not torch.is_grad_enabled():
            for flat in root:
                flat.free()
        return output

    def finish_gradient_synchronization(self) -> None:
        """Wait for the reduce-scatters launched during backward; each shard's ``.grad`` is then the mean."""
        for flat in self.flat_params:
            flat.finish_reduce_scatter()
            flat.free()  # frozen units and the root's frozen part have no backward of their own to free them

    def gathered_bytes(self) -> dict[str, int]:
        """Bytes of full (gathered) parameters alive right now, per unit ("" is the root): watch them come and go."""
        names = {unit: self._prefix(unit).rstrip(".") for unit in self._flat_params_of}
        return {names[unit]: sum(f.full.untyped_storage().nbytes() for f in flats if f.full is not None)
                for unit, flats in self._flat_params_of.items()}

    @torch.no_grad()
    def gather_full_params(self) -> dict[str, torch.Tensor]:
        """Every parameter whole, in fp32, under its original name (tied names share one tensor); on every rank."""
        out = {}
        for flat in self.flat_params:
            full = flat.shard.new_empty(flat.layout.padded_numel)
            all_gather_single(full, flat.shard.detach(), group=self.process_group)
            views = flat.layout.views(full, flat.shapes)
            for _, _, name, i in flat.slots:
                out[name] = views[i]
        return out

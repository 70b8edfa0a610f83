"""What memory a rank holds, counted from the tensors themselves: activations kept for backward, model states.

    with ActivationMeter(model) as meter:            # bytes autograd keeps for backward, each storage once
        loss = model(x, y)[1]
    ActivationPeak(model)                            # the same around each forward of a step: the step's peak
    held_bytes(model, optimizer)                     # params / grads / optimizer state this rank holds
    deepspeed_held_bytes(engine, grads=True)         # the same, read from a DeepSpeed engine's tensors
    gather_per_rank(held, world_size)                # every rank's numbers, on every rank (one all-gather)

Every count goes through :func:`storage_bytes`: views of one flat buffer count once, padding included.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


def storage_bytes(tensors, skip: set | None = None) -> tuple[int, set]:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer count once; empty tensors and storages
    in ``skip`` not at all). Returns (bytes, the storages counted plus ``skip``), to count the next kind without
    these."""
    seen, total = set(skip or ()), 0
    for t in tensors:
        if not torch.is_tensor(t) or t.numel() == 0:
            continue
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total, seen


def _tensors(x):
    if torch.is_tensor(x):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """What this rank holds right now: parameters, gradients and optimizer state, in bytes.

    Works for a plain or DataParallel model with any optimizer, ZeRO by hand's ShardedOptimizer and
    FullyShardedModule (labs_lib.parallel.zero). Adam's 0-dim step counters (a few bytes per tensor) are left out,
    as the formulas do."""
    inner = getattr(optimizer, "optimizer", optimizer)  # ShardedOptimizer keeps its state in the inner one
    params = list(model.parameters())
    stepped = [p for g in inner.param_groups for p in g["params"]]
    state = [t for s in inner.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0]
    return {"params": storage_bytes(params)[0],
            "grads": storage_bytes(p.grad for p in params + stepped if p.grad is not None)[0],
            "optimizer": storage_bytes(state)[0]}


def deepspeed_held_bytes(engine, grads: bool = False) -> dict[str, int]:
    """What this rank holds, read from a DeepSpeed engine's tensors: ``params`` (ZeRO-3: this rank's partition),
    ``master`` (fp32 copies the ZeRO optimizers keep beside the model's weights), ``optimizer`` (Adam's moments);
    with ``grads=True`` also ``grads`` (full .grad tensors plus ZeRO's reduced gradient partitions)."""
    params = list({id(p): p for p in engine.module.parameters()}.values())
    params_b, param_storages = storage_bytes(getattr(p, "ds_tensor", p) for p in params)
    zero_opt = engine.optimizer
    inner = getattr(zero_opt, "optimizer", zero_opt)  # ZeRO wraps torch's (or DeepSpeedCPUAdam) optimizer
    masters = [getattr(zero_opt, name, None) for name in ("single_partition_of_fp32_groups",  # ZeRO-1/2
                                                          "fp32_partitioned_groups_flat",  # ZeRO-3
                                                          "fp32_groups_flat_partition",  # bf16 optimizer
                                                          "fp32_groups")]  # bf16, ZeRO-0
    master_b, _ = storage_bytes(_tensors(masters), skip=param_storages)  # fp32 ZeRO-3 reuses the weights
    optim_b, _ = storage_bytes(_tensors(list(inner.state.values())))
    held = {"params": params_b, "master": master_b, "optimizer": optim_b}
    if grads:
        partitions = [getattr(zero_opt, "averaged_gradients", None),
                      getattr(zero_opt, "grad_partitions_flat_buffer", None)]
        held["grads"] = storage_bytes(list(_tensors(partitions)) + [t.grad for t in params + list(_tensors(masters))
                                                                    if t.grad is not None])[0]  # offload: masters'
    return held


def gather_per_rank(values: dict[str, int | float], world_size: int, device=None) -> list[dict[str, int | float]]:
    """Every rank's ``values`` (numbers under the same keys; integers stay integers, exact below 2**53), by rank, on
    every rank: one all-gather on ``device`` (none on one process). A collective: call it on every rank."""
    if world_size == 1:
        return [values]
    keys = sorted(values)
    mine = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    everyone = [torch.zeros_like(mine) for _ in range(world_size)]
    dist.all_gather(everyone, mine)
    return [{k: int(v) if isinstance(values[k], int) else v for k, v in zip(keys, t.tolist())} for t in everyone]


def per_rank_fields(values: list[dict[str, int]]) -> dict[str, dict[str, int] | int]:
    """{"mem_rank<r>": rank r's held bytes}, and {"act_rank<r>": its activation bytes} when the values have
    ``activations``: how the trainers put :func:`gather_per_rank` into metrics.jsonl."""
    fields = {}
    for rank, held in enumerate(values):
        fields[f"mem_rank{rank}"] = {k: v for k, v in held.items() if k != "activations"}
        if "activations" in held:
            fields[f"act_rank{rank}"] = held["activations"]
    return fields


class ActivationMeter:
    """Bytes that autograd keeps for backward while the context is open, exactly, on any device.

    Counts every distinct storage saved by an operation once (a tensor saved twice, or two views of one buffer,
    are the same memory) and leaves out the module's parameters, which exist whether or not backward runs::

        with ActivationMeter(model) as meter:
            loss = model(x, y)[1]
        meter.bytes

    Memory kept outside autograd's saved-tensor hooks is reported with :meth:`record`: the outputs that selective
    activation checkpointing caches (labs_lib.parallel.recompute.selective_policy). Full checkpointing needs
    nothing extra: the block inputs a checkpoint keeps are saved through the hooks.
    """

    _open: list[ActivationMeter] = []  # meters whose context is open, innermost last

    @classmethod
    def record(cls, tensor: torch.Tensor) -> None:
        """Count ``tensor`` as kept for backward in every open meter (no-op when none is open)."""
        for meter in cls._open:
            meter._pack(tensor)

    def __init__(self, module: torch.nn.Module | None = None):
        self._params = {p.untyped_storage().data_ptr() for p in module.parameters()} if module is not None else set()
        self._storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._params and ptr not in self._storages:
            self._storages[ptr] = storage.nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    def __enter__(self) -> ActivationMeter:
        self._storages.clear()
        self._hooks.__enter__()
        ActivationMeter._open.append(self)
        return self

    def __exit__(self, *exc) -> None:
        ActivationMeter._open.remove(self)
        self._hooks.__exit__(*exc)


class ActivationPeak:
    """The most bytes a step keeps for backward at once, over its forwards (each one an :class:`ActivationMeter`):
    a micro-batch's backward frees its activations before the next forward, so the step's peak is the largest
    forward's. Disabled (``enabled=False``), ``forward()`` is a null context: no hooks, no cost::

        peak = ActivationPeak(model)
        with peak.forward():
            loss = model(x, y)[1]      # the forward only: a recompute in backward is transient, not kept
        loss.backward()
        peak.add(schedule.peak_activation_bytes)   # a peak measured elsewhere (a pipeline schedule's)
        peak.take()                    # {"activations": the step's peak bytes} ({} disabled); the next starts at 0
    """

    def __init__(self, module: torch.nn.Module, enabled: bool = True):
        self._meter = ActivationMeter(module) if enabled else None
        self._peak = 0

    @contextlib.contextmanager
    def forward(self):
        if self._meter is None:
            yield
            return
        with self._meter:
            yield
        self.add(self._meter.bytes)

    def add(self, nbytes: int) -> None:
        self._peak = max(self._peak, nbytes)

    def take(self) -> dict[str, int]:
        peak, self._peak = self._peak, 0
        return {"activations": peak} if self._meter is not None else {}

"""One optimizer step of the GPT on each layout: the strategies behind ``python -m labs_lib.train``'s loop.

    strategy = make_strategy(model, cfg, parallel, info, mesh)   # DataParallelStep | ZeroStep | ExpertParallelStep
                                                                 # | MeshStep
    result = train_step(strategy, batches, cfg, device, scaler)  # the loss, grad norm and held bytes, on this rank
    step_fields(result, info, device)     # the record's {"loss", "grad_norm", "mem_rank<r>"} (+ "act_rank<r>",
                                          # an MoE GPT's "moe_load" and "moe_dropped_fraction")

What differs between the layouts is each strategy's ``forward_backward`` (one micro-batch), ``finish_gradients``
(the data-parallel reduction once the micro-batches are done), ``clip_grad_norm_`` and ``held_bytes``, and what a
checkpoint holds (``checkpoint_state`` / ``load_checkpoint``); :func:`train_step` is the same for all, the way
torchtitan splits ``train_step`` from ``forward_backward_step``. Checkpoints stay single-device: the weights are
gathered on save and cut again on resume; optimizer state is saved per shard.

Memory, measured on every layout: ``held_bytes`` is what this rank's parameters, gradients and optimizer state take
after the optimizer step (gradients not yet zeroed); with ``measure_activations`` also ``activations``, the most
bytes the step kept for backward at once (labs_lib.measure.memory.ActivationPeak around every forward; through a
pipeline, the schedule's ``peak_activation_bytes`` with its meter on). Off, nothing is metered. What the meter
counts beyond the blocks (tests/test_measured_memory.py, to the byte): the final LayerNorm and lm_head inputs, the
log-softmax output, the int64 token windows and the loss's copy of the targets. Through a pipeline each micro-batch
counts the whole batch's token storage (its ids are a view of it); under ZeRO-3 the all-gathered weights a unit's
forward saves count too, at full size, although the unit frees them after its forward.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from labs_lib.core import checkpoint
from labs_lib.core.config import TrainConfig
from labs_lib.core.dist import DistInfo, all_reduce_flat_, all_reduce_mean
from labs_lib.measure.memory import ActivationPeak, gather_per_rank, held_bytes, per_rank_fields
from labs_lib.models.moe import MoEMLP
from labs_lib.parallel import experts
from labs_lib.parallel.mesh import Mesh
from labs_lib.parallel.parallel3d import Parallel3D
from labs_lib.parallel.recompute import apply_activation_checkpointing
from labs_lib.parallel.rng import TP_RNG, get_rng_tracker
from labs_lib.parallel.tensor_parallel import reduce_sequence_parallel_grads
from labs_lib.parallel.zero_data_parallel import ZeroDataParallel
from labs_lib.train.optim import make_optimizer, param_groups


def autocast(dtype: str, device: torch.device):
    """The forward's mixed precision: none for fp32, else torch.autocast to bf16 / fp16."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


def all_reduce_gradients(model: torch.nn.Module, world_size: int, group=None) -> None:
    """Average all gradients over ``group`` (of ``world_size`` ranks) in one flat all-reduce after backward (the
    no-overlap baseline of lab 02; the data parallelism of a tensor/pipeline-parallel run)."""
    all_reduce_flat_([p.grad for p in model.parameters() if p.grad is not None], group, divide_by=world_size)


@torch.no_grad()
def evaluate(model, batches: list, dtype: str, device: torch.device) -> float:
    """Mean loss of ``model(x, y)`` over ``batches``, averaged over the ranks (every rank has its own slice)."""
    model.eval()
    losses = []
    for x, y in batches:
        with autocast(dtype, device):
            losses.append(model(x.to(device), y.to(device))[1].float().item())
    model.train()
    return all_reduce_mean(sum(losses) / len(losses))


class DataParallelStep:
    """One process, or torch DDP over every rank (``overlap``: all-reduce buckets during backward; without it,
    every micro-batch runs under no_sync and one flat all-reduce follows backward)."""

    holds_loss = True  # every rank computes the loss of its batch

    def __init__(self, model, cfg: TrainConfig, info: DistInfo, measure_activations: bool = False):
        self.model, self.info = model, info
        self.activations = ActivationPeak(model, measure_activations)
        self.optimizer = make_optimizer(param_groups(model, cfg.weight_decay), cfg)
        compiled = torch.compile(model) if cfg.compile else model  # compile, then wrap (torchtitan's order)
        self.forward_model = (DistributedDataParallel(compiled, bucket_cap_mb=cfg.ddp_bucket_mb) if info.distributed
                              else compiled)
        self.overlap = cfg.ddp_overlap or not info.distributed

    def forward_backward(self, x, y, last: bool, accum: int, scaler, dtype: str):
        sync = self.info.distributed and last and self.overlap
        with contextlib.nullcontext() if sync or not self.info.distributed else self.forward_model.no_sync():
            with autocast(dtype, self.info.device), self.activations.forward():
                loss = self.forward_model(x, y)[1] / accum
            scaler.scale(loss).backward()
        return loss

    def finish_gradients(self) -> None:
        if not self.overlap:
            all_reduce_gradients(self.model, self.info.world_size)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def held_bytes(self) -> dict[str, int]:
        return held_bytes(self.model, self.optimizer) | self.activations.take()

    @property
    def evaluated(self):
        return self.model

    def checkpoint_state(self, tmp: Path) -> tuple[dict | None, dict | None]:
        checkpoint.write_rank_state(tmp, self.info.rank)
        return (self.model.state_dict() if self.info.is_main else None), self.optimizer.state_dict()

    def load_checkpoint(self, latest: Path) -> None:
        self.optimizer.load_state_dict(checkpoint.load_optimizer_state(latest))


class ZeroStep(DataParallelStep):
    """ZeRO by hand (labs_lib.parallel.zero_data_parallel) instead of DDP: it owns the forward, the optimizer and
    the gradient synchronization. Each rank checkpoints its own optimizer shard."""

    def __init__(self, model, cfg: TrainConfig, info: DistInfo, measure_activations: bool = False):
        self.model, self.info, self.overlap = model, info, True
        forward = torch.compile(model) if cfg.compile else model
        self.zero = ZeroDataParallel(model, cfg.zero_stage, param_groups(model, cfg.weight_decay), cfg.lr,
                                     (cfg.beta1, cfg.beta2), cfg.ddp_bucket_mb, forward_model=forward)
        self.activations = ActivationPeak(model, measure_activations)
        self.optimizer = self.zero.optimizer

    def forward_backward(self, x, y, last: bool, accum: int, scaler, dtype: str):
        with self.zero.micro_batch(last):  # stage 1: no_sync but for the last; 2/3: reduce-scatter each backward
            with autocast(dtype, self.info.device), self.activations.forward():
                loss = self.zero(x, y)[1] / accum
            scaler.scale(loss).backward()
        return loss

    def finish_gradients(self) -> None:
        pass  # done by micro_batch

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        return self.zero.clip_grad_norm_(max_norm)

    def held_bytes(self) -> dict[str, int]:
        return self.zero.held_bytes() | self.activations.take()

    @property
    def evaluated(self):
        return self.zero

    def checkpoint_state(self, tmp: Path) -> tuple[dict | None, dict | None]:
        checkpoint.write_rank_state(tmp, self.info.rank)
        checkpoint.write_optimizer_shard(tmp, self.zero.shard_name(self.info.rank), self.optimizer.state_dict())
        return self.zero.full_state_dict(), None  # weights gathered whole (stage 3: a collective)

    def load_checkpoint(self, latest: Path) -> None:
        self.optimizer.load_state_dict(checkpoint.load_optimizer_shard(latest, self.zero.shard_name(self.info.rank)))


class ExpertParallelStep(DataParallelStep):
    """DDP for everything but the experts, which each MoE layer spreads over groups of ``ep`` ranks
    (labs_lib.parallel.experts): their gradients are summed over the replicas after backward, the clipping norm
    counts every expert once, the checkpoint gathers them into the single-device weights, and each rank saves
    its own optimizer state (its experts' moments)."""

    def __init__(self, model, cfg: TrainConfig, info: DistInfo, ep: int, measure_activations: bool = False):
        self.groups = experts.expert_groups(ep)
        experts.apply_expert_parallel(model, self.groups.ep_group)
        local = {id(p) for p in experts.expert_parameters(model)}
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, [name for name, p in model.named_parameters() if id(p) in local])
        super().__init__(model, cfg, info, measure_activations)

    def finish_gradients(self) -> None:
        super().finish_gradients()
        experts.finish_expert_gradients(self.model, self.groups)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        return experts.clip_grad_norm_(self.model, max_norm, self.groups)

    def checkpoint_state(self, tmp: Path) -> tuple[dict | None, dict | None]:
        checkpoint.write_rank_state(tmp, self.info.rank)
        checkpoint.write_optimizer_shard(tmp, f"ep_rank{self.info.rank}", self.optimizer.state_dict())
        state = experts.full_state_dict(self.model, self.groups)  # a collective
        return (state if self.info.is_main else None), None

    def load_checkpoint(self, latest: Path) -> None:
        self.optimizer.load_state_dict(checkpoint.load_optimizer_shard(latest, f"ep_rank{self.info.rank}"))


class MeshStep:
    """DP x TP x PP (labs_lib.parallel.parallel3d): the pipeline schedule runs forward and backward of each batch,
    then one all-reduce over the data-parallel group. Optimizer state is saved per (pp, tp) shard."""

    @property
    def holds_loss(self) -> bool:
        return self.model.holds_loss  # through a pipeline, only the last stage's ranks

    def __init__(self, model: Parallel3D, cfg: TrainConfig, info: DistInfo, mesh: Mesh,
                 measure_activations: bool = False):
        self.model, self.info, self.mesh = model, info, mesh
        self.activations = ActivationPeak(model, measure_activations)
        self.optimizer = make_optimizer(param_groups(model, cfg.weight_decay), cfg)

    def forward_backward(self, x, y, last: bool, accum: int, scaler, dtype: str):
        with autocast(dtype, self.info.device):
            if self.model.schedule is not None:  # the schedule meters its forwards when built with measure=True
                loss = self.model.forward_backward(x, y, accum)
                self.activations.add(self.model.schedule.peak_activation_bytes)
                return loss
            with self.activations.forward():  # the forward only, as on the data-parallel layouts
                loss = self.model(x, y)[1] / accum
        loss.backward()
        return loss.detach()

    def finish_gradients(self) -> None:
        if self.mesh.tp > 1:
            reduce_sequence_parallel_grads(self.model)
        if self.mesh.dp > 1:
            all_reduce_gradients(self.model, self.mesh.dp, self.mesh.dp_group)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        return self.model.clip_grad_norm_(max_norm)

    def held_bytes(self) -> dict[str, int]:
        return held_bytes(self.model, self.optimizer) | self.activations.take()

    @property
    def evaluated(self):
        return self.model

    def checkpoint_state(self, tmp: Path) -> tuple[dict | None, dict | None]:
        cpu, cuda = get_rng_tracker().states[TP_RNG]
        extra = {"tensor_parallel_torch": cpu} | ({"tensor_parallel_cuda": cuda} if cuda is not None else {})
        checkpoint.write_rank_state(tmp, self.info.rank, extra)
        if self.mesh.dp_rank == 0:  # the other replicas hold the same
            checkpoint.write_optimizer_shard(tmp, self.mesh.shard_name, self.optimizer.state_dict())
        return self.model.full_state_dict(), None  # the single-device weights (a collective)

    def load_checkpoint(self, latest: Path) -> None:
        self.optimizer.load_state_dict(checkpoint.load_optimizer_shard(latest, self.mesh.shard_name))


def make_strategy(model, cfg: TrainConfig, parallel, info: DistInfo, mesh: Mesh | None, latest: Path | None,
                  measure_activations: bool = False):
    """The step strategy for the layout, built around the single-device ``model`` in torchtitan's order: TP and
    pipeline stages (Parallel3D), then activation checkpointing, then compile and DDP / ZeRO. A resumed run's
    single-device weights are loaded before the model is split or sharded; each strategy's ``load_checkpoint``
    then restores its optimizer state. ``measure_activations``: each step's held bytes get ``activations``."""
    if latest is not None:
        model.load_state_dict(checkpoint.load_model_state(latest))
    if mesh is not None:
        model = Parallel3D(model, mesh, parallel, measure=measure_activations)
    apply_activation_checkpointing(model, cfg.activation_checkpointing)
    if mesh is not None:
        return MeshStep(model, cfg, info, mesh, measure_activations)
    if parallel.ep > 1:
        return ExpertParallelStep(model, cfg, info, parallel.ep, measure_activations)
    step = ZeroStep if cfg.zero_stage else DataParallelStep
    return step(model, cfg, info, measure_activations)


def train_step(strategy, batches, cfg: TrainConfig, device: torch.device, scaler) -> tuple:
    """One optimizer step: ``grad_accum`` micro-batches forward and backward, the gradients finished, clipped and
    applied; returns this rank's (summed loss or None where the rank does not compute it, gradient norm, held
    bytes, MoE routing) for :func:`step_fields`."""
    loss_sum = torch.zeros((), device=device)  # summed on the device: no sync per micro-batch
    for micro in range(cfg.grad_accum):
        x, y = (t.to(device, non_blocking=True) for t in next(batches))
        loss = strategy.forward_backward(x, y, micro == cfg.grad_accum - 1, cfg.grad_accum, scaler, cfg.dtype)
        loss_sum += loss.detach().float()
    strategy.finish_gradients()
    scaler.unscale_(strategy.optimizer)
    grad_norm = strategy.clip_grad_norm_(cfg.grad_clip or float("inf"))
    scaler.step(strategy.optimizer)
    scaler.update()
    held = strategy.held_bytes()
    strategy.optimizer.zero_grad(set_to_none=True)
    routing = [m.take_routing() for m in strategy.model.modules() if isinstance(m, MoEMLP)]
    return (loss_sum if strategy.holds_loss else None), grad_norm, held, routing


def step_fields(result: tuple, info: DistInfo, device: torch.device) -> dict:
    """A step's record fields from :func:`train_step`'s result: the loss averaged over the ranks, the gradient norm,
    ``mem_rank<r>`` (rank r's held bytes after the step: params, grads, optimizer) and, when activations are
    measured, ``act_rank<r>`` (rank r's peak activation bytes in the step). Collectives: every rank calls it."""
    loss_sum, grad_norm, held, routing = result
    # One all-gather for the record: every rank's held bytes and loss. The ranks that compute a replica's loss (all
    # of them, or its last pipeline stage's) hold the same value, so their mean is the mean over the replicas.
    mine = {**held, "loss": 0.0 if loss_sum is None else loss_sum.item(), "holds_loss": int(loss_sum is not None)}
    ranks = gather_per_rank(mine, info.world_size, device)
    losses = [loss for loss, holds in [(r.pop("loss"), r.pop("holds_loss")) for r in ranks] if holds]
    fields = {"loss": sum(losses) / len(losses), "grad_norm": grad_norm.item()}
    return fields | per_rank_fields(ranks) | moe_fields(routing, info)


def moe_fields(routing: list, info: DistInfo) -> dict:
    """An MoE GPT's record fields, summed over the ranks: ``moe_load`` (tokens per expert, one row per MoE layer)
    and ``moe_dropped_fraction`` (assignments over capacity). A collective when distributed; {} for a dense GPT."""
    if not routing:
        return {}
    totals = torch.tensor([[*r.counts, r.dropped, r.assignments] for r in routing], dtype=torch.int64)
    if info.distributed:
        dist.all_reduce(totals)
    return {"moe_load": totals[:, :-2].tolist(),
            "moe_dropped_fraction": totals[:, -2].sum().item() / max(totals[:, -1].sum().item(), 1)}

"""Expert parallelism: the experts of an MoE layer spread over a group of ranks, tokens sent to them with all-to-all.

    apply_expert_parallel(model, group)        # every MoEMLP's bank now holds only this rank's experts
    groups = expert_groups(ep)                 # this rank's expert-parallel group and its experts' replicas
    finish_expert_gradients(model, groups); clip_grad_norm_(model, max_norm, groups)
    full_state_dict(model, groups)             # the single-device weights (a collective)

Each rank keeps experts ``rank·E/n .. (rank+1)·E/n − 1`` of the E in a layer and routes its own tokens (the ranks
of the group are data parallel for everything else). The bank's forward, given its tokens sorted by expert
(labs_lib.models.moe), then runs (GShard's dispatch and combine, with uneven splits instead of padding to capacity):

1. all-to-all of the token counts: rank s tells rank j how many tokens it has for each of j's experts;
2. all-to-all of the tokens (:class:`AllToAll`: its backward is the all-to-all with the splits swapped);
3. the received tokens, grouped by source rank, regrouped by local expert; the local experts run;
4. back to source order, and the reverse all-to-all returns each token's output to the rank it came from.

The router, attention and embeddings stay replicated: average their gradients over the group as data parallel
does. An expert's gradient is already the sum over every rank's tokens that reached it; divide by the group size
to match the data-parallel mean (:func:`expert_parameters` names them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from labs_lib.core.dist import all_reduce_flat_
from labs_lib.models.moe import ExpertBank, MoEMLP, check_moe


class AllToAll(torch.autograd.Function):
    """``x`` split by rows into ``send`` counts (one per rank) is exchanged: this rank receives ``recv`` rows from
    each rank. Backward sends the gradients the way the rows came."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return AllToAll.apply(grad.contiguous(), ctx.recv, ctx.send, ctx.group), None, None, None


class ExpertParallelBank(nn.Module):
    """This rank's slice of an :class:`ExpertBank`, called with all E experts' counts like the whole bank."""

    def __init__(self, bank: ExpertBank, group=None):
        super().__init__()
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.n_experts = bank.n_experts
        self.local_experts = bank.n_experts // self.world
        first = self.rank * self.local_experts
        local = ExpertBank(self.local_experts, bank.fc.shape[1], bank.fc.shape[2], bank.fc_bias is not None)
        with torch.no_grad():
            for name, param in local.named_parameters():
                param.copy_(getattr(bank, name)[first:first + self.local_experts])
        self.local = local

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        el, world = self.local_experts, self.world
        send_counts = torch.tensor(counts, dtype=torch.int64, device=x.device)  # NCCL exchanges device tensors
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)  # [s, e]: rank s's tokens for my e
        recv = recv_counts.view(world, el).cpu()
        send = [sum(counts[j * el:(j + 1) * el]) for j in range(world)]
        received = AllToAll.apply(x, send, recv.sum(dim=1).tolist(), self.group)
        by_expert = _regroup(recv).to(x.device)
        out = self.local(received[by_expert], recv.sum(dim=0).tolist())
        back = torch.empty_like(out).index_copy_(0, by_expert, out)  # source order again
        return AllToAll.apply(back, recv.sum(dim=1).tolist(), send, self.group)


def _regroup(recv: torch.Tensor) -> torch.Tensor:
    """Row order that turns received rows (by source rank, then local expert) into (by local expert, then source)."""
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), recv.reshape(-1).cumsum(0)[:-1]]).view_as(recv)
    runs = [torch.arange(int(starts[s, e]), int(starts[s, e] + recv[s, e]))
            for e in range(recv.shape[1]) for s in range(recv.shape[0])]
    return torch.cat(runs) if runs else torch.zeros(0, dtype=torch.int64)


def apply_expert_parallel(model: nn.Module, group=None) -> nn.Module:
    """Give every MoEMLP of ``model`` an ExpertParallelBank over ``group`` (the model's other parameters stay)."""
    world = dist.get_world_size(group)
    for module in model.modules():
        if isinstance(module, MoEMLP):
            check_moe(module.n_experts, module.top_k, module.capacity_factor, module.noise, ep=world)
            module.experts = ExpertParallelBank(module.experts, group)
    return model


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that live on one rank of the expert-parallel group only (not to be all-reduced across it)."""
    return [p for m in model.modules() if isinstance(m, ExpertParallelBank) for p in m.local.parameters()]


@dataclass(frozen=True)
class ExpertGroups:
    """The ranks ``ep`` consecutive at a time share out the experts (``ep_group``); ranks with the same place in
    those groups hold the same experts (``replica_group``, world / ep of them: the experts' data parallelism)."""
    ep: int
    world: int
    ep_group: dist.ProcessGroup
    replica_group: dist.ProcessGroup


def expert_groups(ep: int) -> ExpertGroups:
    """Both groups for this rank (a collective: every rank calls it, in the same order)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = {}
    for start in range(0, world, ep):  # new_group: every rank creates every group
        group = dist.new_group(list(range(start, start + ep)))
        if start <= rank < start + ep:
            mine["ep"] = group
    for place in range(ep):
        group = dist.new_group(list(range(place, world, ep)))
        if rank % ep == place:
            mine["replica"] = group
    return ExpertGroups(ep, world, mine["ep"], mine["replica"])


def finish_expert_gradients(model: nn.Module, groups: ExpertGroups) -> None:
    """An expert's gradient is the sum over its ep group's tokens: add the replicas' sums, divide by the world (the
    data-parallel mean every other parameter gets from DDP)."""
    grads = [p.grad for p in expert_parameters(model) if p.grad is not None]
    if groups.world > groups.ep:
        all_reduce_flat_(grads, groups.replica_group, divide_by=groups.world)
    else:
        for g in grads:
            g.div_(groups.world)


def clip_grad_norm_(model: nn.Module, max_norm: float, groups: ExpertGroups) -> torch.Tensor:
    """The global gradient norm (the replicated parameters counted once, every expert once) and clipping by it: every
    rank gets the same norm, so the replicated parameters stay equal."""
    experts = {id(p) for p in expert_parameters(model)}
    local = [p.grad for p in model.parameters() if p.grad is not None and id(p) not in experts]
    expert_grads = [p.grad for p in expert_parameters(model) if p.grad is not None]
    zero = torch.zeros((), device=next(model.parameters()).device)  # on the device the collective runs on
    replicated_sq = sum((g.float().square().sum() for g in local), zero)
    expert_sq = sum((g.float().square().sum() for g in expert_grads), zero)
    dist.all_reduce(expert_sq, group=groups.ep_group)  # each expert lives on one rank of the ep group
    norm = (replicated_sq + expert_sq).sqrt()
    scale = max_norm / (norm + 1e-6)
    if scale < 1 and math.isfinite(max_norm):
        for g in local + expert_grads:
            g.mul_(scale)
    return norm


def full_state_dict(model: nn.Module, groups: ExpertGroups) -> dict[str, torch.Tensor]:
    """The single-device GPT's state dict: each bank's experts gathered from its ep group (a collective)."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, ExpertParallelBank):
            for pname, param in module.local.named_parameters():
                parts = [torch.empty_like(param) for _ in range(groups.ep)]
                dist.all_gather(parts, param.detach().contiguous(), group=groups.ep_group)
                state[f"{name}.{pname}"] = torch.cat(parts)
    for key, value in model.state_dict().items():
        if ".experts.local." not in key:
            state[key] = value
    return state

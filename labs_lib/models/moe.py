"""A single-device mixture-of-experts MLP: a top-k router, expert capacity with counted drops, the auxiliary losses.

    moe = MoEMLP(n_embd=128, n_experts=8, top_k=1, capacity_factor=1.25)
    y = moe(x)                          # x: (..., n_embd); y the same shape
    moe.aux_loss, moe.z_loss            # Switch / GShard load-balancing loss and the router z-loss of that call
    moe.last_routing                    # RoutingStats: tokens per expert, tokens dropped
    moe.take_routing()                  # the same, summed over the training calls since the last take (a step's)

How a call runs (Shazeer et al. 2017; GShard, Lepikhin et al. 2020; Switch, Fedus et al. 2021; ST-MoE, Zoph et
al. 2022 for the z-loss):

1. **route**: logits = x·W_g; probabilities by softmax over the experts; each token picks its ``top_k`` experts.
   Noise in training: ``"jitter"`` multiplies the input by U(1−ε, 1+ε) (Switch's); ``"rsample"`` picks by the
   logits plus Gumbel noise (DeepSpeed's ``noisy_gate_policy="RSample"``), the gates staying the clean ones.
   With k > 1 the chosen gates are renormalised to sum to 1 (GShard); with k = 1 the gate is the raw probability
   (Switch), so the router gets a gradient.
2. **capacity**: each expert takes at most C = ceil(k · tokens / experts · capacity_factor) tokens. Slots are
   filled choice by choice (every token's first choice before any second choice, GShard's priority) and in token
   order within a choice; an assignment past C is dropped: that token gets nothing from that expert (its residual
   connection carries it on). ``capacity_factor=None`` never drops.
3. **experts**: ``self.experts`` (an :class:`ExpertBank`) runs each expert's MLP on the tokens sorted by expert,
   given how many each one got. Expert parallelism (labs_lib.parallel.experts) swaps in a bank that sends each
   token to the rank holding its expert and back: the model itself never learns about parallelism.
4. **combine**: y = Σ over a token's kept assignments of gate · expert(x).

Auxiliary losses of the call: ``aux_loss`` = E · Σ_e f_e · P_e, with f_e the fraction of tokens whose first
choice is expert e and P_e the mean router probability of e (Switch eq. 4; 1 when perfectly balanced), and
``z_loss`` = mean over tokens of logsumexp(logits)² (ST-MoE eq. 5). The trainer adds them with its coefficients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from labs_lib.core.config import NOISE_POLICIES, check_moe

__all__ = ["NOISE_POLICIES", "check_moe", "expert_capacity", "load_balancing_loss", "router_z_loss", "assign",
           "ExpertBank", "MoEMLP", "Routing", "RoutingStats"]

JITTER_EPS = 1e-2  # Switch Transformer's multiplicative jitter


def expert_capacity(tokens: int, n_experts: int, top_k: int, capacity_factor: float | None) -> int:
    """Slots per expert: ceil(k · tokens / experts · factor); every assignment fits when ``capacity_factor`` is None."""
    if capacity_factor is None:
        return tokens
    return max(1, math.ceil(top_k * tokens / n_experts * capacity_factor))


def load_balancing_loss(probs: torch.Tensor, first_choice: torch.Tensor) -> torch.Tensor:
    """Switch's auxiliary loss E · Σ_e f_e · P_e: ``probs`` (tokens, E) router probabilities, ``first_choice``
    (tokens,) each token's top expert. f_e counts first choices (not differentiable); P_e carries the gradient."""
    n_experts = probs.shape[-1]
    fraction = torch.bincount(first_choice, minlength=n_experts).to(probs.dtype) / first_choice.numel()
    return n_experts * torch.sum(fraction * probs.mean(dim=0))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's z-loss: the mean of logsumexp(logits)², which keeps the router's logits small."""
    return torch.logsumexp(logits, dim=-1).square().mean()


@dataclass
class Routing:
    """Which expert each kept assignment goes to, sorted by expert, and what to combine it back with."""
    token: torch.Tensor       # (kept,) the token index of each kept assignment, grouped by expert
    gate: torch.Tensor        # (kept,) its gate weight (differentiable)
    counts: list[int]         # tokens per expert after the capacity cut
    dropped: int              # assignments over capacity
    assignments: int          # tokens · k


@dataclass
class RoutingStats:
    counts: list[int]
    dropped: int
    assignments: int

    @property
    def dropped_fraction(self) -> float:
        return self.dropped / self.assignments if self.assignments else 0.0


def assign(expert_index: torch.Tensor, gates: torch.Tensor, n_experts: int, capacity: int) -> Routing:
    """Capacity-limited slots for ``expert_index`` (tokens, k): first choices first, then in token order; what
    overflows an expert's ``capacity`` is dropped. Returns the kept assignments grouped by expert."""
    tokens, k = expert_index.shape
    order_expert = expert_index.t().reshape(-1)  # choice-major: every first choice, then every second choice
    order_token = torch.arange(tokens, device=expert_index.device).repeat(k)
    order_gate = gates.t().reshape(-1)
    one_hot = F.one_hot(order_expert, n_experts)
    position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=1) - 1  # the slot each assignment would take
    kept = position < capacity
    by_expert = torch.sort(order_expert[kept], stable=True).indices  # grouped by expert, slot order kept
    counts = torch.bincount(order_expert[kept], minlength=n_experts).tolist()
    return Routing(token=order_token[kept][by_expert], gate=order_gate[kept][by_expert], counts=counts,
                   dropped=int((~kept).sum()), assignments=tokens * k)


class ExpertBank(nn.Module):
    """``n_experts`` GELU MLPs (n_embd → hidden → n_embd) stored as stacked weights; ``forward`` applies expert e to
    the e-th run of ``counts[e]`` rows of ``x`` (tokens sorted by expert)."""

    def __init__(self, n_experts: int, n_embd: int, hidden: int, bias: bool = True):
        super().__init__()
        self.n_experts = n_experts
        self.fc = nn.Parameter(torch.empty(n_experts, n_embd, hidden))
        self.proj = nn.Parameter(torch.empty(n_experts, hidden, n_embd))
        self.fc_bias = nn.Parameter(torch.zeros(n_experts, hidden)) if bias else None
        self.proj_bias = nn.Parameter(torch.zeros(n_experts, n_embd)) if bias else None
        nn.init.normal_(self.fc, std=0.02)
        nn.init.normal_(self.proj, std=0.02)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.fc[e]
        if self.fc_bias is not None:
            h = h + self.fc_bias[e]
        y = F.gelu(h) @ self.proj[e]
        return y + self.proj_bias[e] if self.proj_bias is not None else y

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        if len(counts) != self.n_experts:
            raise ValueError(f"got token counts for {len(counts)} experts, this bank holds {self.n_experts}")
        chunks = torch.split(x, counts)
        return torch.cat([self.expert(e, chunk) for e, chunk in enumerate(chunks)]) if chunks else x


class MoEMLP(nn.Module):
    """A drop-in for the GPT block's MLP: router, capacity, experts, combine (see the module docstring)."""

    is_moe = True

    def __init__(self, n_embd: int, n_experts: int, top_k: int = 1, capacity_factor: float | None = 1.25,
                 noise: str = "none", hidden: int | None = None, bias: bool = True):
        super().__init__()
        check_moe(n_experts, top_k, capacity_factor, noise)
        self.n_experts, self.top_k, self.capacity_factor, self.noise = n_experts, top_k, capacity_factor, noise
        self.gate = nn.Linear(n_embd, n_experts, bias=False)
        self.experts = ExpertBank(n_experts, n_embd, hidden or 4 * n_embd, bias)
        self.aux_loss = self.z_loss = torch.zeros(())
        self.last_routing: RoutingStats | None = None
        self._totals = RoutingStats([0] * n_experts, 0, 0)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.noise == "jitter":
            x = x * torch.empty_like(x).uniform_(1 - JITTER_EPS, 1 + JITTER_EPS)
        return self.gate(x)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """Each token's top_k experts. Under "rsample" in training by the logits plus Gumbel noise (DeepSpeed's:
        the Gumbel-max trick samples the first choice from the softmax); the gates stay the clean probabilities."""
        if self.training and self.noise == "rsample":
            uniform = torch.rand_like(logits).clamp_(1e-20, 1.0)
            logits = logits - torch.log(-torch.log(uniform))
        return logits.topk(self.top_k, dim=-1).indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router_logits(x)
        probs = logits.float().softmax(dim=-1)
        top_index = self.choose(logits.detach().float())
        top_probs = probs.gather(-1, top_index)
        gates = top_probs / top_probs.sum(dim=-1, keepdim=True) if self.top_k > 1 else top_probs
        routing = assign(top_index, gates.to(x.dtype), self.n_experts,
                         expert_capacity(x.shape[0], self.n_experts, self.top_k, self.capacity_factor))
        out = self.experts(x[routing.token], routing.counts) * routing.gate.unsqueeze(-1)
        y = torch.zeros_like(x).index_add_(0, routing.token, out)
        self.aux_loss = load_balancing_loss(probs, top_index[:, 0])
        self.z_loss = router_z_loss(logits.float())
        self.last_routing = RoutingStats(routing.counts, routing.dropped, routing.assignments)
        if self.training:  # what a training step routed (evaluation between steps is not part of it)
            t = self._totals
            self._totals = RoutingStats([a + b for a, b in zip(t.counts, routing.counts)],
                                        t.dropped + routing.dropped, t.assignments + routing.assignments)
        return y.reshape(shape)

    def take_routing(self) -> RoutingStats:
        """Tokens per expert and drops summed over the calls since the last take; starts the sums again."""
        totals, self._totals = self._totals, RoutingStats([0] * self.n_experts, 0, 0)
        return totals

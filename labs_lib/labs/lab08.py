"""Lab 08, mixture of experts: the exercises' routings and their checks, and the single-process measurements.

    gates, experts = reference_top_k_gating(logits, k)       # what exercise 1's top_k_gating must return
    check_top_k_gating(top_k_gating)                          # exercise 1: the learner's function, on fixed logits
    probs, first = balancing_exercise(); check_balancing_loss(answer)          # exercise 2
    choices, factor = drop_exercise(); check_dropped_tokens(answer)            # exercise 3
    dropped_fraction_curve(moe, x, factors)                  # tokens dropped against the capacity factor

The expected values are computed here from labs_lib.models.moe, out of the notebook's sight.
"""

from __future__ import annotations

import torch

from labs_lib.labs.checks import check
from labs_lib.models.moe import MoEMLP, assign, expert_capacity, load_balancing_loss

__all__ = ["reference_top_k_gating", "check_top_k_gating", "balancing_exercise", "check_balancing_loss",
           "drop_exercise", "check_dropped_tokens", "dropped_fraction_curve"]

EXERCISE_EXPERTS = 4


def reference_top_k_gating(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts, each token's k largest; gates renormalised to sum to 1 when k > 1 (GShard), the raw
    probability when k = 1 (Switch). Returns (gates (tokens, k), experts (tokens, k)), largest first."""
    top, experts = logits.softmax(dim=-1).topk(k, dim=-1)
    return (top / top.sum(dim=-1, keepdim=True) if k > 1 else top), experts


def check_top_k_gating(fn) -> bool:
    """Exercise 1: ``fn(logits, k) -> (gates, experts)`` on fixed logits, for k = 1 and k = 2."""
    if fn is None or fn is Ellipsis:
        return check("top-k gating", None, None, hint="write top_k_gating(logits, k) and pass it here.")
    logits = torch.randn(16, EXERCISE_EXPERTS, generator=torch.Generator().manual_seed(8))
    for k in (1, 2):
        gates, experts = fn(logits.clone(), k)
        want_gates, want_experts = reference_top_k_gating(logits, k)
        if tuple(gates.shape) != (16, k) or not torch.equal(experts, want_experts):
            raise AssertionError(f"❌ top-k gating, k={k}: expected experts of shape (16, {k}), largest probability "
                                 "first (torch.topk on the softmax)")
        if not torch.allclose(gates, want_gates, atol=1e-6):
            hint = "renormalise the k gates to sum to 1" if k > 1 else "with k = 1 the gate is the probability itself"
            raise AssertionError(f"❌ top-k gating, k={k}: the gates are off: {hint}")
    print("✅ top-k gating: correct for k = 1 and k = 2")
    return True


def balancing_exercise() -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed routing of 8 tokens over 4 experts: (router probabilities (8, 4), each token's first choice (8,))."""
    g = torch.Generator().manual_seed(80)
    probs = torch.randn(8, EXERCISE_EXPERTS, generator=g).mul(1.5).softmax(dim=-1)
    return probs, probs.argmax(dim=-1)


def check_balancing_loss(answer) -> bool:
    """Exercise 2: Switch's load-balancing loss E · Σ f_e · P_e of :func:`balancing_exercise`'s routing."""
    probs, first = balancing_exercise()
    return check("load-balancing loss", answer, load_balancing_loss(probs, first).item(), rtol=1e-4,
                 hint="f_e: the fraction of tokens whose first choice is e; P_e: the mean probability of e.")


def drop_exercise() -> tuple[list[int], float]:
    """12 tokens' top-1 experts (of 4) and a capacity factor: how many tokens does the layer drop?"""
    return [0, 1, 0, 0, 2, 0, 1, 0, 3, 0, 1, 1], 1.0


def check_dropped_tokens(answer) -> bool:
    """Exercise 3: tokens over capacity in :func:`drop_exercise` (C = ceil(k · tokens / experts · factor))."""
    choices, factor = drop_exercise()
    capacity = expert_capacity(len(choices), EXERCISE_EXPERTS, 1, factor)
    routing = assign(torch.tensor(choices).unsqueeze(1), torch.ones(len(choices), 1), EXERCISE_EXPERTS, capacity)
    return check("tokens dropped", answer, routing.dropped,
                 hint="count each expert's tokens; an expert keeps at most C of them.")


@torch.no_grad()
def dropped_fraction_curve(moe: MoEMLP, x: torch.Tensor, factors: list[float]) -> list[dict]:
    """The fraction of assignments ``moe`` drops on the tokens ``x`` at each capacity factor (routing unchanged)."""
    saved, training, rows = moe.capacity_factor, moe.training, []
    try:
        moe.eval()  # no router noise: the same routing at every factor
        for factor in factors:
            moe.capacity_factor = factor
            moe(x)
            rows.append({"capacity_factor": factor, "dropped_fraction": moe.last_routing.dropped_fraction})
    finally:
        moe.capacity_factor = saved
        moe.train(training)
    return rows

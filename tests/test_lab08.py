"""Lab 08's exercise checks (labs_lib.labs.lab08): right answers pass, wrong ones fail with a hint."""

import pytest
import torch

from labs_lib.labs import lab08
from labs_lib.models.moe import MoEMLP


def test_top_k_gating_check_accepts_the_reference_and_names_the_mistake():
    assert lab08.check_top_k_gating(lab08.reference_top_k_gating)

    def no_renormalising(logits, k):
        return logits.softmax(-1).topk(k, -1)

    with pytest.raises(AssertionError, match="renormalise"):
        lab08.check_top_k_gating(no_renormalising)

    def logits_not_probabilities(logits, k):
        top, experts = logits.topk(k, -1)
        return top, experts

    with pytest.raises(AssertionError, match="probability itself"):
        lab08.check_top_k_gating(logits_not_probabilities)
    assert lab08.check_top_k_gating(None) is False
    assert lab08.check_top_k_gating(lambda logits, k: ...) is False  # the notebook's unwritten body


def test_balancing_loss_check_by_hand():
    probs, first = lab08.balancing_exercise()
    fraction = torch.tensor([(first == e).float().mean() for e in range(4)])
    by_hand = 4 * float((fraction * probs.mean(0)).sum())
    assert lab08.check_balancing_loss(by_hand)
    with pytest.raises(AssertionError):
        lab08.check_balancing_loss(by_hand * 1.1)


def test_dropped_tokens_check_by_hand():
    choices, factor = lab08.drop_exercise()
    capacity = -(-len(choices) // 4)  # ceil(12 / 4 * 1.0) = 3
    by_hand = sum(max(0, choices.count(e) - capacity) for e in range(4))
    assert by_hand == 4  # capacity 3: expert 0 has 6 tokens (3 dropped), expert 1 has 4 (1 dropped)
    assert lab08.check_dropped_tokens(by_hand)
    with pytest.raises(AssertionError):
        lab08.check_dropped_tokens(by_hand + 1)


def test_dropped_fraction_falls_with_capacity_and_restores_the_factor():
    torch.manual_seed(0)
    moe = MoEMLP(16, 4, top_k=1, capacity_factor=1.25)
    rows = lab08.dropped_fraction_curve(moe, torch.randn(64, 16), [0.5, 1.0, 2.0, 4.0])
    fractions = [r["dropped_fraction"] for r in rows]
    assert fractions == sorted(fractions, reverse=True) and fractions[0] >= 0.5 and fractions[-1] == 0.0
    assert moe.capacity_factor == 1.25 and moe.training


def test_balanced_router_drops_one_minus_the_factor():
    assert [lab08.balanced_dropped_fraction(f) for f in (0.5, 1.0, 2.0)] == [0.5, 0.0, 0.0]
    index = (torch.arange(64) % 4).unsqueeze(1)  # perfectly balanced: 16 tokens per expert
    for factor in (0.25, 0.5, 1.0):
        r = lab08.assign(index, torch.ones(64, 1), 4, lab08.expert_capacity(64, 4, 1, factor))
        assert r.dropped / 64 == lab08.balanced_dropped_fraction(factor)


def test_parameter_rows_count_experts_but_not_their_flops():
    dense, moe = lab08.parameter_rows("ci")
    assert moe["params"] > dense["params"] and moe["active params"] < moe["params"]
    assert moe["FLOPs per token"] - dense["FLOPs per token"] == 6 * (moe["active params"] - dense["active params"])

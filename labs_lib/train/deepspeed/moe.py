"""DeepSpeed's MoE layer (deepspeed.moe.layer.MoE) in the workshop GPT: the production side of lab 08's MoE by hand.

    torchrun --standalone --nproc-per-node=4 -m labs_lib.train.deepspeed.gpt --profile ci --out build/runs/ds_moe \
        --ds-config zero2.json --n-experts 8 --ep 4 --moe-noise rsample [--moe-residual]

The closed course's settings: 8 experts, ``ep_size`` 4 (2 local experts per rank), top-1 gating,
``noisy_gate_policy="RSample"``, standard or residual MoE (Rajbhandari et al. 2022: a dense MLP beside the experts,
mixed by a learned coefficient), and the optimizer's parameter groups split so that expert parameters are reduced
over their expert-data-parallel group only (``split_params_into_different_moe_groups_for_optimizer``).

Applied from outside, like every parallelism here: :func:`apply_deepspeed_moe` swaps the MLP of each MoE block of
the single-device GPT (``config.is_moe_block``) for a :class:`DeepSpeedMoEMLP` whose experts are the GPT's own MLP.
Its ``aux_loss`` is DeepSpeed's ``l_aux`` (the same Switch / GShard balancing loss), which the GPT adds to the
training loss with ``moe_aux_coef`` as it does for its own MoE layers. DeepSpeed's gate differs from ours in two
documented ways: a minimum capacity of 4 tokens per expert, and random token selection (``use_rts``) instead of
position priority when an expert overflows.
"""

from __future__ import annotations

import torch
from torch import nn

from labs_lib.core.config import GPTConfig
from labs_lib.models.gpt import GPT, MLP

NOISE_POLICY = {"none": None, "jitter": "Jitter", "rsample": "RSample"}  # ours -> DeepSpeed's noisy_gate_policy


def check_deepspeed_moe(model: GPTConfig, ep: int, world_size: int, stage: int, residual: bool) -> None:
    """What DeepSpeed's MoE supports, as a ValueError naming the fix (before any process starts)."""
    if (ep > 1 or residual) and not model.n_experts:
        raise ValueError("--ep and --moe-residual shape MoE layers, and this GPT has none: add --n-experts N")
    if not model.n_experts:
        return
    if model.moe_top_k not in (1, 2):
        raise ValueError(f"DeepSpeed's gate supports top-1 and top-2 only, got --moe-top-k {model.moe_top_k}")
    if model.n_experts % ep or world_size % ep:
        raise ValueError(f"--ep {ep} must divide both the {model.n_experts} experts and the {world_size} ranks")
    if stage == 3:
        raise ValueError("DeepSpeed does not shard MoE layers with ZeRO-3: use a ZeRO 0, 1 or 2 config")


class DeepSpeedMoEMLP(nn.Module):
    """A GPT block's MLP as DeepSpeed's MoE layer; ``aux_loss`` holds the last call's ``l_aux``."""

    is_moe = True

    def __init__(self, config: GPTConfig, ep: int, residual: bool):
        super().__init__()
        from deepspeed.moe.layer import MoE

        factor = config.moe_capacity_factor
        self.moe = MoE(hidden_size=config.n_embd, expert=MLP(config), num_experts=config.n_experts, ep_size=ep,
                       k=config.moe_top_k, capacity_factor=factor or 1.0, eval_capacity_factor=factor or 1.0,
                       drop_tokens=factor is not None, noisy_gate_policy=NOISE_POLICY[config.moe_noise],
                       use_residual=residual)
        self.aux_loss = self.z_loss = torch.zeros(())
        self.expert_counts: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, self.aux_loss, self.expert_counts = self.moe(x)
        return y


def apply_deepspeed_moe(model: GPT, ep: int = 1, residual: bool = False) -> GPT:
    """Every MoE block of ``model`` gets DeepSpeed's MoE layer instead of ours (its experts freshly initialised)."""
    for i, block in enumerate(model.blocks):
        if model.config.is_moe_block(i):
            block.mlp = DeepSpeedMoEMLP(model.config, ep, residual)
    return model


def moe_param_groups(groups: list[dict]) -> list[dict]:
    """DeepSpeed's split of optimizer groups: expert parameters in groups of their own (reduced over the expert
    data-parallel ranks, not the whole world)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return split_params_into_different_moe_groups_for_optimizer([{**g, "name": f"group{i}"}
                                                                  for i, g in enumerate(groups)])

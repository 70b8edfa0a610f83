"""The optimizer every trainer uses: AdamW, weight decay on matrices only, and the learning-rate schedule.

    groups = param_groups(model, weight_decay=0.1)            # the one rule for which parameters decay
    optimizer = make_optimizer(groups, cfg)                   # AdamW with the config's betas, fused on GPU
    lr_at(step, cfg)                                          # linear warm-up, then cosine to min_lr
"""

from __future__ import annotations

import math

import torch

from labs_lib.core.config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay: tuple[str, ...] = ()) -> list[dict]:
    """Two groups: matrices decay, everything else (biases, LayerNorm gains, 1-d tables) and the parameters named in
    ``no_decay`` (e.g. a ViT's ``cls_token`` and ``pos_emb``) do not. Tied weights appear once."""
    decay, rest, seen = [], [], set()
    for name, p in model.named_parameters():  # named_parameters lists a tied weight once
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and name not in no_decay else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def make_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``groups`` (:func:`param_groups`) with the run's learning rate and betas."""
    params = [p for g in groups for p in g["params"]]
    # fused: one kernel for the whole update on GPU instead of a dozen per parameter
    fused = (bool(params) and all(p.is_cuda for p in params)) or None
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_lr`` at the end of the schedule."""
    it, total = step - 1, cfg.schedule_steps()
    if it < cfg.warmup_steps:
        return cfg.lr * (it + 1) / cfg.warmup_steps
    if it >= total:
        return cfg.min_lr
    progress = (it - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)

"""Knowledge distillation: a student GPT of about half the teacher's size trained on the teacher's soft targets.

    student = GPT(half_size_config(teacher.config))
    records = distill(teacher, student, info.train_path, steps=100, lr=3e-3, batch_size=8, seq_len=64, out=run)
    baseline = train_from_scratch(GPT(...same seed...), info.train_path, 100, 3e-3, 8, 64, out=run_scratch)
    perplexity(student, info.val_path, seq_len=64, batches=8, batch_size=8)

The loss (Hinton et al. 2015): ``alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) *
cross-entropy`` with the data's next tokens. T > 1 softens both distributions so that the teacher's ranking of the
wrong tokens carries signal; T^2 keeps the KL term's gradients at the cross-entropy's scale as T changes.
``alpha = 0`` is plain training: the same student from scratch on the same batches, the teacher never run.

The student keeps the teacher's depth, heads, vocabulary and context and is narrower: in a small GPT the tied token
matrix is a large share of the parameters, and halving the depth leaves it whole (the ci GPT keeps 65% of its
parameters with 1 layer of 2), while a narrower width shrinks every matrix, the embedding included.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from labs_lib.core.config import GPTConfig
from labs_lib.data.text import eval_batches
from labs_lib.estimates.memory import param_count
from labs_lib.inference.prune import fine_tune
from labs_lib.train.steps import evaluate

__all__ = ["half_size_config", "kd_loss", "distill", "train_from_scratch", "perplexity"]


def half_size_config(config: GPTConfig, fraction: float = 0.5) -> GPTConfig:
    """The teacher's config narrowed to the n_embd (a multiple of n_head, so the head count stays) whose parameter
    count is nearest ``fraction`` of the teacher's; depth, heads, vocabulary and context are kept."""
    target = fraction * param_count(config)
    widths = range(config.n_head, config.n_embd + 1, config.n_head)
    width = min(widths, key=lambda w: abs(param_count(replace(config, n_embd=w)) - target))
    return replace(config, n_embd=width)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, targets: torch.Tensor,
            temperature: float = 2.0, alpha: float = 0.5) -> tuple[torch.Tensor, dict]:
    """(loss, {"ce", "kl"}) over logits (B, T, vocab) and targets (B, T). The KL is per token (summed over the
    vocabulary, averaged over tokens); with ``alpha == 0`` it is not computed and the loss is the cross-entropy."""
    vocab = student_logits.size(-1)
    ce = F.cross_entropy(student_logits.reshape(-1, vocab), targets.reshape(-1), ignore_index=-100)
    if alpha == 0:
        return ce, {"ce": ce.item()}
    student_log_probs = F.log_softmax(student_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="batchmean")
    loss = alpha * temperature ** 2 * kl + (1 - alpha) * ce
    return loss, {"ce": ce.item(), "kl": kl.item()}


def distill(teacher: nn.Module | None, student: nn.Module, tokens_path: str | Path, steps: int, lr: float,
            batch_size: int, seq_len: int, out: str | Path, temperature: float = 2.0, alpha: float = 0.5,
            seed: int = 0, val_path: str | Path | None = None) -> list[dict]:
    """Train ``student`` in place on :func:`kd_loss` for ``steps`` steps (labs_lib.train.loop.run_loop through
    labs_lib.inference.prune.fine_tune); the teacher runs in eval mode under no_grad. The batches depend on
    ``seed`` only, so ``alpha=0`` with the same seed is the same student trained from scratch on the same data.
    Records carry ``ce`` and ``kl``; with ``val_path`` the last one ``val_loss``."""
    if alpha != 0 and teacher is None:
        raise ValueError("alpha > 0 needs a teacher: pass the trained model (or alpha=0 to train from scratch)")
    if teacher is not None:
        teacher.eval()

    def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        teacher_logits = None
        if alpha != 0:
            with torch.no_grad():
                teacher_logits = teacher(x)[0]
        return kd_loss(model(x)[0], teacher_logits, y, temperature, alpha)

    return fine_tune(student, loss_of, tokens_path, steps, lr, batch_size, seq_len, out, seed,
                     val_path=val_path, desc="distill" if alpha else "scratch")


def train_from_scratch(student: nn.Module, tokens_path: str | Path, steps: int, lr: float, batch_size: int,
                       seq_len: int, out: str | Path, seed: int = 0,
                       val_path: str | Path | None = None) -> list[dict]:
    """The distillation baseline: :func:`distill` with ``alpha=0`` (cross-entropy only, no teacher)."""
    return distill(None, student, tokens_path, steps, lr, batch_size, seq_len, out, alpha=0.0, seed=seed,
                   val_path=val_path)


def perplexity(model: nn.Module, tokens_path: str | Path, seq_len: int, batches: int = 8,
               batch_size: int = 8) -> float:
    """exp(mean loss) over ``batches`` fixed validation batches (data.text.eval_batches: the same windows on every
    call). The model's train / eval mode is left as it was."""
    was_training = model.training
    device = next(model.parameters()).device
    loss = evaluate(model, eval_batches(tokens_path, batch_size, seq_len, batches), "fp32", device)
    model.train(was_training)
    return math.exp(loss)

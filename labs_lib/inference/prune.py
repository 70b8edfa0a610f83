"""Pruning: unstructured by magnitude (masks), structured (whole heads, MLP channels), and the recovery fine-tune.

    masks = magnitude_prune(model, 0.5)            # half of every block Linear weight zeroed, smallest |w| first
    sparsity(model)                                # the zero fraction measured over those weights
    kept = prune_heads(model, keep_heads=1)        # per layer, the most important heads; qkv / proj shrink
    kept = prune_mlp(model, keep_fraction=0.5)     # per layer, the most important MLP channels; fc / proj shrink
    records = recover(model, info.train_path, steps=50, lr=1e-3, batch_size=8, seq_len=64, out=run, masks=masks)

Unstructured zeros keep every shape (no speed-up without sparse kernels; the masks are re-applied after every
optimizer step so the fine-tune cannot revive them). Structured pruning cuts rows and columns out of the Linear
layers: the model is physically smaller and faster, and the GPT needs no change, because attention reads its head
count from qkv's width and the MLP's hidden size is fc's. All pruning works in place.

Importance, per layer: a head's is the norm of its value rows in qkv times the norm of its columns in proj (the
V-O path through which all of its output flows, whatever it attends to); an MLP channel's is the norm of its fc row
times the norm of its proj column.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from labs_lib.core.config import TrainConfig
from labs_lib.data.text import TokenBatches, eval_batches
from labs_lib.models.gpt import MLP
from labs_lib.train.loop import Loop, run_loop
from labs_lib.train.optim import lr_at, make_optimizer, param_groups
from labs_lib.train.steps import evaluate

__all__ = ["prunable_weights", "magnitude_prune", "apply_masks", "sparsity", "head_importance", "prune_heads",
           "channel_importance", "prune_mlp", "fine_tune", "recover"]


def prunable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weight of every nn.Linear in the blocks, by parameter name (embeddings, biases, norms are left)."""
    return {f"blocks.{name}.weight": m.weight for name, m in model.blocks.named_modules()
            if isinstance(m, nn.Linear)}


@torch.no_grad()
def magnitude_prune(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Zero the ``sparsity`` fraction of smallest-|w| entries of each block Linear weight (each weight on its
    own, exactly round(sparsity * numel) of them); returns the masks (True: kept) by parameter name."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity}: give the fraction to zero, in [0, 1)")
    masks = {}
    for name, weight in prunable_weights(model).items():
        n_zero = round(sparsity * weight.numel())
        mask = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
        mask[weight.abs().flatten().argsort()[:n_zero]] = False  # argsort, not a threshold: ties cannot overshoot
        masks[name] = mask.view_as(weight)
    apply_masks(model, masks)
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask)


def sparsity(model: nn.Module) -> float:
    """The fraction of zeros over all block Linear weights, measured."""
    weights = list(prunable_weights(model).values())
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def _resized(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear keeping ``rows`` (outputs) and ``cols`` (inputs) of ``linear`` (all when None)."""
    weight, bias = linear.weight.detach(), linear.bias
    if rows is not None:
        weight = weight[rows]
        bias = bias[rows] if bias is not None else None
    if cols is not None:
        weight = weight[:, cols]
    out = nn.Linear(weight.size(1), weight.size(0), bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias.detach())
    return out


def _head_slices(n_heads: int, head_dim: int, device) -> torch.Tensor:
    """(heads, head_dim) indices of each head's channels in a q, k or v block."""
    return torch.arange(n_heads * head_dim, device=device).view(n_heads, head_dim)


@torch.no_grad()
def head_importance(attn: nn.Module) -> torch.Tensor:
    """One score per head of this attention: ||its v rows of qkv|| x ||its columns of proj||."""
    width = attn.proj.in_features
    heads = _head_slices(width // attn.head_dim, attn.head_dim, attn.proj.weight.device)
    v_rows = attn.qkv.weight[2 * width:][heads]  # (heads, head_dim, n_embd)
    proj_cols = attn.proj.weight[:, heads].transpose(0, 1)  # (heads, n_embd, head_dim)
    return v_rows.flatten(1).norm(dim=1) * proj_cols.flatten(1).norm(dim=1)


def _per_layer(value, n_layer: int, what: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n_layer
    if len(values) != n_layer:
        raise ValueError(f"{what}: {len(values)} values for {n_layer} layers; give one number or one per layer")
    return values


@torch.no_grad()
def prune_heads(model: nn.Module, keep_heads: int | list[int]) -> list[list[int]]:
    """Keep the ``keep_heads`` most important heads of every layer (or a count per layer); qkv loses the others'
    q, k, v rows and proj their columns. Returns each layer's kept heads (original numbering, ascending)."""
    kept_per_layer = []
    for block, keep in zip(model.blocks, _per_layer(keep_heads, len(model.blocks), "keep_heads")):
        attn = block.attn
        width = attn.proj.in_features
        n_heads = width // attn.head_dim
        if not 1 <= keep <= n_heads:
            raise ValueError(f"keep_heads={keep}: a layer has {n_heads} heads; keep between 1 and {n_heads}")
        kept = head_importance(attn).topk(keep).indices.sort().values
        channels = _head_slices(n_heads, attn.head_dim, attn.proj.weight.device)[kept].flatten()
        qkv_rows = torch.cat([channels + part * width for part in range(3)])  # the same heads of q, k and v
        attn.qkv = _resized(attn.qkv, rows=qkv_rows)
        attn.proj = _resized(attn.proj, cols=channels)
        kept_per_layer.append(kept.tolist())
    return kept_per_layer


@torch.no_grad()
def channel_importance(mlp: MLP) -> torch.Tensor:
    """One score per hidden channel of this MLP: ||its fc row|| x ||its proj column||."""
    return mlp.fc.weight.norm(dim=1) * mlp.proj.weight.norm(dim=0)


@torch.no_grad()
def prune_mlp(model: nn.Module, keep_fraction: float | list[float]) -> list[list[int]]:
    """Keep round(keep_fraction x hidden) of the most important MLP channels of every layer (at least one);
    fc loses the others' rows, proj their columns. Returns each layer's kept channels (ascending)."""
    kept_per_layer = []
    for layer, (block, fraction) in enumerate(zip(model.blocks,
                                                  _per_layer(keep_fraction, len(model.blocks), "keep_fraction"))):
        if not isinstance(block.mlp, MLP):
            raise ValueError(f"layer {layer}'s MLP is a {type(block.mlp).__name__}: prune_mlp cuts dense MLPs only")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"keep_fraction={fraction}: give the fraction of channels to keep, in (0, 1]")
        mlp = block.mlp
        keep = max(1, round(fraction * mlp.fc.out_features))
        kept = channel_importance(mlp).topk(keep).indices.sort().values
        mlp.fc = _resized(mlp.fc, rows=kept)
        mlp.proj = _resized(mlp.proj, cols=kept)
        kept_per_layer.append(kept.tolist())
    return kept_per_layer


def fine_tune(model: nn.Module, loss_of: Callable, tokens_path: str | Path, steps: int, lr: float, batch_size: int,
              seq_len: int, out: str | Path, seed: int = 0, after_step: Callable[[], None] | None = None,
              val_path: str | Path | None = None, desc: str = "fine-tune", progress: bool = False) -> list[dict]:
    """Train ``model`` in place for ``steps`` AdamW steps through :func:`labs_lib.train.loop.run_loop` (one
    process), on batches of ``tokens_path`` shuffled by ``seed``: warm-up over a tenth of the steps, then cosine to
    lr / 10, gradients clipped at 1. ``loss_of(model, x, y) -> (loss, extra record fields)``; ``after_step`` runs
    after every optimizer step (the pruning masks). With ``val_path`` the last record gets ``val_loss``.
    Records go to ``out``/metrics.jsonl too."""
    device = next(model.parameters()).device
    cfg = TrainConfig(lr=lr, min_lr=lr / 10, warmup_steps=max(1, steps // 10), max_steps=steps, seed=seed)
    optimizer = make_optimizer(param_groups(model, cfg.weight_decay), cfg)
    batches = TokenBatches(tokens_path, batch_size, seq_len, seed=seed)
    torch.manual_seed(seed)  # dropout, if the model has any

    def train_step(step: int) -> dict:
        x, y = (t.to(device) for t in next(batches))
        loss, fields = loss_of(model, x, y)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        return {"loss": loss.item(), "grad_norm": grad_norm.item(), **fields}

    def val_loss(step: int) -> dict:
        return {"val_loss": evaluate(model, eval_batches(val_path, batch_size, seq_len, 4), "fp32", device)}

    Path(out).mkdir(parents=True, exist_ok=True)
    model.train()
    records = run_loop(train_step, Loop(out=out, max_steps=steps, samples_per_step=batch_size * seq_len, desc=desc,
                                        progress=progress, device=device),
                       optimizer=optimizer, lr_of=lambda step: lr_at(step, cfg),
                       evaluate=val_loss if val_path is not None else None)
    model.eval()
    return records


def _lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
    return model(x, y)[1], {}


def recover(model: nn.Module, tokens_path: str | Path, steps: int, lr: float, batch_size: int, seq_len: int,
            out: str | Path, masks: dict[str, torch.Tensor] | None = None, seed: int = 0,
            val_path: str | Path | None = None) -> list[dict]:
    """The recovery fine-tune of a pruned model (in place): the language-model loss for ``steps`` steps, the
    ``masks`` of :func:`magnitude_prune` re-applied after every step so pruned weights stay exactly zero."""
    after_step = (lambda: apply_masks(model, masks)) if masks else None
    return fine_tune(model, _lm_loss, tokens_path, steps, lr, batch_size, seq_len, out, seed, after_step, val_path,
                     desc="recover")

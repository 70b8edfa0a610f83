"""Analytic memory model: what training a GPT of a given shape needs, before anything is allocated.

Bytes per parameter for Adam (ZeRO paper, Rajbhandari et al. 2020, section 3.1):
    fp32 training          4 (weights) + 4 (gradients) + 8 (Adam m, v)                  = 16
    mixed precision        2 (bf16/fp16 weights) + 2 (gradients) + 12 (fp32 master, m, v) = 16
Activations per layer, 16-bit, no recomputation (Korthikanti et al. 2022): s·b·h·(34 + 5·a·s/h) bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from labs_lib.config import MODEL_PRESETS, GPTConfig

GB = 1e9


@dataclass(frozen=True)
class TrainingMemory:
    params: int
    weights: float  # bytes
    gradients: float
    optimizer: float
    activations: float

    @property
    def states(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.states + self.activations


def param_count(cfg: GPTConfig) -> int:
    """Parameters of labs_lib's GPT for ``cfg``, counted on the meta device (no memory used)."""
    from labs_lib.model import GPT

    with torch.device("meta"):
        return GPT(cfg).num_params()


def activation_bytes_per_layer(cfg: GPTConfig, micro_batch: int = 1, seq_len: int | None = None) -> float:
    """s·b·h·(34 + 5·a·s/h): 16-bit activations one transformer layer keeps for backward (no recompute)."""
    s, b, h, a = seq_len or cfg.block_size, micro_batch, cfg.n_embd, cfg.n_head
    return s * b * h * (34 + 5 * a * s / h)


def training_memory(cfg: GPTConfig, mixed_precision: bool = True, micro_batch: int = 1) -> TrainingMemory:
    n = param_count(cfg)
    weight_bytes, grad_bytes, opt_bytes = (2, 2, 12) if mixed_precision else (4, 4, 8)
    return TrainingMemory(n, n * weight_bytes, n * grad_bytes, n * opt_bytes,
                          cfg.n_layer * activation_bytes_per_layer(cfg, micro_batch))


def memory_table(presets: list[str] | None = None, gpu_memory_gb: float = 80.0) -> list[dict]:
    """One row per model preset: parameters and GB of weights, gradients, Adam state and activations."""
    rows = []
    for name in presets or list(MODEL_PRESETS):
        m = training_memory(GPTConfig.preset(name))
        rows.append({"model": name, "params (B)": m.params / 1e9, "weights GB": m.weights / GB,
                     "grads GB": m.gradients / GB, "Adam GB": m.optimizer / GB, "activations GB": m.activations / GB,
                     "total GB": m.total / GB, f"GPUs of {gpu_memory_gb:g} GB": m.total / (gpu_memory_gb * GB)})
    return rows


def format_table(rows: list[dict], digits: int = 2) -> str:
    """A plain-text table (no pandas needed) for notebooks and benchmark scripts."""
    if not rows:
        return ""
    cols = list(rows[0])
    cells = [[f"{r[c]:,.{digits}f}" if isinstance(r[c], float) else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)

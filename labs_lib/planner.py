"""Analytic memory model: what training a GPT of a given shape needs, before anything is allocated.

Bytes per parameter for Adam (ZeRO paper, Rajbhandari et al. 2020, section 3.1):
    fp32 training          4 (weights) + 4 (gradients) + 8 (Adam m, v)                  = 16
    mixed precision        2 (bf16/fp16 weights) + 2 (gradients) + 12 (fp32 master, m, v) = 16
Activations per layer, 16-bit, no recomputation (Korthikanti et al. 2022): s·b·h·(34 + 5·a·s/h) bytes;
with tensor parallelism over t ranks s·b·h·(10 + 24/t + 5·a·s/(h·t)), with sequence parallelism too
s·b·h/t·(34 + 5·a·s/h). Megatron tensor parallelism (labs_lib.parallel.tensor_parallel) per rank: the split
matrices' 1/t share plus everything replicated (:func:`tensor_parallel_param_count`), and per layer 2 all-reduces
of the (b, s, h) activations forward and 2 backward (:func:`tensor_parallel_comm_per_layer`).
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


def activation_bytes_per_layer(cfg: GPTConfig, micro_batch: int = 1, seq_len: int | None = None, tp: int = 1,
                               sequence_parallel: bool = False) -> float:
    """16-bit activations one transformer layer keeps for backward on one rank (no recompute; Korthikanti et al.
    2022, eq. 1-4): s·b·h·(34 + 5·a·s/h) alone; with tensor parallelism over ``tp`` ranks s·b·h·(10 + 24/t +
    5·a·s/(h·t)) (the 10·s·b·h of LayerNorms, dropout masks and residual inputs stay whole on every rank); with
    sequence parallelism as well s·b·h/t·(34 + 5·a·s/h) (those are split along the sequence too)."""
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    s, b, h, a, t = seq_len or cfg.block_size, micro_batch, cfg.n_embd, cfg.n_head, tp
    if sequence_parallel:
        return s * b * h / t * (34 + 5 * a * s / h)
    return s * b * h * (10 + 24 / t + 5 * a * s / (h * t))


# Parameters that Megatron tensor parallelism splits over the TP ranks (labs_lib.parallel.tensor_parallel): the
# token embedding (= the tied lm_head) by vocabulary, qkv and fc (with their biases) by output, both projections by
# input. Everything else, the projections' biases included, is whole on every rank.
TENSOR_PARALLEL_SPLIT = ("tok_emb.weight", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "mlp.fc.weight",
                         "mlp.fc.bias", "mlp.proj.weight")


def tensor_parallel_param_count(cfg: GPTConfig, tp: int) -> int:
    """Parameters one rank holds when the GPT is split over ``tp`` tensor-parallel ranks (tied weights once)."""
    from labs_lib.model import GPT

    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    with torch.device("meta"):
        model = GPT(cfg)
    return sum(p.numel() // tp if name.endswith(TENSOR_PARALLEL_SPLIT) else p.numel()
               for name, p in model.named_parameters())  # named_parameters lists a tied weight once


def tensor_parallel_comm_per_layer(cfg: GPTConfig, tp: int, micro_batch: int = 1, seq_len: int | None = None,
                                   bytes_per_element: int = 2, sequence_parallel: bool = False) -> dict:
    """What one transformer layer sends per rank per training step under tensor parallelism over ``tp`` ranks.

    Each sublayer (attention, MLP) ends in g (all-reduce forward) and starts with f (all-reduce backward): 2
    all-reduces of the (b, s, h) activations forward, 2 backward. A ring all-reduce sends 2(t-1)/t of the tensor per
    rank. Sequence parallelism swaps each all-reduce for an all-gather + a reduce-scatter, (t-1)/t each: the same
    bytes."""
    s, b, h, t = seq_len or cfg.block_size, micro_batch, cfg.n_embd, tp
    tensor = b * s * h * bytes_per_element
    per_collective = 2 * (t - 1) / t * tensor
    if sequence_parallel:
        ops = {"all-gathers forward": 2, "reduce-scatters forward": 2, "all-gathers backward": 2,
               "reduce-scatters backward": 2}
    else:
        ops = {"all-reduces forward": 2, "all-reduces backward": 2}
    return {**ops, "tensor bytes": tensor, "bytes sent per rank": 4 * per_collective}


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

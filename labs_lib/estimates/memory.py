"""Memory formulas: what training a GPT of a given shape needs, before anything is allocated.

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

from labs_lib.core.config import CHECKPOINT_MODES, MODEL_PRESETS, ZERO_STAGES, GPTConfig

GB = 1e9
MIXED_ADAM = (2, 2, 12)  # bytes per parameter: 16-bit weights, 16-bit gradients, fp32 master + m + v


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
    from labs_lib.models.gpt import GPT

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


def activation_bytes_formula(cfg, micro_batch: int, seq_len: int | None = None, dtype: str = "fp32",
                             mode: str = "none") -> float:
    """Bytes one transformer block of labs_lib's GPT keeps for backward: Korthikanti et al.'s sbh(34 + 5as/h),
    redone for this model. s sequence, b micro-batch, h width, a heads; B = bytes of the compute dtype (4 fp32,
    2 bf16 autocast).

    Korthikanti (16-bit, dropout, attention scores stored), in units of sbh bytes: LayerNorm inputs 2+2, qkv input 2,
    Q and K 4, V 2, projection input 2, fc input 2, GELU input 8, MLP projection input 8, two dropout masks 1+1 = 34,
    plus 5as/h from the s×s scores: softmax output 2, its dropout mask 1, the dropout output 2 (per head).

    This model, ``mode="none"``, tensor by tensor (what labs_lib.measure.trace.ActivationMeter sees):

    - the residual stream x and x + attn(x) stay fp32 under autocast (the add of an fp32 and a bf16 tensor is fp32),
      kept by the two LayerNorms: 4 + 4
    - LayerNorm runs in fp32 under CPU autocast; the matmul keeps its bf16 cast of the output: B + B
    - q, k, v are views of the qkv matmul's one output, kept by SDPA: 3B; SDPA's output, kept by SDPA and by the
      projection (one storage): B; fc output (GELU's input) 4B; GELU output (projection input) 4B
    - dropout=0: no masks (dropout with p=0 is the identity and saves nothing)
    - SDPA stores no s×s scores: its backward recomputes them from q, k and the softmax's log-sum-exp, 4 bytes per
      row and head (4·a·s·b, fp32 always). So 5as/h becomes 4a/h: the attention core is already recomputed inside
      the fused kernel (FlashAttention's backward), which is what Korthikanti's selective recomputation does by hand
    - LayerNorm mean and 1/std: 2 LayerNorms × 2 × 4 bytes per row: 16·s·b
    - bf16 only: autocast's bf16 copies of the four weight matrices (12h² values, 2 bytes), kept for the input
      gradients: 24h², independent of the batch

    none:       sbh(8 + 14B + 4a/h) + 16sb (+ 24h² with bf16)    fp32: sbh(64 + ...), bf16: sbh(36 + ...)
    full:       4sbh: the block's input only, fp32 (Korthikanti's 2sbh is the 16-bit input)
    selective:  sbh(4 + 9B): the input plus the four matmul outputs (3 + 1 + 4 + 1 widths of h)
    """
    if mode not in CHECKPOINT_MODES:
        raise ValueError(f"mode {mode!r} does not exist: choose one of {', '.join(CHECKPOINT_MODES)}")
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype {dtype!r}: the formula covers fp32 and bf16 (autocast)")
    s, b, h, a = seq_len or cfg.block_size, micro_batch, cfg.n_embd, cfg.n_head
    B = 4 if dtype == "fp32" else 2
    sbh = s * b * h
    if mode == "full":
        return 4 * sbh
    if mode == "selective":
        return sbh * (4 + 9 * B)
    return sbh * (8 + 14 * B) + 4 * a * s * b + 16 * s * b + (24 * h * h if dtype == "bf16" else 0)


def zero_bytes_per_rank(num_params: int, world_size: int, stage: int, bytes_per_param: tuple = (4, 4, 8),
                        frozen_params: int = 0) -> dict[str, float]:
    """The ZeRO paper's model-state bytes per rank for ``num_params`` trainable parameters.

    ``bytes_per_param`` = (weights, gradients, optimizer state): (4, 4, 8) for fp32 Adam, (2, 2, 12) for mixed
    precision (16-bit weights and gradients, fp32 master weights, m and v). Stage 0 is plain data parallelism;
    stage 1 divides the optimizer state by N, stage 2 also the gradients, stage 3 also the weights.
    ``frozen_params`` add weights only (no gradient, no state)."""
    if stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    weight, grad, opt = bytes_per_param
    n = world_size
    return {"params": (num_params + frozen_params) * weight / (n if stage >= 3 else 1),
            "grads": num_params * grad / (n if stage >= 2 else 1),
            "optimizer": num_params * opt / (n if stage >= 1 else 1)}

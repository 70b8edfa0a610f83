"""Activation memory of one transformer layer under tensor / sequence parallelism and recomputation, and how many
layers' worth a pipeline rank keeps in flight.

    megatron_activation_bytes(cfg, micro_batch, tp=8, sequence_parallel=True, recompute="selective")
    labs_activation_bytes(cfg, micro_batch, dtype="bf16", tp=2, sequence_parallel=True, recompute="none")
    layers_in_flight(layers=96, pp=8, micro_batches=64, schedule="1f1b")    # 96: the first stage keeps 8 x 12

**Megatron-style models** (16-bit activations, dropout; Korthikanti et al. 2022, table 2), per layer, s sequence,
b micro-batch, h width, a heads, t tensor-parallel ranks::

    none          sbh(34 + 5as/h)              tp: sbh(10 + 24/t + 5as/(ht))     tp + sp: sbh/t·(34 + 5as/h)
    selective     the 5as/h term (the s×s attention scores, softmax and dropout) recomputed: sbh(10 + 24/t), sbh·34/t
    full          2sbh, the layer's 16-bit input only; with sp that input is a sequence shard: 2sbh/t (table 2 has
                  no full + sp row; Megatron keeps the sharded input it is given)

fp32 doubles all of it (the 1-byte dropout masks too: a small overestimate). ``none`` and its TP / SP variants are
labs_lib.estimates.memory.activation_bytes_per_layer; this module only takes terms away.

**labs_lib's GPT** (no dropout, SDPA, fp32 residual stream under autocast): labs_lib.estimates.memory.
activation_bytes_formula is the tp = 1 count, tensor by tensor. Under tensor parallelism
(labs_lib.parallel.tensor_parallel) each of those tensors is either split over the t ranks or whole on every rank:

- split by heads or by the MLP's 4h columns: q, k, v (3B), SDPA's output (B), the fc output (4B), GELU's output
  (4B), SDPA's log-sum-exp (4·a·s·b) and, with bf16, autocast's copies of the four weight matrices (24h²): 1/t each;
- whole on every rank: the fp32 residual stream the two LayerNorms keep (4 + 4), their mean and 1/std (16·s·b), and
  the 16-bit inputs of qkv and fc (B + B): a column-parallel layer keeps the input it multiplies, and that input is
  the whole sequence on every rank;
- with sequence parallelism the residual stream and the LayerNorm statistics are split along the sequence (1/t),
  but the inputs of qkv and fc stay whole: this implementation's all-gather hands the full sequence to F.linear,
  which keeps it (Megatron keeps the shard and all-gathers again in backward, hence its 34/t).

    none       sbh(8 + 14B + 4a/h) + 16sb (+ 24h²)  ->  sbh(8/σ + 2B + 12B/t) + 4asb/t + 16sb/σ (+ 24h²/t)
    selective  sbh(4 + 9B)                          ->  sbh(4/σ + 2B + 7B/t)
    full       4sbh                                 ->  4sbh/σ

with σ = t under sequence parallelism, else 1. Selective keeps the four matmul outputs: qkv (3B) and fc (4B) are
column-parallel (1/t); the two projections' outputs are the partial sums before the all-reduce / reduce-scatter,
whole (B + B). tests/test_activations_tp.py holds every variant to labs_lib.measure.memory.ActivationMeter on two
real tensor-parallel ranks: equal to the byte.
"""

from __future__ import annotations

from labs_lib.core.config import CHECKPOINT_MODES, GPTConfig
from labs_lib.estimates.memory import activation_bytes_formula, activation_bytes_per_layer
from labs_lib.parallel.pipeline import SCHEDULES


def _check_mode(recompute: str, tp: int, sequence_parallel: bool) -> None:
    if recompute not in CHECKPOINT_MODES:
        raise ValueError(f"recompute mode {recompute!r} does not exist: choose one of {', '.join(CHECKPOINT_MODES)}")
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    if sequence_parallel and tp < 2:
        raise ValueError("sequence parallelism splits along the tensor-parallel group: it needs tp >= 2")


def megatron_activation_bytes(cfg: GPTConfig, micro_batch: int = 1, seq_len: int | None = None, tp: int = 1,
                              sequence_parallel: bool = False, recompute: str = "none",
                              bytes_per_element: int = 2) -> float:
    """Bytes one layer of a Megatron-style GPT keeps for backward on one rank (Korthikanti et al. 2022, table 2);
    ``bytes_per_element`` 4 doubles the 16-bit count."""
    _check_mode(recompute, tp, sequence_parallel)
    s, b, h, a, t = seq_len or cfg.block_size, micro_batch, cfg.n_embd, cfg.n_head, tp
    scale = bytes_per_element / 2
    if recompute == "full":
        return scale * 2 * s * b * h / (t if sequence_parallel else 1)
    kept = activation_bytes_per_layer(cfg, micro_batch, s, tp, sequence_parallel)
    if recompute == "selective":
        kept -= 5 * a * s * s * b / t  # sbh · 5as/(ht): the attention core, the same with and without sp
    return scale * kept


def labs_activation_bytes(cfg: GPTConfig, micro_batch: int = 1, seq_len: int | None = None, dtype: str = "fp32",
                          tp: int = 1, sequence_parallel: bool = False, recompute: str = "none") -> float:
    """Bytes one block of labs_lib's GPT keeps for backward on one tensor-parallel rank: activation_bytes_formula
    with the split tensors divided by t (see the module docstring for which ones)."""
    _check_mode(recompute, tp, sequence_parallel)
    dtype = "bf16" if dtype == "fp16" else dtype  # the same sizes: 2 bytes per element under autocast
    s, b, h, a = seq_len or cfg.block_size, micro_batch, cfg.n_embd, cfg.n_head
    B, sbh = (4 if dtype == "fp32" else 2), s * b * h
    whole = activation_bytes_formula(cfg, micro_batch, s, dtype, recompute)
    unsplit = 1 - 1 / tp  # what splitting over t ranks takes away from a tensor
    if recompute == "full":
        split, sequence_split = 0.0, 4 * sbh
    elif recompute == "selective":
        split, sequence_split = 7 * B * sbh, 4 * sbh
    else:
        split = 12 * B * sbh + 4 * a * s * b + (24 * h * h if dtype == "bf16" else 0)
        sequence_split = 8 * sbh + 16 * s * b
    return whole - unsplit * (split + (sequence_split if sequence_parallel else 0))


def labs_head_activation_bytes(cfg: GPTConfig, micro_batch: int = 1, seq_len: int | None = None,
                               dtype: str = "fp32", tp: int = 1, sequence_parallel: bool = False) -> float:
    """Bytes labs_lib's GPT keeps for backward after its last block, per micro-batch (measured by the trainer's
    --measure-activations): the final LayerNorm's fp32 input 4sbh and its mean and 1/std 8sb (split along the sequence
    under SP), the lm_head's input Bsbh (whole: SP gathers it), and the log-softmax of the logits that the
    cross-entropy keeps, 4·s·b·V/t (fp32 even under autocast; the vocabulary is split over the TP ranks)."""
    s, b, h = seq_len or cfg.block_size, micro_batch, cfg.n_embd
    B = 4 if dtype == "fp32" else 2
    sequence_share = tp if sequence_parallel else 1
    return (4 * s * b * h + 8 * s * b) / sequence_share + B * s * b * h + 4 * s * b * cfg.vocab_size / tp


def layers_in_flight(layers: int, pp: int, micro_batches: int, schedule: str = "1f1b", chunks: int = 1,
                     stage: int = 0) -> float:
    """How many (layer, micro-batch) activation sets pipeline rank ``stage`` holds at its peak.

    GPipe: every micro-batch of its L/p layers (all forwards run before the first backward). 1F1B and interleaved
    1F1B: Megatron-LM's warm-up count plus the one in flight (megatron/core/pipeline_parallel/schedules.py): rank r
    of p runs (p − r − 1)·2 + (v − 1)·p warm-up forwards of chunks of L/(p·v) layers (v = 1: p − r − 1), at most all
    m·v. The first rank is the worst: L layers for 1F1B, L·(1 + (p − 1)/(p·v)) interleaved (Korthikanti et al. 2022,
    section 4.2.3; Narayanan et al. 2021, section 2.2.2)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if not 0 <= stage < pp:
        raise ValueError(f"stage {stage} is outside a pipeline of {pp} ranks")
    if pp == 1:
        return layers  # no pipeline: gradient accumulation runs one micro-batch at a time
    if schedule == "gpipe":
        return micro_batches * layers / pp
    v = chunks if schedule == "interleaved-1f1b" else 1
    warmup = (pp - stage - 1) * (2 if v > 1 else 1) + (v - 1) * pp
    return min(warmup + 1, micro_batches * v) * layers / (pp * v)

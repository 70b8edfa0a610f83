"""Formulas of tensor and pipeline parallelism: what a rank holds and sends, and the pipeline's bubble.

    tensor_parallel_param_count(cfg, tp=8)            # parameters one TP rank holds (Megatron's split)
    tensor_parallel_comm_per_layer(cfg, tp=8)         # collectives and bytes per layer and rank
    bubble_fraction(pp=4, micro_batches=8)            # idle share of a step, GPipe convention: (p-1)/(m+p-1)
"""

from __future__ import annotations

import torch

from labs_lib.core.config import GPTConfig
from labs_lib.models.gpt import GPT

# Parameters that Megatron tensor parallelism splits over the TP ranks (labs_lib.parallel.tensor_parallel): the
# token embedding (= the tied lm_head) by vocabulary, qkv and fc (with their biases) by output, both projections by
# input. Everything else, the projections' biases included, is whole on every rank.
TENSOR_PARALLEL_SPLIT = ("tok_emb.weight", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "mlp.fc.weight",
                         "mlp.fc.bias", "mlp.proj.weight")


def tensor_parallel_param_count(cfg: GPTConfig, tp: int) -> int:
    """Parameters one rank holds when the GPT is split over ``tp`` tensor-parallel ranks (tied weights once)."""
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


def bubble_fraction(pp: int, micro_batches: int, chunks: int = 1) -> float:
    """Idle share of a step with balanced stages: (p − 1)/(v·m + p − 1) of the total time (v = 1: GPipe, 1F1B)."""
    return (pp - 1) / (chunks * micro_batches + pp - 1)

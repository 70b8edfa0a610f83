"""Memory of serving a GPT: the weights, plus a KV cache that grows with every sequence and token in flight.

    weight_bytes(params, bytes_per_param=2, tp=1)                 the weights one GPU holds
    kv_cache_bytes(layers, hidden, batch, seq_len, 2, tp=1)       keys + values of every layer, token and channel
    kv_equals_weights_tokens(params, layers, hidden)              tokens in flight where the cache outgrows the weights
    serving_rows(params, layers, hidden, batches, seq_len, tp)    the table lab 09 plots

A token's keys and values take 2 · layers · hidden numbers (multi-head attention: every head keeps its own), so a
batch of b sequences of s tokens holds 2·L·h·b·s of them: GPT-3 175B in 16 bits keeps 4.7 MB per token, and its
350 GB of weights are outweighed at about 74,000 tokens in flight (36 sequences of its 2048-token context).
Tensor parallelism over t GPUs splits both by t (each rank holds its heads' keys and values and its slice of every
matrix), so the crossover point does not move: it depends on the model's shape alone.
"""

from __future__ import annotations

__all__ = ["weight_bytes", "kv_cache_bytes", "kv_equals_weights_tokens", "serving_rows"]


def weight_bytes(params: float, bytes_per_param: float = 2, tp: int = 1) -> float:
    """Bytes of weights on one GPU: every matrix (the vocabulary-parallel embedding too) split over ``tp`` ranks.
    (LayerNorms and biases are replicated in Megatron's layout; they are well under 0.1% of a large model.)"""
    return params * bytes_per_param / tp


def kv_cache_bytes(layers: int, hidden: int, batch: int, seq_len: int, bytes_per_value: float = 2,
                   tp: int = 1) -> float:
    """Bytes of a full KV cache on one GPU: keys and values (2) of every layer, sequence, token and channel, the
    heads split over ``tp`` ranks."""
    return 2 * layers * hidden * batch * seq_len * bytes_per_value / tp


def kv_equals_weights_tokens(params: float, layers: int, hidden: int) -> float:
    """Tokens in flight (batch x sequence length) at which the KV cache weighs as much as the weights, both in the
    same precision (the tp and the bytes per number cancel)."""
    return params / (2 * layers * hidden)


def serving_rows(params: float, layers: int, hidden: int, batches: list[int], seq_len: int, tp: int = 1,
                 bytes_per_value: float = 2) -> list[dict]:
    """Per batch size: GB of weights, of KV cache at ``seq_len`` tokens per sequence, and their total on one GPU."""
    weights = weight_bytes(params, bytes_per_value, tp)
    rows = []
    for batch in batches:
        cache = kv_cache_bytes(layers, hidden, batch, seq_len, bytes_per_value, tp)
        rows.append({"batch": batch, "seq_len": seq_len, "tp": tp, "weights_gb": weights / 1e9,
                     "kv_cache_gb": cache / 1e9, "total_gb": (weights + cache) / 1e9})
    return rows

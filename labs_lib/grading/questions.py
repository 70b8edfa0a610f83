"""The assessment's questions, as its test cells call them: numbers and implementations.

Every check computes its expected value here, out of the learner's sight, and raises ``AssertionError`` with a hint
that never states the answer. ``hidden=False`` is what a learner's own "Validate" runs; ``hidden=True`` adds the
cases the source notebook's hidden tests run (other shapes, world sizes and edge cases). Checks stay quiet: nbgrader
scores a test cell that writes to stderr as failed, so nothing here warns or prints.

    check_number("zero_gb", zero_gb, hidden=True)      # numbers, graded within NUMBER_RTOL
    check_row_parallel(row_parallel_forward)           # implementations, each against a single-device reference
"""

from __future__ import annotations

import math

import torch

from labs_lib.core.config import GPTConfig
from labs_lib.estimates.memory import zero_bytes_per_rank
from labs_lib.estimates.parallel import bubble_fraction
from labs_lib.estimates.serving import kv_cache_bytes
from labs_lib.labs.checks import simulate_ranks
from labs_lib.labs.lab03 import accumulation_matches_big_batch
from labs_lib.labs.lab08 import reference_top_k_gating
from labs_lib.measure.flops import PEAK_FLOPS, mfu
from labs_lib.models.gpt import CausalSelfAttention

NUMBER_RTOL = 0.01  # a numeric answer within 1 % of the expected value scores its points

# The numeric questions as the notebook states them; the expected values come from the workshop's formulas.
NUMBERS = {
    # mixed-precision Adam (2 + 2 + 12 bytes per parameter), 13e9 parameters, 64 GPUs, ZeRO stage 2: GB per GPU
    "zero_gb": lambda: sum(zero_bytes_per_rank(13e9, 64, 2, (2, 2, 12)).values()) / 1e9,
    # 1F1B with 8 stages and 24 micro-batches: idle fraction of the step (GPipe's convention: of the total time)
    "bubble": lambda: bubble_fraction(8, 24),
    # one request of 2048 tokens, 24 layers, hidden 1024, fp16, tensor parallel over 2 GPUs: MB of KV cache per GPU
    "kv_cache_mb": lambda: kv_cache_bytes(24, 1024, 1, 2048, bytes_per_value=2, tp=2) / 1e6,
    # 1.3e9 parameters, 6N FLOPs per token, 150,000 tokens/s on 8 H100s (bf16 dense peak): MFU as a fraction
    "mfu": lambda: mfu(6 * 1.3e9, 150_000, 8 * PEAK_FLOPS["H100"]),
}


def _unanswered(answer) -> bool:
    return answer is None or answer is Ellipsis


def check_number(question: str, answer, hidden: bool = False) -> None:
    """A numeric answer: a finite number (visible), within :data:`NUMBER_RTOL` of the expected value (hidden)."""
    if question not in NUMBERS:
        raise KeyError(f"no numeric question {question!r}: the questions are {sorted(NUMBERS)}")
    assert not _unanswered(answer), f"{question}: not answered yet"
    assert isinstance(answer, (int, float)) and not isinstance(answer, bool), \
        f"{question}: give a number (int or float), got {type(answer).__name__}"
    assert math.isfinite(answer) and answer > 0, f"{question}: the answer must be a positive, finite number"
    if hidden:
        assert math.isclose(answer, NUMBERS[question](), rel_tol=NUMBER_RTOL), \
            f"{question}: not within {NUMBER_RTOL:.0%} of the expected value: check the units the question asks for"


# ----------------------------------------------------------------------------------------------- row parallel
def _row_parallel_case(fn, tp: int, shape: tuple[int, ...], seed: int) -> None:
    torch.manual_seed(seed)
    linear = torch.nn.Linear(4 * tp, 6)
    x = torch.randn(*shape, 4 * tp)
    want = linear(x).detach()
    weights, inputs = linear.weight.detach().chunk(tp, dim=1), x.chunk(tp, dim=-1)

    def rank(r, all_reduce):
        return fn(inputs[r], weights[r], linear.bias.detach(), all_reduce)

    outputs = simulate_ranks(rank, world_size=tp)
    for r, y in enumerate(outputs):
        assert isinstance(y, torch.Tensor), \
            f"row_parallel_forward returned {type(y).__name__} on rank {r}, not a tensor"
        assert tuple(y.shape) == tuple(want.shape), \
            f"tp={tp}: rank {r}'s output has shape {tuple(y.shape)}, the full layer's is {tuple(want.shape)}"
        if not torch.allclose(y, want, atol=1e-5):
            summed_bias = torch.allclose(y, want + (tp - 1) * linear.bias.detach(), atol=1e-5)
            raise AssertionError(f"tp={tp}: rank {r}'s output differs from the single-device layer's"
                                 + (": the bias was added on every rank before the sum" if summed_bias else ""))


def check_row_parallel(fn, hidden: bool = False) -> None:
    """``fn(x_shard, weight_shard, bias, all_reduce) -> y``: one rank's forward of a row-parallel linear layer must
    equal the full layer on every rank (threads stand in for ranks: labs_lib.labs.checks.simulate_ranks)."""
    assert callable(fn), "row_parallel_forward is not a function yet"
    _row_parallel_case(fn, tp=2, shape=(3,), seed=0)
    if hidden:
        _row_parallel_case(fn, tp=4, shape=(2, 5), seed=1)
        _row_parallel_case(fn, tp=1, shape=(4,), seed=2)


# ----------------------------------------------------------------------------------------------- 1F1B warm-up
def _warmup(stage: int, stages: int, micro_batches: int) -> int:
    return min(stages - stage - 1, micro_batches)  # the same rule as labs_lib.parallel.pipeline's 1F1B


def check_warmup(fn, hidden: bool = False) -> None:
    """``fn(stage, stages, micro_batches) -> int``: forward passes a 1F1B stage runs before its first backward."""
    assert callable(fn), "warmup_forwards is not a function yet"
    cases = [(0, 4, 8)] + ([(s, p, m) for p in range(1, 9) for m in (1, 2, 3, 8, 16) for s in range(p)]
                           if hidden else [])
    for stage, stages, micro in cases:
        got = fn(stage, stages, micro)
        assert got == _warmup(stage, stages, micro), \
            f"stage {stage} of {stages} with {micro} micro-batches: {got!r} is not the warm-up count"


# ----------------------------------------------------------------------------------------- gradient accumulation
def check_accumulation(fn, hidden: bool = False) -> None:
    """``fn(model, x, y, micro_batches)`` must leave in ``.grad`` the gradient of the mean loss over the batch."""
    assert callable(fn), "accumulate_gradients is not a function yet"
    hint = "the gradients differ from one backward on the whole batch: scale each micro-batch's loss"
    cases = [dict(micro_batches=4)] + ([dict(micro_batches=2), dict(micro_batches=8), dict(micro_batches=1)]
                                       if hidden else [])
    cfg = GPTConfig(vocab_size=96, block_size=8, n_layer=1, n_head=2, n_embd=16)
    for case in cases:
        result = accumulation_matches_big_batch(fn, cfg=cfg, batch=8, atol=1e-6, **case)
        assert result is not None, "accumulate_gradients returned None before computing anything"
        assert result, f"micro_batches={case['micro_batches']}: {hint}"


# ---------------------------------------------------------------------------------------------- top-k gating
def check_top_k(fn, hidden: bool = False) -> None:
    """``fn(logits, k) -> (gates, experts)``: softmax, the k largest, renormalised when k > 1 (as lab 08)."""
    assert callable(fn), "top_k_gating is not a function yet"
    cases = [(4, 1, 0), (4, 2, 1)] + ([(8, 3, 2), (8, 1, 3), (2, 2, 4)] if hidden else [])
    for experts, k, seed in cases:
        logits = torch.randn(12, experts, generator=torch.Generator().manual_seed(100 + seed))
        result = fn(logits.clone(), k)
        assert isinstance(result, tuple) and len(result) == 2, "top_k_gating must return (gates, experts)"
        gates, chosen = result
        want_gates, want_experts = reference_top_k_gating(logits, k)
        assert tuple(gates.shape) == (12, k) and torch.equal(chosen, want_experts), \
            f"{experts} experts, k={k}: the chosen experts are wrong (each token's k most probable, largest first)"
        assert torch.allclose(gates, want_gates, atol=1e-6), f"{experts} experts, k={k}: the gates are off"


# ------------------------------------------------------------------------------------------ KV-cached decoding
def check_decode_step(fn, hidden: bool = False) -> None:
    """``fn(attn, x_new, past_k, past_v) -> (y, k, v)``: one decoding step of a CausalSelfAttention with a KV cache
    gives the full causal attention's output at the new position and the cache with the new token appended."""
    assert callable(fn), "decode_step is not a function yet"
    cases = [(2, 4, 10, 0)] + ([(3, 2, 1, 1), (1, 8, 20, 2)] if hidden else [])
    for batch, heads, past, seed in cases:
        torch.manual_seed(200 + seed)
        attn = CausalSelfAttention(GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=heads,
                                             n_embd=8 * heads)).eval()
        x = torch.randn(batch, past + 1, 8 * heads)
        with torch.no_grad():
            full = attn(x)[:, -1:]
            _, past_k, past_v = attn.split_heads(x[:, :-1])
            result = fn(attn, x[:, -1:], past_k, past_v)
        assert isinstance(result, tuple) and len(result) == 3, "decode_step must return (y, k, v)"
        y, k, v = result
        assert tuple(k.shape) == tuple(v.shape) == (batch, heads, past + 1, 8), \
            f"batch {batch}, {heads} heads, {past} cached tokens: the new cache must hold past + 1 tokens per head"
        assert torch.allclose(y, full, atol=1e-5), \
            f"batch {batch}, {heads} heads, {past} cached tokens: the output differs from the full attention's"


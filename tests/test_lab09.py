"""Lab 09's exercise checks and measurements (labs_lib.labs.lab09): right answers pass, wrong ones fail with a
hint; the measures measure what they say."""

import pytest
import torch
import torch.nn.functional as F

from labs_lib.inference.generate import load_trained
from labs_lib.labs import lab09


def cached_attention(attn, x_new, past_k, past_v):
    B, T, _ = x_new.shape
    q, k, v = attn.qkv(x_new).chunk(3, dim=-1)
    q, k, v = (t.view(B, T, -1, attn.head_dim).transpose(1, 2) for t in (q, k, v))
    k, v = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
    y = F.scaled_dot_product_attention(q, k, v)
    return attn.proj(y.transpose(1, 2).reshape(B, T, -1)), k, v


def test_cached_attention_check_accepts_a_right_step_and_names_the_mistakes():
    assert lab09.check_cached_attention(cached_attention)

    def forgets_the_projection(attn, x_new, past_k, past_v):
        y, k, v = cached_attention(attn, x_new, past_k, past_v)
        B, T, _ = x_new.shape
        q = attn.qkv(x_new).chunk(3, dim=-1)[0].view(B, T, -1, attn.head_dim).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, -1), k, v

    with pytest.raises(AssertionError, match="attn.proj"):
        lab09.check_cached_attention(forgets_the_projection)

    def does_not_append(attn, x_new, past_k, past_v):
        y, _, _ = cached_attention(attn, x_new, past_k, past_v)
        return y, past_k, past_v

    with pytest.raises(AssertionError, match="concatenate"):
        lab09.check_cached_attention(does_not_append)
    assert lab09.check_cached_attention(None) is False
    assert lab09.check_cached_attention(lambda *args: ...) is False


def top_p_filter(logits, p):
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    outside = probs.cumsum(-1) - probs >= p
    return logits.masked_fill(outside.scatter(1, order, outside), float("-inf"))


def test_top_p_check():
    assert lab09.check_top_p(top_p_filter)

    def one_too_few(logits, p):  # stops before reaching p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        outside = sorted_logits.softmax(-1).cumsum(-1) > p
        return logits.masked_fill(outside.scatter(1, order, outside), float("-inf"))

    with pytest.raises(AssertionError, match="sum to at least p"):
        lab09.check_top_p(one_too_few)
    assert lab09.check_top_p(lambda logits, p: ...) is False


def quantize_per_channel(w):
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    return torch.clamp(torch.round(w / scale), -127, 127).to(torch.int8), scale


def test_quantize_check():
    assert lab09.check_quantize(quantize_per_channel)

    def per_tensor(w):
        scale = w.abs().max() / 127
        return torch.round(w / scale).to(torch.int8), scale.expand(w.size(0))

    with pytest.raises(AssertionError, match="max |w| of the row"):
        lab09.check_quantize(per_tensor)

    def truncates(w):
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        return (w / scale).to(torch.int8), scale

    with pytest.raises(AssertionError, match="round to the nearest"):
        lab09.check_quantize(truncates)
    assert lab09.check_quantize(lambda w: ...) is False


def test_serving_table_has_the_lab_gpt_and_gpt3_at_two_tp_degrees():
    rows = lab09.serving_table("ci")
    assert {(r["model"], r["tp"]) for r in rows} == {("lab GPT", 1), ("GPT-3 175B", 1), ("GPT-3 175B", 8)}
    gpt3 = [r for r in rows if r["model"] == "GPT-3 175B" and r["tp"] == 1]
    assert gpt3[0]["weights_gb"] == pytest.approx(349.2, rel=1e-3)  # 174.6 B parameters x 2 bytes


def test_the_cache_speedup_and_per_token_times_measure_the_same_tokens(trained_run):
    model, tokenizer, _ = load_trained(trained_run)
    prompt = tokenizer.encode("def main():").ids
    result = lab09.cache_speedup(model, prompt, new_tokens=60)  # raises if cached and uncached tokens differ
    assert result["uncached_s"] > 0 and result["cached_s"] > 0
    rows = lab09.per_token_times(model, [16, 64], repeats=2)
    assert [r["context"] for r in rows] == [16, 64] and all(r["cached_s"] > 0 for r in rows)
    assert lab09.latency_s(model, prompt, new_tokens=8, runs=2) > 0
    assert lab09.tokens_per_s(model, prompt, batch=2, new_tokens=8, runs=1) > 0


def test_a_reduction_row_measures_size_speed_and_perplexity(trained_run):
    from labs_lib.inference.distill import perplexity
    from labs_lib.inference.quantize import cast, model_bytes

    model, tokenizer, _ = load_trained(trained_run)
    data = lab09.run_data(trained_run)
    prompt = tokenizer.encode("import os").ids
    row = lab09.measure(model, "fp32", data, prompt, runs=2, new_tokens=32)  # the fixture's context is 128
    assert row["MB"] == model_bytes(model) / 1e6 == 4 * model.num_params() / 1e6
    assert row["perplexity"] == perplexity(model, data.val_path, lab09.EVAL_SEQ, lab09.EVAL_BATCHES)
    assert row["latency ms"] > 0 and row["tok/s b8"] > 0
    half = lab09.measure(cast(model, torch.bfloat16), "bf16", data, prompt, speed=False)
    assert half["MB"] == row["MB"] / 2 and half["latency ms"] == ""
    assert abs(half["perplexity"] / row["perplexity"] - 1) < 0.02

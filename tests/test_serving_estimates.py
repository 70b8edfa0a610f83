"""The memory of serving: the KV-cache formula against a real cache, the crossover, and tensor parallelism."""

import pytest
import torch

from labs_lib.core.config import GPTConfig
from labs_lib.estimates.serving import kv_cache_bytes, kv_equals_weights_tokens, serving_rows, weight_bytes
from labs_lib.inference.cache import KVCache, forward_cached
from labs_lib.inference.generate import Decoding, generate_ids
from labs_lib.models.gpt import GPT
from labs_lib.planner.presets import model_preset


def test_the_formula_is_what_a_real_cache_holds():
    config = GPTConfig(vocab_size=128, block_size=64, n_layer=3, n_head=4, n_embd=32)
    model = GPT(config).eval()
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        cache = KVCache(40)
        forward_cached(model.to(dtype), torch.ones(5, 40, dtype=torch.long), cache, torch.arange(40).expand(5, -1))
        assert cache.nbytes == kv_cache_bytes(3, 32, batch=5, seq_len=40, bytes_per_value=size)
    assert generate_ids(model.float(), [[1, 2]], Decoding(4, temperature=0))  # the model still generates


def test_gpt3_175b_cache_outweighs_its_weights_at_36_full_contexts():
    gpt3 = model_preset("gpt3-175b")
    per_token = kv_cache_bytes(gpt3.layers, gpt3.hidden, 1, 1)
    assert per_token == pytest.approx(4.72e6, rel=1e-3)  # 2 x 96 layers x 12288 x 2 bytes
    tokens = kv_equals_weights_tokens(gpt3.params(), gpt3.layers, gpt3.hidden)
    assert kv_cache_bytes(gpt3.layers, gpt3.hidden, 1, tokens) == pytest.approx(weight_bytes(gpt3.params()))
    assert 36 < tokens / gpt3.seq < 37


def test_tensor_parallelism_splits_both_and_keeps_the_crossover():
    gpt3 = model_preset("gpt3-175b")
    one, eight = (serving_rows(gpt3.params(), gpt3.layers, gpt3.hidden, [1, 64], 2048, tp=t) for t in (1, 8))
    for a, b in zip(one, eight):
        assert b["weights_gb"] == pytest.approx(a["weights_gb"] / 8)
        assert b["kv_cache_gb"] == pytest.approx(a["kv_cache_gb"] / 8)
    assert one[0]["total_gb"] > 80 and eight[0]["total_gb"] < 80  # 175B needs tensor parallelism to fit an 80 GB GPU
    assert one[1]["kv_cache_gb"] > one[1]["weights_gb"]  # 64 sequences of 2048 tokens: the cache outweighs them

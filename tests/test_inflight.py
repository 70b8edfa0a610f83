"""The paged KV cache and in-flight batching: packed forwards equal the contiguous cache's, and every request of a
continuously batched run (arriving at any step, evicted and resumed or not) gets what generate_ids gives it alone."""

import pytest
import torch

from labs_lib.data.text import encode
from labs_lib.deploy.tensor_parallel import finished_rule
from labs_lib.inference.cache import KVCache, forward_cached
from labs_lib.inference.generate import Decoding, generate_ids, load_trained
from labs_lib.inference.inflight import InflightBatcher, TooLargeForPool, admission_cost, admitted
from labs_lib.inference.paged import (
    PagedKVCache,
    PoolExhausted,
    blocks_needed,
    contiguous_kv_bytes,
    forward_paged,
    kv_bytes_per_token,
)

TEXTS = ["def main():\n    ", "import os", "class Point(object):\n    def __init__(self, x", "x = [",
         "for i in range(10):\n        print(", "return"]
GREEDY = Decoding(max_new_tokens=24, temperature=0)
# (arrival step, prompt index, decoding): mixed prompt and output lengths, greedy and sampled, joining mid-run
WORKLOAD = [(0, 0, GREEDY), (0, 1, Decoding(8, temperature=0)), (1, 2, Decoding(30, temperature=0.9, top_k=40, seed=3)),
            (3, 3, Decoding(16, temperature=0, repetition_penalty=1.3)),
            (3, 4, Decoding(20, temperature=0.8, top_p=0.9, repetition_penalty=1.2, seed=11)),
            (7, 5, Decoding(12, temperature=1.0, seed=5))]


@pytest.fixture(scope="module")
def trained(trained_run):
    model, tokenizer, _ = load_trained(trained_run)
    return model, [encode(tokenizer, t) for t in TEXTS]


def alone(model, prompt, d, stop=()):
    return generate_ids(model, [prompt], d, finished_rule(stop))[0]


def run_workload(batcher, prompts, workload=WORKLOAD):
    """Submit each request at its arrival step, stepping until all are done; the requests' Sequences in order."""
    seqs, step = [], 0
    while len(seqs) < len(workload) or not batcher.idle:
        seqs += [batcher.submit(prompts[p], d) for at, p, d in workload if at == step]
        batcher.step()
        step += 1
    return seqs


def test_a_packed_forward_of_prefill_chunks_and_decode_tokens_equals_the_contiguous_cache(trained):
    model, prompts = trained
    a, b, c = prompts[0], prompts[2], prompts[4]
    extra = [11, 12, 13]  # tokens fed one by one after each prompt (decode steps)
    packs = [[("a", a), ("b", b[:5])],                                   # a prefill and a prefill chunk
             [("a", extra[:1]), ("b", b[5:]), ("c", c)],                 # a decode, the chunk's rest, a prefill
             [("c", extra[:1]), ("a", extra[1:2]), ("b", extra[:1])],    # decodes only
             [("b", extra[1:3]), ("a", extra[2:3])]]                     # two tokens at once beside a decode
    cache = PagedKVCache.for_model(model, num_blocks=40, block_size=4)
    got = {"a": [], "b": [], "c": []}
    with torch.no_grad():
        for pack in packs:
            logits = forward_paged(model, cache, pack)
            start = 0
            for seq, tokens in pack:
                got[seq].append(logits[start:start + len(tokens)])
                start += len(tokens)
        for seq, tokens in (("a", a + extra), ("b", b + extra), ("c", c + extra[:1])):
            contiguous = KVCache(len(tokens))
            expected = forward_cached(model, torch.tensor([tokens]), contiguous, torch.arange(len(tokens))[None])[0]
            torch.testing.assert_close(torch.cat(got[seq]), expected, atol=1e-5, rtol=1e-5)
            assert cache.length(seq) == len(tokens) and cache.held(seq) == -(-len(tokens) // 4)
    a_blocks, b_blocks = cache.tables["a"], cache.tables["b"]
    assert min(b_blocks) < max(a_blocks), "the sequences' blocks interleave in the pool (really paged)"
    with torch.no_grad():  # the last token only: what a decoding step needs
        last = forward_paged(model, cache, [("a", [5]), ("c", [6, 7])], last_only=True)
    assert last.shape == (2, model.config.vocab_size)


def test_blocks_are_taken_as_a_sequence_grows_and_given_back_when_it_ends(trained):
    model, prompts = trained
    cache = PagedKVCache.for_model(model, num_blocks=4, block_size=4)
    assert cache.can_admit(16) and not cache.can_admit(17)
    with torch.no_grad():
        forward_paged(model, cache, [("s", prompts[1][:5])])
        assert cache.blocks_in_use == 2 and cache.nbytes_in_use == 2 * cache.block_nbytes
        for token in (1, 2, 3):  # up to 8 tokens: still 2 blocks
            forward_paged(model, cache, [("s", [token])])
        assert cache.blocks_in_use == 2
        forward_paged(model, cache, [("s", [4])])
        assert cache.blocks_in_use == 3
        with pytest.raises(PoolExhausted, match="num_blocks"):  # 9 more tokens need 3 blocks, 1 is free
            forward_paged(model, cache, [("t", list(range(9)))])
        assert cache.blocks_in_use == 3 and "t" not in cache.tables  # all or nothing
    cache.free("s")
    assert cache.blocks_in_use == 0 and len(set(cache.free_blocks)) == 4
    assert kv_bytes_per_token(model) == 2 * 2 * 2 * 32 * 4  # layers x (k, v) x heads x head_dim x float32 bytes
    assert cache.block_nbytes == 4 * kv_bytes_per_token(model)


@pytest.mark.parametrize("policy", ["guaranteed_no_evict", "max_utilization"])
def test_in_flight_batching_gives_each_request_what_it_gets_alone(trained, policy):
    model, prompts = trained
    batcher = InflightBatcher(model, num_blocks=64, block_size=4, policy=policy, max_num_tokens=20)
    seqs = run_workload(batcher, prompts)
    for seq, (_, p, d) in zip(seqs, WORKLOAD):
        assert seq.generated == alone(model, prompts[p], d), f"request {seq.id} ({d})"
    steps = batcher.history
    assert all(s.tokens <= 20 for s in steps), "tokens in flight stay within max_num_tokens every step"
    assert max(s.sequences for s in steps) >= 4, "requests really ran together"
    assert any(s.admitted and s.decode_tokens for s in steps), "requests joined while others were decoding"
    assert any(s.prefill_tokens and s.decode_tokens for s in steps), "prefill and decode tokens in one pack"
    assert not any(s.evicted for s in steps), "a pool this large never evicts"
    assert batcher.cache.blocks_in_use == 0 and not batcher.cache.tables, "every block back at the end"


def test_max_utilization_evicts_the_newest_and_resumes_it_unchanged(trained):
    model, prompts = trained
    batcher = InflightBatcher(model, num_blocks=22, block_size=4, policy="max_utilization", max_num_tokens=32)
    seqs = run_workload(batcher, prompts)
    for seq, (_, p, d) in zip(seqs, WORKLOAD):
        assert seq.generated == alone(model, prompts[p], d), f"request {seq.id} after eviction"
    assert any(s.evicted for s in batcher.history), "a pool this small must evict"
    running: list[int] = []
    for s in batcher.history:  # replayed: evictions come first in a step, then admissions, then ends
        for victim in s.evicted:
            assert victim == running.pop(), "the newest running request is evicted first"
        running = [i for i in running + s.admitted if i not in s.finished]
        assert s.blocks_in_use <= 22
    assert batcher.cache.blocks_in_use == 0


def test_guaranteed_no_evict_queues_what_it_cannot_hold_and_never_evicts(trained):
    model, prompts = trained
    pool = 22
    batcher = InflightBatcher(model, num_blocks=pool, block_size=4, policy="guaranteed_no_evict", max_num_tokens=32)
    seqs = run_workload(batcher, prompts)
    for seq, (_, p, d) in zip(seqs, WORKLOAD):
        assert seq.generated == alone(model, prompts[p], d)
    assert not any(s.evicted for s in batcher.history)
    assert any(s.waiting for s in batcher.history), "some request had to wait for blocks"
    lifetimes = {seq.id: blocks_needed(len(seq.prompt), seq.decoding.max_new_tokens, 4) for seq in seqs}
    running: set[int] = set()
    for s in batcher.history:  # what it admitted always fitted for the whole life of everything running
        running |= set(s.admitted)
        assert sum(lifetimes[i] for i in running) <= pool
        running -= set(s.finished)
    assert batcher.cache.blocks_in_use == 0


def test_end_id_stop_sequences_and_streaming_callbacks(trained):
    model, prompts = trained
    greedy = alone(model, prompts[0], GREEDY)
    end_id = Decoding(24, temperature=0, eos_token_id=greedy[6])
    stop = (tuple(greedy[3:5]),)
    cut = next(n for n in range(2, 6) if tuple(greedy[n - 2:n]) == stop[0])  # where the stop sequence first ends
    batcher = InflightBatcher(model, num_blocks=32, block_size=8)
    streamed = []
    ended = batcher.submit(prompts[0], end_id)
    stopped = batcher.submit(prompts[0], GREEDY, stop=stop,
                             on_token=lambda s: streamed.append((list(s.generated), s.finished)))
    outputs = batcher.run_until_done()
    assert outputs[ended.id] == alone(model, prompts[0], end_id) == greedy[:greedy.index(greedy[6]) + 1]
    assert ended.finish_reason == "end_id"
    assert outputs[stopped.id] == alone(model, prompts[0], GREEDY, stop) == greedy[:cut]
    assert stopped.finish_reason == "stop"
    assert streamed == [(greedy[:n], n == cut) for n in range(1, cut + 1)], "one callback per token, the last one final"


def test_refusals_name_the_fix(trained):
    model, prompts = trained
    batcher = InflightBatcher(model, num_blocks=4, block_size=4)
    with pytest.raises(TooLargeForPool, match=r"num_blocks >= 7"):  # 9 + 20 - 1 = 28 tokens: 7 blocks of 4
        batcher.submit(prompts[2][:9], Decoding(20, temperature=0))
    with pytest.raises(ValueError, match="beam_search"):
        batcher.submit(prompts[1], Decoding(4, temperature=0, num_beams=2))
    with pytest.raises(ValueError, match="context"):
        batcher.submit(prompts[1], Decoding(model.config.block_size, temperature=0))
    with pytest.raises(ValueError, match="guaranteed_no_evict"):
        InflightBatcher(model, num_blocks=4, policy="first_come")
    assert batcher.idle and batcher.step() is None


def test_the_policies_admission_rules_and_the_memory_they_hold(trained):
    model, prompts = trained
    assert blocks_needed(10, 7, 4) == 4  # 10 + 7 - 1 = 16 tokens in the cache at most
    assert admission_cost("guaranteed_no_evict", 10, 7, 4) == 4 and admission_cost("max_utilization", 10, 7, 4) == 3
    queue = [(10, 7), (3, 30), (4, 1)]  # (prompt tokens, max new tokens), oldest first
    assert admitted("guaranteed_no_evict", queue, 10, 4) == [0]  # 4 + 8 > 10: the second waits, and the third too
    assert admitted("max_utilization", queue, 10, 4) == [0, 1, 2]  # 3 + 1 + 1 blocks now
    batcher = InflightBatcher(model, num_blocks=64, block_size=4, max_num_tokens=64)
    for p in prompts:
        batcher.submit(p, GREEDY)
    batcher.run_until_done()
    peak = max(s.kv_bytes for s in batcher.history)
    assert all(s.kv_bytes == s.blocks_in_use * batcher.cache.block_nbytes for s in batcher.history)
    assert peak < contiguous_kv_bytes(model, [len(p) for p in prompts], GREEDY.max_new_tokens)

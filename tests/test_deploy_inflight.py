"""In-flight batching in the served gpt model: the scheduler thread answers every request as static batching does
(streamed pieces and whole answers), requests arriving from many threads at once; and the real server with
batching_strategy inflight_fused_batching."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from labs_lib.deploy.engine import GptEngine
from labs_lib.deploy.inflight import scheduler_from_parameters

INFLIGHT = {"batching_strategy": "inflight_fused_batching", "batch_scheduler_policy": "max_utilization",
            "max_tokens_in_paged_kv_cache": "160", "tokens_per_block": "8", "max_num_tokens": "24"}


@pytest.fixture(scope="module")
def engine(trained_run):
    return GptEngine(trained_run, decoupled=True)


def inputs(engine, text: str, max_tokens: int, stream: bool = False, **extra) -> dict:
    ids = engine.tokenizer.encode(text).ids
    return {"input_ids": np.array([ids], np.int32), "input_lengths": np.array([[len(ids)]], np.int32),
            "request_output_len": np.array([[max_tokens]], np.int32), "streaming": np.array([[stream]]),
            **{k: np.array([[v]]) for k, v in extra.items()}}


REQUESTS = [("def ", 30, False, {}), ("import os\n", 8, True, {}), ("class Point:\n    def ", 20, True, {}),
            ("x = ", 12, False, {"temperature": np.float32(0.5), "runtime_top_k": 20, "seed": 3}),
            ("for i in ", 25, True, {"repetition_penalty": np.float32(1.5)}), ("return ", 5, False, {})]


def static_answers(engine, requests) -> list[list[list[int]]]:
    """Each request's responses from the static (V1) engine: streamed pieces then the last one, or one answer."""
    replies: list[list[list[int]]] = [[] for _ in requests]
    engine.run(requests, lambda i, tokens, final: replies[i].append(tokens))
    return replies


def test_the_scheduler_thread_answers_concurrent_requests_as_static_batching(engine):
    requests = [engine.parse(inputs(engine, text, n, stream, **extra)) for text, n, stream, extra in REQUESTS]
    expected = static_answers(engine, requests)
    scheduler = scheduler_from_parameters(engine, INFLIGHT, max_batch_size=8)
    replies: list[list] = [[] for _ in requests]
    done = [threading.Event() for _ in requests]

    def send(i: int) -> None:
        def reply(tokens, final):
            replies[i].append(tokens)
            if final:
                done[i].set()
        scheduler.submit(requests[i], reply)

    try:
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        assert all(event.wait(timeout=60) for event in done), "every request answered"
        history = scheduler.batcher.history
    finally:
        scheduler.close()
    assert replies == expected
    assert max(s.sequences for s in history) >= 3, "requests ran in one batch"
    assert all(s.tokens <= 24 for s in history)
    assert scheduler.batcher.cache.blocks_in_use == 0


def test_errors_are_answered_and_the_scheduler_goes_on(engine):
    scheduler = scheduler_from_parameters(engine, dict(INFLIGHT, max_tokens_in_paged_kv_cache="16"))
    answers = []
    try:
        scheduler.submit(ValueError("bad input"), lambda tokens, final: answers.append((tokens, final)))
        too_large = engine.parse(inputs(engine, "def ", 40))  # 40 new tokens: more than the pool's 2 blocks of 8
        small = engine.parse(inputs(engine, "def ", 4))
        finished = threading.Event()
        scheduler.submit(too_large, lambda tokens, final: answers.append((tokens, final)))
        scheduler.submit(small, lambda tokens, final: (answers.append((tokens, final)), finished.set()))
        assert finished.wait(timeout=60)
    finally:
        scheduler.close()
    assert str(answers[0][0]) == "bad input"
    assert isinstance(answers[1][0], ValueError) and "max_tokens_in_paged_kv_cache" in str(answers[1][0])
    assert answers[2] == (static_answers(engine, [small])[0][0], True)
    with pytest.raises(RuntimeError, match="closed"):
        scheduler.submit(small, lambda tokens, final: None)


def test_parameters_are_checked_naming_the_fix(engine):
    assert scheduler_from_parameters(engine, {}) is None  # V1: static batching
    assert scheduler_from_parameters(engine, {"batching_strategy": "V1"}) is None
    with pytest.raises(ValueError, match="inflight_fused_batching"):
        scheduler_from_parameters(engine, {"batching_strategy": "inflight"})
    with pytest.raises(ValueError, match="decoupled"):
        scheduler_from_parameters(engine, INFLIGHT, decoupled=False)
    with pytest.raises(ValueError, match="whole number"):
        scheduler_from_parameters(engine, dict(INFLIGHT, tokens_per_block="8k"))
    with pytest.raises(ValueError, match="max_utilization"):
        scheduler_from_parameters(engine, dict(INFLIGHT, batch_scheduler_policy="fifo"))

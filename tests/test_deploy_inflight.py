"""In-flight batching in the served gpt model: the scheduler thread answers every request as static batching does
(streamed pieces and whole answers), requests arriving from many threads at once; and the real server with
batching_strategy inflight_fused_batching."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from labs_lib.deploy import client
from labs_lib.deploy.engine import GptEngine
from labs_lib.deploy.inflight import kv_block_metrics, scheduler_from_parameters
from labs_lib.deploy.metrics import metric
from labs_lib.deploy.repository import MODELS, render_repository
from labs_lib.deploy.server import TritonServer
from labs_lib.inference.generate import Decoding, generate_text, load_trained

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
    reported = []
    scheduler.on_step = lambda cache: reported.append(kv_block_metrics(cache))
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
    assert max(r["used"] for r in reported) > 0 and reported[-1] == {"max": 20, "free": 20, "used": 0, "tokens_per": 8}


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


# ---------------------------------------------------------------------------------------------------- the server

@pytest.fixture(scope="module")
def inflight_server(trained_run, tmp_path_factory):
    repository = render_repository(trained_run, tmp_path_factory.mktemp("deploy_inflight") / "repository",
                                   batching_strategy="inflight_fused_batching",
                                   batch_scheduler_policy="max_utilization", max_tokens_in_paged_kv_cache=512,
                                   tokens_per_block=8, max_num_tokens=64)
    with TritonServer(repository, list(MODELS)) as s:
        yield s


# (prompt, max_tokens, stream, settings): mixed lengths, streamed and whole, greedy, penalised and sampled
SERVED = [("def ", 30, False, {}), ("import os\n", 8, True, {}), ("class Point:\n    def ", 20, True, {}),
          ("for i in ", 25, True, {"repetition_penalty": 1.5}), ("return ", 5, False, {}),
          ("x = ", 20, False, {"temperature": 0.5, "top_k": 20, "top_p": 0.75, "seed": 3})] * 2  # binary fractions


@pytest.mark.slow
def test_served_in_flight_requests_equal_local_generation(inflight_server, trained_run):
    model, tokenizer, _ = load_trained(trained_run)
    eos = tokenizer.token_to_id("<|endoftext|>")
    expected = [generate_text(model, tokenizer, text, Decoding(n, eos_token_id=eos, **{"temperature": 0.0, **extra}))[0]
                for text, n, _, extra in SERVED]
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        text, n, stream, extra = SERVED[i]
        if stream:
            results[i] = "".join(client.generate_stream(inflight_server.http_url, text, n, **extra))
        else:
            results[i] = client.generate(inflight_server.http_url, text, n, **extra)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(SERVED))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [results.get(i) for i in range(len(SERVED))] == expected


@pytest.mark.slow
def test_a_short_request_finishes_while_a_long_one_streams(inflight_server):
    """In flight, a request joins the running batch at the next step: a 3-token request sent while a 100-token one
    streams ends long before it (static batching would queue it behind the whole stream)."""
    events: list[tuple[str, float]] = []
    started = threading.Event()

    def long_stream() -> None:
        for _ in client.generate_stream(inflight_server.http_url, "def ", 100):
            started.set()
        events.append(("long", time.monotonic()))

    worker = threading.Thread(target=long_stream)
    worker.start()
    assert started.wait(timeout=60)
    client.generate(inflight_server.http_url, "import ", 3)
    events.append(("short", time.monotonic()))
    used_while_streaming = metric(inflight_server.metrics_url, "nv_trt_llm_kv_cache_block_metrics",
                                  kv_cache_block_type="used")
    worker.join(timeout=120)
    assert [name for name, _ in events] == ["short", "long"]
    blocks = {kind: metric(inflight_server.metrics_url, "nv_trt_llm_kv_cache_block_metrics", kv_cache_block_type=kind)
              for kind in ("max", "free", "used", "tokens_per")}
    assert blocks == {"max": 64, "free": 64, "used": 0, "tokens_per": 8}, "every block back once all have ended"
    assert used_while_streaming >= 1, "the long request held blocks while it streamed"


@pytest.mark.slow
def test_the_mixed_workload_load_streams_and_times_every_request(inflight_server, trained_run):
    """labs_lib.deploy.mixed's streaming load (the benchmark's): every request answered, its first text before its
    end, and the answers' tokens counted."""
    from labs_lib.deploy.mixed import MIXED_WORKLOAD, run_stream_load
    from labs_lib.deploy.words import load_run_tokenizer

    tokenizer = load_run_tokenizer(trained_run)
    row = run_stream_load(inflight_server.grpc_url, MIXED_WORKLOAD, concurrency=4, duration_s=2, tokenizer=tokenizer)
    assert row["requests"] >= 4 and row["failures"] == 0
    assert 0 < row["TTFT p50 ms"] <= row["p50 ms"] and row["TTFT p99 ms"] <= row["p99 ms"]
    assert row["tokens/s"] > row["requests/s"] > 0

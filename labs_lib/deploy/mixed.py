"""A mixed workload streamed through the ensemble: no batching, dynamic batching and in-flight batching compared.

    result = run_stream_load(server.grpc_url, MIXED_WORKLOAD, concurrency=8, duration_s=10, tokenizer=tok)
    rows = compare_mixed("build/runs/demo", concurrencies=(4, 8, 16), duration_s=10)        # one server per mode

Requests differ in prompt length (a few tokens to a screenful of code) and in how many tokens they ask for (8 to
96), as real traffic does. Each of ``concurrency`` clients keeps one gRPC stream open and one request in flight (a
closed loop), streaming (decoupled repositories): the time to first token (TTFT) is when the request's first text
arrives, its latency when its final response does. Tokens/s counts the answers' tokens (re-encoded).

The three modes are the same run rendered three ways: ``none`` (gpt without dynamic batching: each request runs
alone, the others wait), ``dynamic`` (static batches of up to max_batch_size formed in Triton's queue; a batch runs
until its longest request ends) and ``inflight`` (TensorRT-LLM's inflight_fused_batching over the paged KV cache:
requests join and leave between steps). For KV memory, the in-flight rows report the pool's peak used blocks read
from its ``nv_trt_llm_kv_cache_block_metrics`` gauge while the load runs; the static rows report what the contiguous
cache reserves for one full batch (longest prompt + most new tokens per row: labs_lib.inference.paged's rule).
"""

from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from labs_lib.deploy.client import MODEL, grpc_inputs
from labs_lib.deploy.load import LoadError, run_clients

__all__ = ["MIXED_WORKLOAD", "MODES", "run_stream_load", "compare_mixed"]

_CODE = "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
MIXED_WORKLOAD = [("def ", 96), (_CODE, 8), ("import os\n", 48), (_CODE + "        ", 16), ("for i in range(", 64),
                  ("# Copyright", 8), ("class Point:\n    def ", 32), ("return self.", 96)]
MODES = ("none", "dynamic", "inflight")


@dataclass
class StreamRecord:
    start: float
    first: float | None
    end: float
    text: str
    error: str | None


def _stream_client(url: str, model: str, timeout_s: float):
    """(send(prompt, max_tokens) -> StreamRecord, close()) over one gRPC stream kept open."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    arrived: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: arrived.put((time.monotonic(), result, error)))

    def send(prompt: str, max_tokens: int) -> StreamRecord:
        start, first, pieces = time.monotonic(), None, []
        client.async_stream_infer(model, grpc_inputs(prompt, max_tokens, {"stream": True}),
                                  enable_empty_final_response=True)
        while True:
            at, result, error = arrived.get(timeout=timeout_s)
            if error is not None:
                return StreamRecord(start, first, at, "".join(pieces), error.message())
            text = result.as_numpy("text_output")
            if text is not None and text.size and text.reshape(-1)[0]:
                first = first or at
                pieces.append(text.reshape(-1)[0].decode())
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                return StreamRecord(start, first, at, "".join(pieces), None)

    def close() -> None:
        client.stop_stream()
        client.close()

    return send, close


def run_stream_load(url: str, workload, concurrency: int, duration_s: float, model: str = MODEL, tokenizer=None,
                    timeout_s: float = 120.0) -> dict:
    """``concurrency`` streaming clients for ``duration_s`` (after one warm-up request each), client i cycling
    through the workload from request i: requests/s, tokens/s, p50 / p99 latency and TTFT (ms), failures."""
    if concurrency < 1 or not workload:
        raise ValueError("concurrency must be >= 1 and the workload not empty")
    barrier = threading.Barrier(concurrency + 1)
    records: list[list[StreamRecord]] = [[] for _ in range(concurrency)]
    warm_errors: list[str] = []

    def client(i: int) -> None:
        send = close = None
        try:
            send, close = _stream_client(url, model, timeout_s)
            warm = send(*workload[i % len(workload)])
            if warm.error is not None:
                warm_errors.append(warm.error)
        except Exception as e:  # noqa: BLE001  (reported below, for every client alike)
            warm_errors.append(str(e) or type(e).__name__)
        finally:
            barrier.wait()
        try:
            deadline, k = time.monotonic() + duration_s, 0
            while not warm_errors and time.monotonic() < deadline:
                records[i].append(send(*workload[(i + k * concurrency) % len(workload)]))
                k += 1
        finally:
            if close is not None:
                close()

    run_clients(client, concurrency, barrier)
    if warm_errors:
        raise LoadError(f"the warm-up request to {model} at {url} failed: {warm_errors[0]}")
    return _summary([r for rs in records for r in rs], tokenizer)


def _summary(records: list[StreamRecord], tokenizer) -> dict:
    ok = [r for r in records if r.error is None]
    span = max(r.end for r in records) - min(r.start for r in records) if records else 0.0

    def pct(values, q):
        return float(np.percentile(values, q)) if values else math.nan

    latency = [1e3 * (r.end - r.start) for r in ok]
    ttft = [1e3 * (r.first - r.start) for r in ok if r.first is not None]
    tokens = sum(len(tokenizer.encode(r.text).ids) for r in ok) if tokenizer is not None else math.nan
    return {"requests": len(records), "failures": len(records) - len(ok),
            "requests/s": len(ok) / span if span else 0.0, "tokens/s": tokens / span if span else 0.0,
            "p50 ms": pct(latency, 50), "p99 ms": pct(latency, 99), "TTFT p50 ms": pct(ttft, 50),
            "TTFT p99 ms": pct(ttft, 99)}


def _render(run, out: Path, mode: str, max_batch_size: int, queue_delay_us: int) -> Path:
    from labs_lib.deploy.repository import render_repository

    if mode == "inflight":
        return render_repository(run, out / mode, max_batch_size=max_batch_size, decoupled=True,
                                 batching_strategy="inflight_fused_batching", batch_scheduler_policy="max_utilization",
                                 dynamic_batching=True, max_queue_delay_microseconds=0)
    return render_repository(run, out / mode, max_batch_size=max_batch_size, decoupled=True,
                             dynamic_batching=mode == "dynamic", max_queue_delay_microseconds=queue_delay_us)


def _peak_gauge(metrics_url: str, stop: threading.Event, peak: list[float]) -> None:
    from labs_lib.deploy.metrics import metric

    while not stop.is_set():
        try:
            peak[0] = max(peak[0], metric(metrics_url, "nv_trt_llm_kv_cache_block_metrics",
                                          kv_cache_block_type="used"))
        except (KeyError, OSError, ValueError):
            pass  # not set before the first step
        stop.wait(0.05)


def compare_mixed(run: str | Path, concurrencies=(4, 8, 16), out: str | Path | None = None,
                  workload=MIXED_WORKLOAD, duration_s: float = 10.0, max_batch_size: int = 8,
                  queue_delay_us: int = 1000, tokens_per_block: int = 16, progress: bool = True) -> list[dict]:
    """The workload at each concurrency against the run served in each of :data:`MODES` (one server after the
    other); a row per mode and concurrency with the load's figures and the KV bytes (see the module docstring)."""
    from tqdm.auto import tqdm

    from labs_lib.core.checkpoint import resolve_run
    from labs_lib.deploy.repository import MODELS, default_repository
    from labs_lib.deploy.server import TritonServer
    from labs_lib.deploy.words import load_run_tokenizer
    from labs_lib.inference.generate import load_trained
    from labs_lib.inference.paged import contiguous_kv_bytes, kv_bytes_per_token

    out = Path(out) if out is not None else default_repository(run).parent / "mixed"
    tokenizer = load_run_tokenizer(resolve_run(run)[1])
    model = load_trained(run)[0]
    lengths = [len(tokenizer.encode(p).ids) for p, _ in workload]
    block_bytes = kv_bytes_per_token(model) * tokens_per_block
    rows, bar = [], tqdm(total=len(MODES) * len(concurrencies), desc="mixed workload", disable=not progress)
    for mode in MODES:
        with TritonServer(_render(run, out, mode, max_batch_size, queue_delay_us), list(MODELS)) as server:
            for concurrency in concurrencies:
                bar.set_postfix_str(f"{mode}, concurrency {concurrency}")
                stop, peak = threading.Event(), [0.0]
                watcher = threading.Thread(target=_peak_gauge, args=(server.metrics_url, stop, peak), daemon=True)
                watcher.start()
                result = run_stream_load(server.grpc_url, workload, concurrency, duration_s, tokenizer=tokenizer)
                stop.set()
                watcher.join()
                batch = min(concurrency, max_batch_size) if mode == "dynamic" else 1
                kv = peak[0] * block_bytes if mode == "inflight" else \
                    contiguous_kv_bytes(model, [max(lengths)] * batch, max(n for _, n in workload))
                rows.append({"batching": mode, "concurrency": concurrency, **result, "KV MB": kv / 1e6,
                             "KV is": "measured peak (paged)" if mode == "inflight" else "reserved per batch"})
                bar.update()
    bar.close()
    return rows

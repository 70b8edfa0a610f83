"""The served model under load: a closed-loop load generator, perf_analyzer, dynamic batching on and off.

    result = run_load(server.grpc_url, PROMPTS, concurrency=8, max_tokens=24, duration_s=10)   # tritonclient
    print(result.throughput, result.p95_ms, result.failures, result.errors)
    row = run_perf_analyzer(server, "ensemble", concurrency=8, max_tokens=24).row()         # the real binary
    rows = compare_batching("build/runs/demo", concurrencies=(1, 4, 8, 16))                 # both tools, both ways
    rss = server_memory_bytes(server)                                  # tritonserver and its python stubs

``run_load``: ``concurrency`` clients, each a thread with its own tritonclient (gRPC or HTTP) and one request in
flight (a closed loop), against the ensemble's text_input / max_tokens, for a duration or a total request count,
after a warm-up of one request per client. Failed requests are counted, their first messages kept, never raised.

Both tools need a repository rendered with ``decoupled=False``: Triton refuses the plain infer API for a decoupled
model, and perf_analyzer would have to stream over gRPC (``--streaming``), where a request's latency is its last
response's and the figures are not comparable with the load generator's. A whole answer per request is what both
measure here.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from labs_lib.deploy.client import MODEL, ensemble_inputs
from labs_lib.deploy.server import TritonServer, find_perf_analyzer

__all__ = ["PROMPTS", "LoadResult", "LoadError", "run_load", "run_clients", "run_perf_analyzer", "compare_batching",
           "server_memory_bytes"]

PROMPTS = ("def ", "import os\n", "class Point:\n    def ", "for i in range(", "return self.", "# Copyright")
_DECOUPLED_HINT = ("the model is decoupled: render the repository with decoupled=False (render_repository(run, out, "
                   "decoupled=False)) to measure it with the plain infer API")


class LoadError(RuntimeError):
    """The measurement could not run at all (its warm-up failed, perf_analyzer stopped); the message says why."""


@dataclass
class LoadResult:
    """One measurement: ``concurrency`` clients for ``duration_s``; latencies (ms) of the requests that succeeded."""

    tool: str
    concurrency: int
    requests: int
    failures: int
    duration_s: float
    throughput: float  # successful requests per second
    p50_ms: float
    p95_ms: float
    p99_ms: float
    tokens_per_s: float | None = None
    errors: list[str] = field(default_factory=list)  # the first few distinct failure messages
    answers: dict[str, Counter] = field(default_factory=dict, repr=False)  # prompt -> Counter of the texts served

    def row(self) -> dict:
        """The table columns: everything but the answers, the errors as a count-free summary."""
        row = {k: v for k, v in asdict(self).items() if k not in ("answers", "errors")}
        row["errors"] = "; ".join(self.errors)[:120]
        return row


def _percentiles(latencies_ms: list[float]) -> tuple[float, float, float]:
    if not latencies_ms:
        return math.nan, math.nan, math.nan
    p50, p95, p99 = np.percentile(latencies_ms, [50, 95, 99])
    return float(p50), float(p95), float(p99)


def _message(e: Exception) -> str:
    message = getattr(e, "message", None)
    return (message() if callable(message) else None) or str(e) or type(e).__name__


def _sender(protocol: str, url: str, model: str, prompts, max_tokens: int, timeout_s: float):
    """(send(prompt) -> text, close()) of one client: the prompts' input tensors are built once."""
    if protocol == "grpc":
        import tritonclient.grpc as module

        client = module.InferenceServerClient(url)
        options = {"client_timeout": timeout_s}
    elif protocol == "http":
        import tritonclient.http as module

        client = module.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
        options = {}
    else:
        raise ValueError(f"protocol={protocol!r}: use 'grpc' or 'http'")
    inputs = {}
    for prompt in set(prompts):
        inputs[prompt] = []
        for name, array, datatype in ensemble_inputs(prompt, max_tokens):
            tensor = module.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            inputs[prompt].append(tensor)

    def send(prompt: str) -> str:
        result = client.infer(model, inputs[prompt], **options)
        return result.as_numpy("text_output").reshape(-1)[0].decode()

    return send, client.close


def run_load(url: str, prompts, concurrency: int, max_tokens: int, duration_s: float | None = None,
             requests: int | None = None, protocol: str = "grpc", model: str = MODEL, tokenizer=None,
             warmup: int = 1, timeout_s: float = 120.0, failure_pause_s: float = 0.05) -> LoadResult:
    """``concurrency`` closed-loop clients for ``duration_s`` seconds or ``requests`` requests in all.

    Client i sends prompts i, i + concurrency, ... (cycling through ``prompts``). With ``tokenizer`` (anything with
    ``encode(text).ids``) the answers are re-encoded to count tokens/s. A client pauses ``failure_pause_s`` after a
    failure, so that a server refusing fast is not flooded. A failed warm-up (the server cannot serve this at all)
    raises LoadError."""
    if (duration_s is None) == (requests is None):
        raise ValueError("give exactly one of duration_s (seconds) and requests (a total count)")
    if concurrency < 1 or not prompts:
        raise ValueError("concurrency must be >= 1 and prompts not empty")
    prompts = list(prompts)
    barrier = threading.Barrier(concurrency + 1)
    lock, issued = threading.Lock(), [0]
    done: list[list] = [[] for _ in range(concurrency)]  # per client: (start, end, prompt, text or None, error)
    warm_errors: list[str] = []

    def take() -> int | None:
        with lock:
            if requests is not None and issued[0] >= requests:
                return None
            issued[0] += 1
            return issued[0] - 1

    def client(i: int) -> None:
        send = close = None
        try:
            send, close = _sender(protocol, url, model, prompts, max_tokens, timeout_s)
            for k in range(warmup):
                send(prompts[(i + k * concurrency) % len(prompts)])
        except Exception as e:
            warm_errors.append(_message(e))
        finally:
            barrier.wait()
        try:
            if warm_errors:
                return
            deadline = None if duration_s is None else time.monotonic() + duration_s
            k = 0
            while (deadline is None or time.monotonic() < deadline) and (requests is None or take() is not None):
                prompt = prompts[(i + k * concurrency) % len(prompts)]
                k += 1
                start = time.monotonic()
                try:
                    text, error = send(prompt), None
                except Exception as e:
                    text, error = None, _message(e)
                done[i].append((start, time.monotonic(), prompt, text, error))
                if error is not None:
                    time.sleep(failure_pause_s)
        finally:
            if close is not None:
                close()

    run_clients(client, concurrency, barrier)
    if warm_errors:
        hint = f" ({_DECOUPLED_HINT})" if any("decoupled" in e for e in warm_errors) else ""
        raise LoadError(f"the warm-up request to {model} at {url} failed: {warm_errors[0]}{hint}")
    return _result(f"tritonclient {protocol}", concurrency, [r for rs in done for r in rs], tokenizer)


def run_clients(client, concurrency: int, barrier: threading.Barrier) -> None:
    """``client(i)`` for i < concurrency, each in its own thread; they start measuring together once every one has
    reached ``barrier`` (after its warm-up, whether it worked or not); returns when all have finished."""
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    for t in threads:
        t.join()


def _result(tool: str, concurrency: int, records: list[tuple], tokenizer) -> LoadResult:
    ok = [r for r in records if r[4] is None]
    duration = (max(r[1] for r in records) - min(r[0] for r in records)) if records else 0.0
    errors = list(dict.fromkeys(r[4] for r in records if r[4] is not None))[:5]
    answers: dict[str, Counter] = {}
    for _, _, prompt, text, _ in ok:
        answers.setdefault(prompt, Counter())[text] += 1
    tokens = None
    if tokenizer is not None and duration > 0:
        tokens = sum(n * len(tokenizer.encode(text).ids) for c in answers.values() for text, n in c.items()) / duration
    p50, p95, p99 = _percentiles([1e3 * (r[1] - r[0]) for r in ok])
    return LoadResult(tool, concurrency, len(records), len(records) - len(ok), duration,
                      len(ok) / duration if duration > 0 else 0.0, p50, p95, p99, tokens, errors, answers)


def _url_of(server: TritonServer | str, protocol: str) -> str:
    if isinstance(server, TritonServer):
        return server.grpc_url if protocol == "grpc" else server.http_url
    return server


def run_perf_analyzer(server: TritonServer | str, model: str = MODEL, concurrency: int = 1, prompts=PROMPTS,
                      max_tokens: int = 24, protocol: str = "grpc", measurement_interval_ms: int = 3000,
                      stability_percentage: float = 25, max_trials: int = 8, timeout_s: float = 600) -> LoadResult:
    """perf_analyzer (tritonclient's binary) at ``--concurrency-range concurrency``, the prompts as its fixed
    ``--input-data`` (one entry each, sent in turn). It measures windows of ``measurement_interval_ms`` until three
    in a row agree within ``stability_percentage`` (at most ``max_trials``); the result is those three windows
    (its ``-f`` CSV: throughput, p50 / p95 / p99; the request count from its report). ``server``: a TritonServer
    or the address for ``protocol``. LoadError with perf_analyzer's last lines if it fails."""
    binary, env = find_perf_analyzer()
    data = {"data": [{"text_input": [p], "max_tokens": [max_tokens]} for p in prompts]}
    with tempfile.TemporaryDirectory(prefix="perf_analyzer-") as tmp:
        inputs, table = Path(tmp) / "inputs.json", Path(tmp) / "results.csv"
        inputs.write_text(json.dumps(data))
        cmd = [str(binary), "-m", model, "-u", _url_of(server, protocol), "-i", protocol,
               f"--concurrency-range={concurrency}:{concurrency}", f"--input-data={inputs}", "-f", str(table),
               f"--measurement-interval={measurement_interval_ms}", f"--stability-percentage={stability_percentage}",
               f"--max-trials={max_trials}", f"--max-threads={concurrency}"]  # synchronous: a thread per request
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise LoadError(f"perf_analyzer ran past {timeout_s:.0f} s: lower max_trials or the interval") from None
        output = done.stdout + done.stderr
        if done.returncode != 0 or not table.exists():
            hint = f" ({_DECOUPLED_HINT})" if "decoupled" in output else ""
            tail = "\n".join(output.strip().splitlines()[-8:])
            raise LoadError(f"perf_analyzer exited with code {done.returncode}{hint}:\n{tail}")
        with open(table, newline="") as f:
            row = next(r for r in csv.DictReader(f) if int(r["Concurrency"]) == concurrency)
    counts = re.findall(r"Request count: (\d+)", output)
    throughput = float(row["Inferences/Second"])
    requests = int(counts[-1]) if counts else 0
    return LoadResult(f"perf_analyzer {protocol}", concurrency, requests, 0,
                      requests / throughput if throughput > 0 else 0.0, throughput,
                      *(float(row[f"p{q} latency"]) / 1e3 for q in (50, 95, 99)))


def server_memory_bytes(server: TritonServer | int) -> int:
    """Resident memory (RSS, from /proc) of the tritonserver process and all its descendants (the python backend's
    stubs, one per model instance). Pages two processes share count twice: a sum for watching growth, not for
    sizing a machine."""
    if isinstance(server, TritonServer):
        if not server.running:
            raise LoadError("the server is not running: start it first (with TritonServer(...) as server:)")
        server = server.process.pid
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:  # it ended meanwhile
                continue
            children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry.name))
    total, todo, page = 0, [server], os.sysconf("SC_PAGE_SIZE")
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except OSError:
            continue
    return total


def _gpt_counts(server: TritonServer) -> tuple[int, int]:
    """(requests, executions) the gpt model has run so far: their ratio is the mean batch Triton formed."""
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/gpt/stats", timeout=10) as response:
        stats = json.loads(response.read())["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


def compare_batching(run: str | Path, concurrencies=(1, 4, 8, 16), out: str | Path | None = None, prompts=PROMPTS,
                     max_tokens: int = 24, duration_s: float = 10.0, max_batch_size: int = 8,
                     max_queue_delay_microseconds: int = 1000, tools=("tritonclient", "perf_analyzer"),
                     protocol: str = "grpc",
                     measurement_interval_ms: int = 3000, progress: bool = True) -> list[dict]:
    """The run served with dynamic batching (``max_batch_size``, ``max_queue_delay_microseconds``: how long a request
    may wait for others) and without (each request executed alone), one
    server after the other, measured by each of ``tools`` at each concurrency: rows of tool, batching, concurrency,
    requests, failures, throughput (requests/s), tokens/s (the load generator's), p50 / p95 / p99 ms and the mean
    batch the gpt model ran (its requests / executions in that measurement). Repositories under ``out``
    (build/deploy/<run>/batching)."""
    from tqdm.auto import tqdm

    from labs_lib.core.checkpoint import resolve_run
    from labs_lib.deploy.repository import MODELS, default_repository, render_repository
    from labs_lib.deploy.words import load_run_tokenizer

    unknown = set(tools) - {"tritonclient", "perf_analyzer"}
    if unknown:
        raise ValueError(f"tools {sorted(unknown)}: use 'tritonclient' and / or 'perf_analyzer'")
    out = Path(out) if out is not None else default_repository(run).parent / "batching"
    tokenizer = load_run_tokenizer(resolve_run(run)[1])
    rows = []
    bar = tqdm(total=2 * len(concurrencies) * len(tools), desc="serving", unit="measurement", disable=not progress)
    for batching in (True, False):
        label = "dynamic" if batching else "off"
        repository = render_repository(run, out / label, max_batch_size=max_batch_size, decoupled=False,
                                       max_queue_delay_microseconds=max_queue_delay_microseconds,
                                       dynamic_batching=batching)
        with TritonServer(repository, list(MODELS)) as server:
            for concurrency in concurrencies:
                for tool in tools:
                    bar.set_postfix_str(f"{tool}, batching {label}, concurrency {concurrency}")
                    before = _gpt_counts(server)
                    if tool == "tritonclient":
                        result = run_load(_url_of(server, protocol), prompts, concurrency, max_tokens,
                                          duration_s=duration_s, protocol=protocol, tokenizer=tokenizer)
                    else:
                        try:
                            result = run_perf_analyzer(server, MODEL, concurrency, prompts, max_tokens, protocol,
                                                       measurement_interval_ms)
                        except LoadError as e:  # e.g. never stable on a busy machine: a row saying so
                            result = LoadResult(f"perf_analyzer {protocol}", concurrency, 0, 0, 0.0, math.nan,
                                                math.nan, math.nan, math.nan, errors=[str(e).splitlines()[-1]])
                    (r0, e0), (r1, e1) = before, _gpt_counts(server)
                    row = result.row()
                    rows.append({"tool": row.pop("tool"), "batching": label, **row,
                                 "mean batch": (r1 - r0) / (e1 - e0) if e1 > e0 else math.nan})
                    bar.update()
    bar.close()
    return rows

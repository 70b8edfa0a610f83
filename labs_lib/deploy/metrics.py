"""The server's metrics: Triton's Prometheus text (``:8002/metrics``) as Python values.

    metrics = read_metrics(server.metrics_url)      # {name: [(labels, value), ...]}
    metric(server.metrics_url, "nv_inference_request_success", model="gpt")      # one number: 16.0
    metric(server.metrics_url, "gpt_worker_weight_bytes", rank="1")              # a gauge the gpt model exposes

Counters (``nv_inference_request_success``, ``nv_inference_count``, ``nv_inference_exec_count``, ...) count since
the server started: read them before and after what you measure. ``nv_inference_count / nv_inference_exec_count``
of a model is its average batch size, how much dynamic batching merged. :func:`metric` sums the samples whose
labels match the ones given (a model's counter over its versions, a gauge over the ranks); a name the server does
not expose, or labels no sample has, raise KeyError naming what is there.
"""

from __future__ import annotations

import difflib
import math
import re
import time
import urllib.error
import urllib.request

__all__ = ["parse_metrics", "read_metrics", "samples", "metric"]

STARTING_S = 3.0
Samples = list[tuple[dict[str, str], float]]

# name{label="value",...} value [timestamp]; label values escape \\, \" and \n
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)(?:\s+-?\d+)?$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def _labels(text: str, line: str) -> dict[str, str]:
    labels, pos = {}, 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        if not m:
            raise ValueError(f"not a Prometheus sample (its labels): {line!r}")
        labels[m.group(1)] = re.sub(r"\\[\\\"n]", lambda e: _UNESCAPE[e.group(0)], m.group(2))
        pos = m.end()
    return labels


def _value(text: str) -> float:
    return {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}.get(text) or float(text)


def parse_metrics(text: str) -> dict[str, Samples]:
    """Prometheus text exposition format → ``{metric name: [(labels, value), ...]}`` in the server's order
    (comment lines, ``# HELP`` and ``# TYPE``, are left out)."""
    metrics: dict[str, Samples] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            raise ValueError(f"not a Prometheus sample: {line!r}")
        metrics.setdefault(m.group("name"), []).append((_labels(m.group("labels") or "", line),
                                                        _value(m.group("value"))))
    return metrics


def read_metrics(metrics_url: str, timeout: float = 10.0) -> dict[str, Samples]:
    """The server's metrics now: ``{name: [(labels, value), ...]}`` (``metrics_url``: http://host:port/metrics;
    a bare host:port gets /metrics). tritonserver opens its metrics port a moment after it reports ready: a
    refused connection is tried again for up to ``STARTING_S`` seconds."""
    url = metrics_url if metrics_url.startswith(("http://", "https://")) else f"http://{metrics_url}"
    if not url.rstrip("/").endswith("/metrics"):
        url = url.rstrip("/") + "/metrics"
    deadline = time.monotonic() + STARTING_S
    while True:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return parse_metrics(response.read().decode())
        except urllib.error.URLError as e:
            if not isinstance(e.reason, ConnectionRefusedError) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def samples(metrics: dict[str, Samples] | str, name: str, **labels) -> Samples:
    """The samples of ``name`` whose labels include ``labels`` (values compared as text: ``rank=0`` is "0").
    ``metrics``: what :func:`read_metrics` returned, or the metrics URL to read them from."""
    if isinstance(metrics, str):
        metrics = read_metrics(metrics)
    if name not in metrics:
        near = difflib.get_close_matches(name, metrics, n=3, cutoff=0.5)
        raise KeyError(f"the server exposes no metric {name!r}" + (f"; did you mean {', '.join(near)}?" if near else
                                                                  f" (it has {len(metrics)} others)"))
    wanted = {k: str(v) for k, v in labels.items()}
    found = [(lab, v) for lab, v in metrics[name] if all(lab.get(k) == v for k, v in wanted.items())]
    if not found:
        have = sorted({tuple(sorted(lab.items())) for lab, _ in metrics[name]})
        raise KeyError(f"no sample of {name} has the labels {wanted}; its samples have "
                       + "; ".join(", ".join(f'{k}="{v}"' for k, v in h) or "(no labels)" for h in have[:8]))
    return found


def metric(metrics_url: str | dict[str, Samples], name: str, **labels) -> float:
    """The value of ``name`` summed over the samples whose labels include ``labels`` (one sample when the labels
    pick one out): ``metric(url, "nv_inference_exec_count", model="gpt")``."""
    return sum(v for _, v in samples(metrics_url, name, **labels))

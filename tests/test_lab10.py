"""Lab 10's helpers against a real tritonserver: the metrics reader (labs_lib.deploy.metrics), the config readers,
and the three exercise checks (labs_lib.labs.lab10): right answers pass, wrong ones fail naming the mistake.
One server for the module, rendered with decoupled=False (the exercises use the plain infer API)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tritonclient.http as httpclient

from labs_lib.deploy import client
from labs_lib.deploy.metrics import metric, parse_metrics, read_metrics, samples
from labs_lib.deploy.repository import MODELS, render_repository
from labs_lib.deploy.server import TritonServer
from labs_lib.labs import lab10

SUCCESS, EXECUTIONS = "nv_inference_request_success", "nv_inference_exec_count"


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    repository = render_repository(trained_run, tmp_path_factory.mktemp("lab10") / "repository", decoupled=False,
                                   max_queue_delay_microseconds=20_000)
    with TritonServer(repository, list(MODELS)) as s:
        yield s


# ---------------------------------------------------------------------------------------------------- metrics

PROMETHEUS = """# HELP nv_inference_count Number of inferences performed
# TYPE nv_inference_count counter
nv_inference_count{model="gpt",version="1"} 12
nv_inference_count{model="ensemble",version="1"} 4
nv_inference_count{model="gpt",version="2"} 3 1700000000000
odd_label{path="C:\\\\x",quote="say \\"hi\\"",line="a\\nb"} -2.5e3
nv_cpu_utilization 0.25
bucket{le="+Inf"} +Inf
not_a_number NaN
"""


def test_parse_metrics_reads_labels_escapes_and_special_values():
    m = parse_metrics(PROMETHEUS)
    assert m["nv_inference_count"][0] == ({"model": "gpt", "version": "1"}, 12.0)
    assert m["nv_inference_count"][2] == ({"model": "gpt", "version": "2"}, 3.0)  # the timestamp is not the value
    assert m["odd_label"] == [({"path": "C:\\x", "quote": 'say "hi"', "line": "a\nb"}, -2500.0)]
    assert m["nv_cpu_utilization"] == [({}, 0.25)] and m["bucket"][0][1] == math.inf
    assert math.isnan(m["not_a_number"][0][1])
    assert metric(m, "nv_inference_count", model="gpt") == 15  # summed over the versions
    assert metric(m, "nv_inference_count", model="gpt", version=1) == 12  # values compared as text
    with pytest.raises(KeyError, match="did you mean nv_inference_count"):
        metric(m, "nv_inference_cnt")
    with pytest.raises(KeyError, match='no sample of nv_inference_count has .*model="ensemble"'):
        metric(m, "nv_inference_count", model="gtp")
    with pytest.raises(ValueError, match="not a Prometheus sample"):
        parse_metrics("nv_inference_count{model=gpt} 1")


@pytest.mark.slow
def test_metrics_of_the_real_server_count_requests(server):
    before = metric(server.metrics_url, SUCCESS, model="gpt")
    client.generate(server.http_url, "def ", 8)
    m = read_metrics(server.metrics_url)
    assert metric(m, SUCCESS, model="gpt") == before + 1
    assert metric(m, SUCCESS, model="ensemble") >= 1 and metric(m, "nv_inference_count", model="gpt") >= 1
    assert {lab["model"] for lab, _ in samples(m, EXECUTIONS)} == set(MODELS)
    assert metric(m, "gpt_worker_weight_bytes", model="gpt", rank=0) > 0  # the gpt model's own gauge
    bare = server.metrics_url.removeprefix("http://").removesuffix("/metrics")
    assert set(read_metrics(bare)) == set(m)  # host:port is enough
    rows = lab10.counter_rows(server.metrics_url)
    assert [r["model"] for r in rows] == list(MODELS) and all(r["failures"] == 0 for r in rows)


@pytest.mark.slow
def test_config_rows_read_what_was_rendered(server):
    gpt = lab10.read_config(server.repository / "gpt")
    assert gpt.max_batch_size == 8 and gpt.HasField("dynamic_batching")
    assert not gpt.model_transaction_policy.decoupled and gpt.parameters["tensor_parallel_size"].string_value == "1"
    rows = {r["model"]: r for r in lab10.config_rows(server.repository)}
    assert list(rows) == list(MODELS)
    assert rows["gpt"]["dynamic batching"].startswith("preferred 8") and "tp 1" in rows["gpt"]["serves"]
    assert rows["ensemble"]["serves"] == "steps preprocessing -> gpt -> postprocessing"
    assert rows["ensemble"]["dynamic batching"] == "off"


def test_profile_and_benchmark_settings():
    assert lab10.lab_profile("ci").model.block_size == 128 and lab10.lab_profile("ci").train.max_steps == 120
    assert lab10.benchmark_settings("ci")["tools"] == ("tritonclient",)
    assert "perf_analyzer" in lab10.benchmark_settings("cpu")["tools"]


# ---------------------------------------------------------------------------------------------------- exercise 1

def tensor(name, array, datatype):
    t = httpclient.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def make_inputs(prompt, max_tokens):
    return [tensor("text_input", np.array([[prompt.encode()]], dtype=object), "BYTES"),
            tensor("max_tokens", np.array([[max_tokens]], np.int32), "INT32")]


@pytest.mark.slow
def test_request_check(server):
    assert lab10.check_request(make_inputs, server)
    assert lab10.check_request(None, server) is False
    assert lab10.check_request(lambda prompt, max_tokens: ..., server) is False
    wrong = {
        "no input named 'max_tokens'": lambda p, n: make_inputs(p, n)[:1],
        "INT32 of shape \\[1, 1\\]": lambda p, n: [make_inputs(p, n)[0],
                                                  tensor("max_tokens", np.array([[n]], np.int64), "INT64")],
        "BYTES of shape \\[1, 1\\]": lambda p, n: [tensor("text_input", np.array([p.encode()], dtype=object),
                                                         "BYTES"), make_inputs(p, n)[1]],
        "does text_input hold the prompt": lambda p, n: make_inputs(p + "x", n),
        "InferInput": lambda p, n: {"text_input": p, "max_tokens": n},
    }
    for message, fn in wrong.items():
        with pytest.raises(AssertionError, match=message):
            lab10.check_request(fn, server)


# ---------------------------------------------------------------------------------------------------- exercise 2

def gpt_counts(server, model="gpt"):
    return {"requests": metric(server.metrics_url, SUCCESS, model=model),
            "executions": metric(server.metrics_url, EXECUTIONS, model=model)}


def send_batch_to(server, model="gpt", at_once=True, cumulative=False):
    def send_batch(prompts, max_tokens):
        before = gpt_counts(server, model)
        http = httpclient.InferenceServerClient(server.http_url, concurrency=len(prompts))
        try:
            if at_once:
                pending = [http.async_infer("ensemble", make_inputs(p, max_tokens)) for p in prompts]
                results = [r.get_result() for r in pending]
            else:
                results = [http.infer("ensemble", make_inputs(p, max_tokens)) for p in prompts]
        finally:
            http.close()
        after = gpt_counts(server, model)
        texts = [r.as_numpy("text_output")[0, 0].decode() for r in results]
        return {"texts": texts, **{k: after[k] - (0 if cumulative else before[k]) for k in after}}
    return send_batch


@pytest.mark.slow
def test_batch_metrics_check(server):
    assert lab10.check_batch_metrics(send_batch_to(server), server)
    assert lab10.check_batch_metrics(lambda prompts, max_tokens: ..., server) is False
    with pytest.raises(AssertionError, match="ran each of the 8 requests alone"):
        lab10.check_batch_metrics(send_batch_to(server, at_once=False), server)
    with pytest.raises(AssertionError, match="since the server started"):
        lab10.check_batch_metrics(send_batch_to(server, cumulative=True), server)
    with pytest.raises(AssertionError, match="the ensemble's count"):
        lab10.check_batch_metrics(send_batch_to(server, model="ensemble"), server)

    def reversed_texts(prompts, max_tokens):
        result = send_batch_to(server)(prompts, max_tokens)
        return dict(result, texts=result["texts"][::-1])

    with pytest.raises(AssertionError, match="in their order"):
        lab10.check_batch_metrics(reversed_texts, server)
    with pytest.raises(AssertionError, match="keys texts, requests and executions"):
        lab10.check_batch_metrics(lambda prompts, max_tokens: [1, 2], server)


# ---------------------------------------------------------------------------------------------------- exercise 3

START = """
name: "gpt_batched"
backend: "python"
max_batch_size: 1
instance_group [ { count: 1, kind: KIND_CPU } ]
"""
RIGHT = START.replace("max_batch_size: 1",
                      "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 20000 }")


@pytest.mark.slow
def test_batching_config_check(server):
    assert lab10.check_batching_config(START, server) is False  # the starting text: not answered yet
    assert lab10.check_batching_config(None, server) is False
    wrong = {
        "Triton cannot read it: 5:": RIGHT.replace("{ max_queue", "{{ max_queue"),
        "without a dynamic_batching block": START.replace("max_batch_size: 1", "max_batch_size: 8"),
        "leaves no room for a second request": START + "dynamic_batching { }",
        "preferred batch sizes \\[16\\]": RIGHT.replace("{ max_queue", "{ preferred_batch_size: [16] max_queue"),
        "its folder's, 'gpt_batched'": RIGHT.replace('name: "gpt_batched"', 'name: "gpt"'),
        "at most 100 ms": RIGHT.replace("2000", "5000000"),
        "leave decoupled out": RIGHT + "model_transaction_policy { decoupled: true }",
    }
    for message, text in wrong.items():
        with pytest.raises(AssertionError, match=message):
            lab10.check_batching_config(text, server)
    assert lab10.check_batching_config(RIGHT, server)  # loaded into the server, 8 requests in fewer executions
    assert {r["name"]: r["state"] for r in server.ready_table()}.get(lab10.EXERCISE_MODEL) != "READY"  # unloaded
    refused = RIGHT.replace("{ max_queue", "{ priority_levels: 2 default_priority_level: 5 max_queue")
    with pytest.raises(AssertionError, match="Triton would not load it: .*default priority level must be in range"):
        lab10.check_batching_config(refused, server)
    assert server.is_ready()

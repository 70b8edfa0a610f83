"""Lab 10, deploying the trained GPT with a real Triton Inference Server: the lab's run, readers, exercise checks.

    run = train_base(out)                                   # the lab's GPT through the one launcher (Slurm when up)
    repo = render_repository(run, out / "repository", decoupled=False,     # (labs_lib.deploy.repository)
                            max_queue_delay_microseconds=20_000)        # 20 ms: concurrent requests meet
    config = read_config(repo / "gpt")                      # config.pbtxt as Triton's ModelConfig protobuf
    print(format_table(config_rows(repo)))                  # the fields that matter, one row per model
    server = start_server(repo)                             # tritonserver, stopped at exit if the notebook fails
    print(format_table(counter_rows(server.metrics_url)))   # requests / inferences / executions per model
    check_request(make_inputs, server)                      # exercise 1: a tritonclient request, TensorRT-LLM names
    check_batch_metrics(send_batch, server)                 # exercise 2: a batch sent at once, read in the metrics
    check_batching_config(text, server)                     # exercise 3: a config.pbtxt with dynamic batching, loaded
    compare_batching(run, **benchmark_settings(profile))    # (labs_lib.deploy.load) seconds per point under ci

Serving is labs_lib.deploy's (server, repository, client, metrics, load); the expected values of the checks are
computed here, out of the notebook's sight.
"""

from __future__ import annotations

import atexit
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

from labs_lib.core.config import Profile, get_profile, override
from labs_lib.deploy import client as deploy_client
from labs_lib.deploy.metrics import metric, read_metrics
from labs_lib.deploy.repository import MODELS, parse_config, read_config
from labs_lib.deploy.server import ServerError, TritonServer, first_error_line
from labs_lib.labs.checks import check

__all__ = ["MODEL", "STEPS", "MAX_TOKENS", "COUNTERS", "BENCHMARK", "EXERCISE_MODEL", "benchmark_settings",
           "lab_profile", "train_base", "read_config", "parse_config",
           "config_rows", "start_server", "counter_rows", "check_request", "check_batch_metrics",
           "check_batching_config"]

# The lab's GPT per profile: lab 01's, with a context that holds a prompt and the served tokens.
MODEL = {"ci": dict(block_size=128), "cpu": dict(block_size=256), "gpu": {}}
STEPS = {"ci": 120, "cpu": 400, "gpu": None}
MAX_TOKENS = 24  # new tokens per served request in the lab
# The per-model counters of Triton's metrics endpoint, by a short name.
COUNTERS = {"requests": "nv_inference_request_success", "failures": "nv_inference_request_failure",
            "inferences": "nv_inference_count", "executions": "nv_inference_exec_count"}
EXERCISE_MODEL = "gpt_batched"  # exercise 3's model, loaded beside gpt
_PROMPTS = ("def ", "import os\n", "class Point:\n    def ", "for i in range(", "return self.", "# Copyright",
            "if __name__ == ", "while True:\n    ")


# The batching benchmark per profile: seconds per point under ci (the load generator only), perf_analyzer beside it
# on the others.
BENCHMARK = {"ci": dict(concurrencies=(1, 4, 8), duration_s=2.0, tools=("tritonclient",)),
             "cpu": dict(concurrencies=(1, 4, 8, 16), duration_s=10.0, tools=("tritonclient", "perf_analyzer")),
             "gpu": dict(concurrencies=(1, 4, 8, 16), duration_s=10.0, tools=("tritonclient", "perf_analyzer"))}


def benchmark_settings(profile: str | None = None) -> dict:
    """compare_batching's settings for the profile (labs_lib.deploy.load): concurrencies, seconds, tools."""
    return dict(BENCHMARK[get_profile(profile).name], max_tokens=MAX_TOKENS)


def lab_profile(profile: str | None = None) -> Profile:
    """The run profile with the lab's GPT and training steps in place of the profile's own."""
    base = get_profile(profile)
    steps = STEPS[base.name] or base.train.max_steps
    return replace(base, model=override(base.model, **MODEL[base.name]), train=override(base.train, max_steps=steps))


def train_base(out: str | Path, profile: str | None = None, progress: bool = True) -> Path:
    """Train the lab's GPT (one rank) through the one launcher; returns the run folder, its checkpoint last."""
    from labs_lib.jobs.launch import train_gpt

    name = get_profile(profile).name
    steps = STEPS[name] or get_profile(profile).train.max_steps
    train_gpt(out, nodes=1, nproc_per_node=1, profile=profile, progress=progress, max_steps=steps,
              checkpoint_interval=steps, eval_interval=max(1, steps // 2), **MODEL[name])
    return Path(out)


# ------------------------------------------------------------------------------------------------ readers

def _batching(config) -> str:
    if not config.HasField("dynamic_batching"):
        return "off"
    d = config.dynamic_batching
    preferred = ", ".join(str(s) for s in d.preferred_batch_size) or "any"
    return f"preferred {preferred}, wait {d.max_queue_delay_microseconds} us"


def config_rows(repository: str | Path, models=MODELS) -> list[dict]:
    """One row per model of the repository: what runs it, max_batch_size, dynamic batching, decoupled, instances,
    and the parameters that say what it serves (checkpoint, tensor_parallel_size, tokenizer)."""
    rows = []
    for model in models:
        config = read_config(Path(repository) / model)
        params = {k: v.string_value for k, v in config.parameters.items()}
        serves = {"checkpoint": Path(params["checkpoint_dir"]).name} if params.get("checkpoint_dir") else {}
        if "tensor_parallel_size" in params:
            serves["tp"] = params["tensor_parallel_size"]
        if params.get("tokenizer_dir"):
            serves["tokenizer"] = Path(params["tokenizer_dir"]).name
        if params.get("gpt_model_path"):
            serves["engine"] = f"{Path(params['gpt_model_path']).name} ({params['gpt_model_type']})"
        if config.platform == "ensemble":
            serves["steps"] = " -> ".join(s.model_name for s in config.ensemble_scheduling.step)
        rows.append({"model": model, "runs on": config.backend or config.platform,
                     "max_batch_size": config.max_batch_size, "dynamic batching": _batching(config),
                     "decoupled": config.model_transaction_policy.decoupled,
                     "instances": sum(g.count for g in config.instance_group) or "-",
                     "serves": ", ".join(f"{k} {v}" for k, v in serves.items())})
    return rows


def start_server(repository: str | Path, models=MODELS, **settings) -> TritonServer:
    """tritonserver on ``repository`` with ``models`` loaded, ready; stopped when the Python process exits too (a
    notebook cell that fails, a kernel shut down), not only by ``server.stop()``."""
    server = TritonServer(repository, list(models), **settings)
    start = time.perf_counter()
    server.start()
    atexit.register(server.stop)
    print(f"tritonserver ({server.install.source}) ready in {time.perf_counter() - start:.1f} s, "
          f"log {server.log_path}")
    return server


def counter_rows(metrics_url: str, models=MODELS) -> list[dict]:
    """The counters of each model since the server started: successful and failed requests, inferences (batch
    elements) and executions (batches run)."""
    metrics = read_metrics(metrics_url)
    return [{"model": m, **{short: int(metric(metrics, name, model=m)) for short, name in COUNTERS.items()}}
            for m in models]


def _counts(metrics_url: str, model: str) -> dict[str, int]:
    row = counter_rows(metrics_url, [model])[0]
    return {short: row[short] for short in ("requests", "executions")}



def _unanswered(value) -> bool:
    return value is None or value is Ellipsis


# ------------------------------------------------------------------------------------------------ exercises

def check_request(fn, server: TritonServer, max_tokens: int = 12) -> bool:
    """Exercise 1: ``fn(prompt, max_tokens)`` returns the ``tritonclient.http.InferInput`` list of one request to
    the ensemble in TensorRT-LLM's names; sent to the server, it must give what the generate endpoint gives."""
    name = "a tritonclient request"
    if _unanswered(fn):
        return check(name, None, None, hint="write make_inputs(prompt, max_tokens).")
    import tritonclient.http as httpclient

    wanted = {"text_input": ("BYTES", [1, 1]), "max_tokens": ("INT32", [1, 1])}
    for prompt in _PROMPTS[:2]:
        inputs = fn(prompt, max_tokens)
        if _unanswered(inputs):
            return check(name, None, None, hint="make_inputs still returns ...: build the inputs.")
        inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        if not all(isinstance(i, httpclient.InferInput) for i in inputs):
            raise AssertionError(f"❌ {name}: return a list of tritonclient.http.InferInput, one per input tensor")
        given = {i.name(): i for i in inputs}
        for tensor, (datatype, shape) in wanted.items():
            if tensor not in given:
                raise AssertionError(f"❌ {name}: no input named {tensor!r}, which the ensemble requires (its inputs "
                                     "are TensorRT-LLM's: see the ensemble's config.pbtxt above)")
            if given[tensor].datatype() != datatype or list(given[tensor].shape()) != shape:
                raise AssertionError(f"❌ {name}: {tensor} is {given[tensor].datatype()} of shape "
                                     f"{given[tensor].shape()}; the ensemble takes {datatype} of shape {shape}: "
                                     "the batch dimension (one request) before the config's dims")
        http = httpclient.InferenceServerClient(server.http_url)
        try:
            result = http.infer(deploy_client.MODEL, inputs)
        except Exception as e:  # noqa: BLE001  (the server's or the client's words, whatever went wrong)
            message = e.message() if hasattr(e, "message") else str(e)
            raise AssertionError(f"❌ {name}: the request failed: {message}") from None
        finally:
            http.close()
        text = result.as_numpy("text_output").reshape(-1)[0].decode()
        if text != deploy_client.generate(server.http_url, prompt, max_tokens):
            raise AssertionError(f"❌ {name}: for the prompt {prompt!r} the ensemble answered something else than "
                                 "the same request sent to the generate endpoint: does text_input hold the prompt "
                                 "(as UTF-8 bytes) and max_tokens the number asked for?")
    print(f"✅ {name}: text_input and max_tokens reach the ensemble, and it answers as the generate endpoint does")
    return True


def check_batch_metrics(fn, server: TritonServer, batch: int = 8, max_tokens: int = 16) -> bool:
    """Exercise 2: ``fn(prompts, max_tokens)`` sends every prompt at once and returns ``{"texts": [...],
    "requests": n, "executions": e}``: the answers in the prompts' order, and the gpt model's successful requests
    and executions during the batch, read from the metrics endpoint. The server must have batched them."""
    name = "a batch, read in the metrics"
    if _unanswered(fn):
        return check(name, None, None, hint="write send_batch(prompts, max_tokens).")
    prompts = [_PROMPTS[i % len(_PROMPTS)] for i in range(batch)]
    before = {m: _counts(server.metrics_url, m) for m in ("gpt", "ensemble")}
    result = fn(prompts, max_tokens)
    after = {m: _counts(server.metrics_url, m) for m in ("gpt", "ensemble")}
    if _unanswered(result):
        return check(name, None, None, hint="send_batch still returns ...: send the prompts, read the counters.")
    if not isinstance(result, dict) or not {"texts", "requests", "executions"} <= set(result):
        raise AssertionError(f"❌ {name}: return a dict with the keys texts, requests and executions")
    delta = {m: {k: after[m][k] - before[m][k] for k in after[m]} for m in after}
    for key, counter in (("requests", COUNTERS["requests"]), ("executions", COUNTERS["executions"])):
        got, want = result[key], delta["gpt"][key]
        if got == want:
            continue
        if got == after["gpt"][key]:
            hint = ("that is the count since the server started: read the counter before the batch too and "
                    "subtract")
        elif got == delta["ensemble"][key]:
            hint = "that is the ensemble's count: read the gpt model's (model=\"gpt\"), the model that batches"
        else:
            hint = f"read {counter} of the gpt model before and after the batch, once every answer is back"
        raise AssertionError(f"❌ {name}: {key} = {got!r} is not what the server counted during your batch: {hint}")
    requests, executions = delta["gpt"]["requests"], delta["gpt"]["executions"]
    if requests != batch:
        raise AssertionError(f"❌ {name}: the gpt model answered {requests} requests while your batch ran, not "
                             f"{batch}: send every prompt once and wait for all the answers")
    if executions >= requests:
        raise AssertionError(f"❌ {name}: the gpt model ran each of the {requests} requests alone: send all the "
                             "prompts before waiting for any answer (async_infer, then get_result), so that they "
                             "wait in the queue together")
    texts = [t.decode() if isinstance(t, bytes) else t for t in result["texts"]]
    expected = [deploy_client.generate(server.http_url, p, max_tokens) for p in prompts]
    if texts != expected:
        raise AssertionError(f"❌ {name}: the texts are not the server's answers to the prompts, in their order "
                             "(one text per prompt, decoded from text_output)")
    print(f"✅ {name}: {requests} requests ran in {executions} executions of gpt, {requests / executions:.1f} "
          "requests per batch")
    return True


def _exercise_config(text: str):
    """The learner's config, parsed and checked field by field; None while it is the unanswered start."""
    from google.protobuf import text_format

    name = "config.pbtxt with dynamic batching"
    try:
        mine = parse_config(text)
    except text_format.ParseError as e:
        raise AssertionError(f"❌ {name}: Triton cannot read it: {e}") from None
    if not mine.HasField("dynamic_batching") and mine.max_batch_size <= 1:
        return None
    if mine.name and mine.name != EXERCISE_MODEL:
        raise AssertionError(f"❌ {name}: name {mine.name!r}: a model's name is its folder's, {EXERCISE_MODEL!r}")
    if mine.max_batch_size < 2:
        raise AssertionError(f"❌ {name}: max_batch_size {mine.max_batch_size} leaves no room for a second request "
                             "in a batch (0 even means the model takes no batch dimension)")
    if not mine.HasField("dynamic_batching"):
        raise AssertionError(f"❌ {name}: without a dynamic_batching block Triton executes each request as it "
                             "comes, never several together")
    sizes = list(mine.dynamic_batching.preferred_batch_size)
    if any(not 1 <= s <= mine.max_batch_size for s in sizes):
        raise AssertionError(f"❌ {name}: preferred batch sizes {sizes} must lie between 1 and max_batch_size "
                             f"({mine.max_batch_size})")
    if mine.dynamic_batching.max_queue_delay_microseconds > 100_000:
        raise AssertionError(f"❌ {name}: a request alone would wait up to "
                             f"{mine.dynamic_batching.max_queue_delay_microseconds / 1e3:.0f} ms for company: "
                             "keep the queue delay at most 100 ms")
    if mine.model_transaction_policy.decoupled:
        raise AssertionError(f"❌ {name}: the check sends whole answers (the plain infer API), which Triton refuses "
                             "for a decoupled model: leave decoupled out")
    return mine


def check_batching_config(text: str, server: TritonServer, batch: int = 8, max_tokens: int = 16) -> bool:
    """Exercise 3: ``text`` is a config.pbtxt for ``gpt_batched`` (the gpt engine once more) that turns on dynamic
    batching. It is parsed with Triton's schema, completed with gpt's inputs, outputs and parameters, loaded into
    the running server, and ``batch`` concurrent requests must run in fewer executions."""
    name = "config.pbtxt with dynamic batching"
    if _unanswered(text):
        return check(name, None, None, hint="write my_config.")
    mine = _exercise_config(text)
    if mine is None:
        return check(name, None, None, hint="it is still the starting text: give gpt_batched dynamic batching.")
    repo = Path(server.repository)
    config = read_config(repo / "gpt")
    config.name, config.max_batch_size = EXERCISE_MODEL, mine.max_batch_size
    config.dynamic_batching.CopyFrom(mine.dynamic_batching)
    config.model_transaction_policy.decoupled = False
    if mine.instance_group:
        del config.instance_group[:]
        config.instance_group.extend(mine.instance_group)
    _write_model(repo, config)
    try:
        logged = len(server.log_text())
        try:
            server.load(EXERCISE_MODEL)
        except ServerError as e:  # the log says why; the HTTP answer often only "failed to poll"
            reason = first_error_line(server.log_text()[logged:]) or str(e).splitlines()[0]
            raise AssertionError(f"❌ {name}: Triton would not load it: {reason}") from None
        before = _counts(server.metrics_url, EXERCISE_MODEL)
        _send_ids(server, EXERCISE_MODEL, batch, max_tokens)
        after = _counts(server.metrics_url, EXERCISE_MODEL)
    finally:  # gone again, loaded or not: the server is ready only while every model it knows is
        server.unload(EXERCISE_MODEL)
        server.wait_model_state(EXERCISE_MODEL, "UNAVAILABLE", timeout=60)
    requests, executions = (after[k] - before[k] for k in ("requests", "executions"))
    if executions >= requests:
        raise AssertionError(f"❌ {name}: Triton loaded it, but ran {requests} concurrent requests in {executions} "
                             "executions: let the batcher form batches larger than one (preferred sizes, delay)")
    print(f"✅ {name}: Triton loaded {EXERCISE_MODEL}; {requests} concurrent requests ran in {executions} "
          "executions")
    return True


def _write_model(repo: Path, config) -> None:
    """repo/<config.name>: gpt's model code and ``config`` as its config.pbtxt."""
    from google.protobuf import text_format

    target = repo / config.name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(repo / "gpt" / "1", target / "1", ignore=shutil.ignore_patterns("__pycache__", "onnx"))
    (target / "config.pbtxt").write_text(text_format.MessageToString(config))


def _send_ids(server: TritonServer, model: str, batch: int, max_tokens: int) -> None:
    """``batch`` requests straight to a gpt-like model (token ids in), all in flight together; raise on a failure."""
    import numpy as np
    import tritonclient.http as httpclient

    from labs_lib.deploy.words import encode_text, load_run_tokenizer

    params = read_config(Path(server.repository) / "preprocessing").parameters
    tokenizer = load_run_tokenizer(params["tokenizer_dir"].string_value)
    errors: list[str] = []

    def ask(prompt: str) -> None:
        ids = np.array([encode_text(tokenizer, prompt)], np.int32)
        tensors = [("input_ids", ids), ("input_lengths", np.array([[ids.shape[1]]], np.int32)),
                   ("request_output_len", np.array([[max_tokens]], np.int32))]
        inputs = []
        for tensor, array in tensors:
            inputs.append(httpclient.InferInput(tensor, list(array.shape), "INT32"))
            inputs[-1].set_data_from_numpy(array)
        http = httpclient.InferenceServerClient(server.http_url)
        try:
            http.infer(model, inputs)
        except Exception as e:  # noqa: BLE001  (reported below, with the others)
            errors.append(e.message() if hasattr(e, "message") else str(e))
        finally:
            http.close()

    threads = [threading.Thread(target=ask, args=(_PROMPTS[i % len(_PROMPTS)],)) for i in range(batch)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise AssertionError(f"❌ config.pbtxt with dynamic batching: Triton loaded it, but a request failed: "
                             f"{errors[0]}")


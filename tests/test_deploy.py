"""Lab 10's deployment against the real tritonserver: train → checkpoint → repository → server → client.

Greedy text from the server, over the generate endpoint, tritonclient HTTP and gRPC, equals local generation of
the same run with the same settings; streaming yields that text token by token; bad requests get an error
response and the server answers the next one; ports are bound to 127.0.0.1 only; unload / load; the CLI.
Three servers per module: the default (decoupled: it streams), one rendered with decoupled=False (the plain infer
APIs, which Triton refuses for decoupled models), and the ONNX Runtime engine.
"""

from __future__ import annotations

import ipaddress
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from labs_lib.deploy import client
from labs_lib.deploy.engine import GptEngine
from labs_lib.deploy.repository import MODELS, render_repository
from labs_lib.deploy.server import (
    ServerError,
    TritonServer,
    find_perf_analyzer,
    find_server,
    first_error_line,
    format_ready_table,
)
from labs_lib.deploy.words import from_word_list, load_run_tokenizer, to_word_list
from labs_lib.inference.export import OnnxGenerator
from labs_lib.inference.generate import Decoding, generate_ids, generate_text, load_trained

pytestmark = pytest.mark.slow
PROMPTS = ["def ", "import os\n", "class Point:\n    def "]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def local(trained_run):
    """Local greedy generation of each prompt: text and new token ids (without the end of text)."""
    model, tokenizer, _ = load_trained(trained_run)
    d = Decoding(max_new_tokens=MAX_TOKENS, temperature=0, eos_token_id=tokenizer.token_to_id("<|endoftext|>"))
    texts = {p: generate_text(model, tokenizer, p, d)[0] for p in PROMPTS}
    ids = {p: [t for t in generate_ids(model, [tokenizer.encode(p).ids], d)[0] if t != d.eos_token_id]
           for p in PROMPTS}
    return texts, ids


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    repository = render_repository(trained_run, tmp_path_factory.mktemp("deploy") / "repository")
    with TritonServer(repository, list(MODELS)) as s:
        yield s


@pytest.fixture(scope="module")
def plain_server(trained_run, tmp_path_factory):
    repository = render_repository(trained_run, tmp_path_factory.mktemp("deploy_plain") / "repository",
                                   decoupled=False)
    with TritonServer(repository, list(MODELS)) as s:
        yield s


def _address(hex_address: str):
    """/proc/net's address: 32-bit words in host (little-endian) order, 1 word for IPv4, 4 for IPv6."""
    raw = bytes.fromhex(hex_address)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw)


def listening(port: int) -> list:
    """The local addresses of the sockets listening on ``port`` (IPv4 and IPv6), from /proc/net."""
    found = []
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        if not table.exists():  # a kernel without IPv6
            continue
        for line in table.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                found.append(_address(address))
    return found


def loopback(address) -> bool:
    """127.0.0.0/8, ::1, or 127.x mapped into IPv6 (gRPC listens on a dual-stack socket bound to ::ffff:127.0.0.1)."""
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


# ---------------------------------------------------------------------------------------------------- no server

def test_find_server_prefers_path_then_the_variable(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "tritonserver"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    assert find_server().source == "PATH" and find_server().binary == fake
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("TRITONSERVER", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="TRITONSERVER=.*missing.*unset it"):
        find_server()
    monkeypatch.delenv("TRITONSERVER")
    install = find_server()  # the wheel's, laid out once under the build folder
    assert install.source.startswith("nvidia-pytriton") and install.binary.exists()
    assert (install.backend_dir / "python" / "triton_python_backend_stub").exists()


def test_perf_analyzer_runs():
    binary, env = find_perf_analyzer()
    result = subprocess.run([str(binary), "--version"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "Perf Analyzer Version" in result.stdout + result.stderr, result.stderr


def test_first_error_line_skips_what_every_cpu_machine_logs():
    log = ('E1202 14:42:36.675881 1 server.cc:241] "CudaDriverHelper has not been initialized."\n'
           "Error: Failed to initialize NVML\n"
           'E1202 14:42:40.9 1 model_lifecycle.cc:654] "failed to load \'gpt\': checkpoint missing"\n')
    assert "failed to load 'gpt'" in first_error_line(log)
    assert first_error_line("I1202 all good\n") is None


def test_word_lists_round_trip(trained_run):
    tokenizer = load_run_tokenizer(trained_run)
    words = to_word_list(tokenizer, ["\n\n", "", "return"])
    assert words.shape[0] == 2 and words.dtype == np.int32
    assert from_word_list(words) == [tuple(tokenizer.encode(w).ids) for w in ("\n\n", "return")]
    assert from_word_list(to_word_list(tokenizer, [])) == [] and from_word_list(None) == []


def test_engine_refuses_bad_requests_naming_the_fix(trained_run):
    engine = GptEngine(trained_run)
    good = {"input_ids": np.array([[5, 6]], np.int32), "request_output_len": np.array([[4]], np.int32)}
    assert engine.parse(good).decoding.temperature == 0  # no temperature, no top_k / top_p: greedy
    assert engine.parse(dict(good, runtime_top_k=np.array([[5]]))).decoding.temperature == 1.0
    words = np.array([[[7, 8, 9], [1, 3, -1]]], np.int32)
    assert engine.parse(dict(good, bad_words_list=words)).decoding.bad_words == ((7,), (8, 9))
    bad = [({"input_ids": np.zeros((1, 0), np.int32)}, "empty"),
           ({"request_output_len": np.array([[-2]])}, "max_tokens=-2"),
           ({"temperature": np.array([[np.nan]], np.float32)}, "temperature=nan: send a finite number"),
           ({"runtime_top_p": np.array([[1.5]], np.float32), "temperature": np.array([[1.0]])}, "top_p"),
           ({"input_ids": np.array([[5] * 200], np.int32)}, "context"),
           ({"input_ids": np.array([[10**6]], np.int32)}, "outside the vocabulary"),
           ({"input_lengths": np.array([[3]], np.int32)}, r"input_lengths=3 but input_ids holds 2 tokens: send"),
           ({"streaming": np.array([[True]])}, "decoupled"),
           ({"bad_words_list": np.array([[[10**6], [1]]], np.int32)}, r"bad_words token ids \[1000000\] are not in"),
           ({"bad_words_list": np.array([[[7], [2]]], np.int32)}, "offsets")]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            engine.parse(dict(good, **change))


# ---------------------------------------------------------------------------------------------------- the server

def test_ports_are_bound_to_loopback_only(server):
    for port in (server.http_port, server.grpc_port, server.metrics_port):
        addresses = listening(port)
        assert addresses and all(loopback(a) for a in addresses), f"port {port} listens on {addresses}"
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        assert b"nv_inference_request_success" in response.read()


def test_ready_table_lists_the_four_models(server):
    rows = server.ready_table()
    assert {r["name"]: r["state"] for r in rows} == dict.fromkeys(MODELS, "READY")
    table = format_ready_table(rows)
    assert all(m in table for m in MODELS) and "READY" in table


def test_generate_endpoint_and_grpc_equal_local_generation(server, local):
    texts, _ = local
    for prompt in PROMPTS:
        assert client.generate(server.http_url, prompt, MAX_TOKENS) == texts[prompt]
        assert client.generate(server.http_url, prompt, MAX_TOKENS, temperature=0.0, bad_words="",
                               stop_words="") == texts[prompt]  # TensorRT-LLM's README request
        assert client.grpc_infer(server.grpc_url, prompt, MAX_TOKENS) == texts[prompt]  # through the stream


def test_greedy_with_a_repetition_penalty_equals_local(server, trained_run):
    # A short-trained model repeats one token greedily; the penalty makes every step pick a different one.
    model, tokenizer, _ = load_trained(trained_run)
    d = Decoding(max_new_tokens=MAX_TOKENS, temperature=0, repetition_penalty=1.5)
    for prompt in PROMPTS:
        expected = generate_text(model, tokenizer, prompt, d)[0]
        assert len(set(expected)) > 3
        assert client.generate(server.http_url, prompt, MAX_TOKENS, repetition_penalty=1.5) == expected
        assert "".join(client.generate_stream(server.http_url, prompt, MAX_TOKENS,
                                              repetition_penalty=1.5)) == expected


def test_settings_reach_the_engine(server, local, trained_run):
    model, tokenizer, _ = load_trained(trained_run)
    texts, ids = local
    prompt = PROMPTS[0]
    # Sampling with a seed (binary fractions: float32 carries them exactly) is local sampling of that prompt alone.
    sampled = Decoding(max_new_tokens=MAX_TOKENS, temperature=0.5, top_k=20, top_p=0.75, seed=3)
    assert client.generate(server.http_url, prompt, MAX_TOKENS, temperature=0.5, top_k=20, top_p=0.75,
                           seed=3) == generate_text(model, tokenizer, prompt, sampled)[0]
    assert client.generate(server.http_url, prompt, MAX_TOKENS, exclude_input_in_output=False) == prompt + texts[prompt]
    # Stop words are token sequences (TensorRT-LLM's): generation ends with the first one, which stays in the text.
    word = tokenizer.decode([ids[prompt][2]])
    stop = tuple(tokenizer.encode(word).ids)
    end = next(j for j in range(1, len(ids[prompt]) + 1) if tuple(ids[prompt][:j][-len(stop):]) == stop)
    assert client.generate(server.http_url, prompt, MAX_TOKENS, stop_words=[word]) == tokenizer.decode(
        ids[prompt][:end])


def test_bad_words_change_the_greedy_text_as_locally(server, local, trained_run):
    model, tokenizer, _ = load_trained(trained_run)
    texts, ids = local
    prompt = PROMPTS[1]
    # A word of the greedy text that is one token: banning it must change the text.
    word = next(tokenizer.decode([t]) for t in ids[prompt] if tokenizer.encode(tokenizer.decode([t])).ids == [t])
    d = Decoding(max_new_tokens=MAX_TOKENS, temperature=0, bad_words=(tuple(tokenizer.encode(word).ids),))
    expected = generate_text(model, tokenizer, prompt, d)[0]
    assert expected != texts[prompt]
    assert client.generate(server.http_url, prompt, MAX_TOKENS, bad_words=[word]) == expected
    assert "".join(client.generate_stream(server.http_url, prompt, MAX_TOKENS, bad_words=[word])) == expected


def test_streaming_yields_the_text_token_by_token(server, local):
    texts, ids = local
    for prompt in PROMPTS[:2]:
        for pieces in (list(client.generate_stream(server.http_url, prompt, MAX_TOKENS)),
                       client.grpc_stream(server.grpc_url, prompt, MAX_TOKENS)):
            assert "".join(pieces) == texts[prompt]
            if texts[prompt].isascii():  # each token is whole characters: one piece per token
                assert len(pieces) == len(ids[prompt])
            else:
                assert 1 < len(pieces) <= len(ids[prompt])


def test_plain_infer_apis_equal_local_generation(plain_server, server, local):
    texts, _ = local
    for prompt in PROMPTS:
        assert client.http_infer(plain_server.http_url, prompt, MAX_TOKENS) == texts[prompt]
        assert client.grpc_infer(plain_server.grpc_url, prompt, MAX_TOKENS) == texts[prompt]
        assert client.generate(plain_server.http_url, prompt, MAX_TOKENS) == texts[prompt]
    with pytest.raises(client.InferenceError, match="decoupled"):
        client.http_infer(server.http_url, PROMPTS[0], MAX_TOKENS)


def test_concurrent_requests_batch_and_stay_exact(plain_server, local):
    texts, _ = local
    jobs = PROMPTS * 4
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        results[i] = client.generate(plain_server.http_url, jobs[i], MAX_TOKENS)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [results.get(i) for i in range(len(jobs))] == [texts[p] for p in jobs]
    with urllib.request.urlopen(f"http://{plain_server.http_url}/v2/models/gpt/stats", timeout=10) as response:
        stats = json.loads(response.read())["model_stats"][0]
    assert stats["inference_count"] >= len(jobs) and stats["execution_count"] <= stats["inference_count"]


@pytest.fixture(scope="module")
def onnx_server(trained_run, tmp_path_factory):
    repository = render_repository(trained_run, tmp_path_factory.mktemp("deploy_onnx") / "repository",
                                   decoupled=False, engine="onnx")
    with TritonServer(repository, list(MODELS)) as s:
        yield s


def test_the_onnx_engine_serves_the_export(onnx_server, local):
    texts, _ = local
    generator = OnnxGenerator(onnx_server.repository / "gpt" / "1" / "onnx")
    tokenizer = load_run_tokenizer(onnx_server.repository / "gpt" / "1" / "onnx")
    for prompt in PROMPTS:
        new = [t for t in generator.generate_ids([tokenizer.encode(prompt).ids], MAX_TOKENS)[0]
               if t != generator.eos_token_id]
        served = client.generate(onnx_server.http_url, prompt, MAX_TOKENS)
        assert served == tokenizer.decode(new) == texts[prompt]  # ONNX Runtime's greedy text is torch's
        assert client.http_infer(onnx_server.http_url, prompt, MAX_TOKENS) == served
    for refused in (dict(temperature=0.5), dict(bad_words=["x"])):
        with pytest.raises(client.InferenceError, match="ONNX engine generates greedily"):
            client.generate(onnx_server.http_url, PROMPTS[0], MAX_TOKENS, **refused)
    assert client.generate(onnx_server.http_url, PROMPTS[0], MAX_TOKENS) == texts[PROMPTS[0]]


def _post_generate(url: str, body: bytes) -> tuple[int, str]:
    req = urllib.request.Request(f"http://{url}/v2/models/ensemble/generate", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


BAD_BODIES = {
    "empty prompt": ({"text_input": "", "max_tokens": 8}, "empty"),
    "negative max_tokens": ({"text_input": "def ", "max_tokens": -3}, "max_tokens=-3"),
    "prompt past the context": ({"text_input": "x = 1\n" * 200, "max_tokens": 4}, "context"),
    "missing text_input": ({"max_tokens": 8}, "text_input"),
    "missing max_tokens": ({"text_input": "def "}, "missing required input(s) ['max_tokens']"),  # Triton's words
    "max_tokens not a number": ({"text_input": "def ", "max_tokens": "many"}, "Unable to parse"),  # Triton's words
    "absurd max_tokens": ({"text_input": "def ", "max_tokens": 10**9}, "past the model's context of 128: ask for"),
    "top_p out of range": ({"text_input": "def ", "max_tokens": 8, "temperature": 1.0, "top_p": 2.0}, "top_p"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_malformed_requests_get_an_error_and_the_server_goes_on(server, local, case):
    body, message = BAD_BODIES[case]
    status, text = _post_generate(server.http_url, json.dumps(body).encode())
    assert status >= 400 and message in json.loads(text)["error"], text
    assert server.is_ready()
    assert client.generate(server.http_url, PROMPTS[0], MAX_TOKENS) == local[0][PROMPTS[0]]


def _tensor(name: str, value, datatype: str) -> httpclient.InferInput:
    array = np.array(value, dtype=triton_to_np_dtype(datatype))
    tensor = httpclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


_PROMPT = [("text_input", [[b"def "]], "BYTES"), ("max_tokens", [[8]], "INT32")]
_IDS = [("input_ids", [[5, 6]], "INT32"), ("input_lengths", [[2]], "INT32"), ("request_output_len", [[4]], "INT32")]
# (model, its input tensors, what the error says): tritonclient sends what the generate endpoint's JSON cannot.
BAD_TENSORS = {
    "max_tokens as FP32": ("ensemble", [_PROMPT[0], ("max_tokens", [[8]], "FP32")],
                           "'max_tokens' data-type is 'FP32', but model 'ensemble' expects 'INT32'"),
    "temperature as a string": ("ensemble", [*_PROMPT, ("temperature", [[b"hot"]], "BYTES")],
                                "'temperature' data-type is 'BYTES', but model 'ensemble' expects 'FP32'"),
    "text_input of shape [1, 2]": ("ensemble", [("text_input", [[b"def ", b"x"]], "BYTES"), _PROMPT[1]],
                                   "unexpected shape for input 'text_input'"),
    "a batch of two prompts": ("ensemble", [("text_input", [[b"def "], [b"x"]], "BYTES"),
                                            ("max_tokens", [[8], [8]], "INT32")],
                               "text_input holds 2 strings; send each prompt as a request of its own"),
    "text_input not UTF-8": ("ensemble", [("text_input", [[b"\xff\xfe"]], "BYTES"), _PROMPT[1]],
                             "text_input is not UTF-8 text (invalid start byte at byte 0 of b'\\xff\\xfe'): send"),
    "bad_words not UTF-8": ("ensemble", [*_PROMPT, ("bad_words", [[b"\xe2\x82"]], "BYTES")],
                            "bad_words is not UTF-8 text"),
    "token id outside the vocabulary": ("gpt", [("input_ids", [[5, 10**6]], "INT32"), *_IDS[1:]],
                                        "token ids [1000000] are outside the vocabulary 0.."),
    "input_lengths past the ids": ("gpt", [_IDS[0], ("input_lengths", [[5]], "INT32"), _IDS[2]],
                                   "input_lengths=5 but input_ids holds 2 tokens: send"),
    "missing input_lengths": ("gpt", [_IDS[0], _IDS[2]], "missing required input(s) ['input_lengths']"),
}


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_malformed_tensors_get_an_error_and_the_server_goes_on(plain_server, local, case):
    model, tensors, message = BAD_TENSORS[case]
    triton = httpclient.InferenceServerClient(plain_server.http_url)
    try:
        with pytest.raises(InferenceServerException) as refused:
            triton.infer(model, [_tensor(*t) for t in tensors])
    finally:
        triton.close()
    assert message in refused.value.message(), refused.value.message()
    assert plain_server.is_ready()
    assert client.http_infer(plain_server.http_url, PROMPTS[0], MAX_TOKENS) == local[0][PROMPTS[0]]


def test_nan_temperature_is_refused(server, local):
    # JSON has no NaN: over the generate endpoint it is a parse error; gRPC carries the float itself.
    status, _ = _post_generate(server.http_url, b'{"text_input": "def ", "max_tokens": 8, "temperature": NaN}')
    assert status >= 400
    with pytest.raises(client.InferenceError, match="temperature=nan: send a finite number"):
        client.grpc_infer(server.grpc_url, "def ", 8, temperature=float("nan"))
    assert client.grpc_infer(server.grpc_url, PROMPTS[0], MAX_TOKENS) == local[0][PROMPTS[0]]


def test_unload_and_load(plain_server, local):
    plain_server.unload("ensemble")
    plain_server.wait_model_state("ensemble", "UNAVAILABLE")
    with pytest.raises(client.InferenceError):
        client.generate(plain_server.http_url, PROMPTS[0], MAX_TOKENS)
    plain_server.load("ensemble")
    assert {r["name"]: r["state"] for r in plain_server.ready_table()}["ensemble"] == "READY"
    assert client.generate(plain_server.http_url, PROMPTS[0], MAX_TOKENS) == local[0][PROMPTS[0]]
    with pytest.raises(ServerError, match="nonexistent"):
        plain_server.load("nonexistent")


def test_a_failed_start_quotes_the_first_error(trained_run, tmp_path):
    repository = render_repository(trained_run, tmp_path / "repository")
    config = repository / "gpt" / "config.pbtxt"
    config.write_text(config.read_text().replace(str(trained_run.resolve()), str(tmp_path / "gone")))
    with pytest.raises(ServerError, match=r"exited .* first error: .*gone"):
        TritonServer(repository, list(MODELS), startup_timeout=90).start()


# ---------------------------------------------------------------------------------------------------- the CLI

def _lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


def test_cli_serves_until_interrupted(trained_run, tmp_path, local):
    cmd = [sys.executable, "-m", "labs_lib.deploy", "serve", "--checkpoint", str(trained_run),
           "--repository", str(tmp_path / "repository")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True).start()
    seen, deadline = [], time.monotonic() + 120
    try:
        while not any(line.startswith("serving") for line in seen):
            line = lines.get(timeout=max(1.0, deadline - time.monotonic()))
            assert line is not None, "the CLI ended early:\n" + "".join(seen)
            seen.append(line)
        out = "".join(seen)
        ports = {line.split()[0]: line.split()[1] for line in seen if line.split()[:1] in (["HTTP"], ["gRPC"])}
        assert set(ports) == {"HTTP", "gRPC"} and "metrics  http://127.0.0.1:" in out
        assert out.count("READY") == len(MODELS), out
        assert client.generate(ports["HTTP"], PROMPTS[0], MAX_TOKENS) == local[0][PROMPTS[0]]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert proc.returncode == 0
    assert not listening(int(ports["HTTP"].rsplit(":", 1)[1])), "the server outlived the CLI"

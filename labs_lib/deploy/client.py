"""Asking the served ensemble for text: the generate endpoints (plain HTTP), tritonclient's HTTP and gRPC.

    text = generate(server.http_url, "def ", max_tokens=40)                    # POST /v2/models/ensemble/generate
    for piece in generate_stream(server.http_url, "def ", max_tokens=40): ...   # .../generate_stream, one per token
    text = http_infer(server.http_url, "def ", max_tokens=40)                  # tritonclient.http
    text = grpc_infer(server.grpc_url, "def ", max_tokens=40)                  # tritonclient.grpc
    pieces = grpc_stream(server.grpc_url, "def ", max_tokens=40)               # gRPC streaming, one per token

A decoupled ensemble (the default rendering: its gpt can stream) answers the generate endpoints and gRPC's
stream, not the plain infer APIs (Triton's own rule, as for TensorRT-LLM in decoupled mode): ``grpc_infer`` then
sends its one request through the stream, ``http_infer`` needs a repository rendered with ``decoupled=False``.

Settings are the ensemble's inputs, TensorRT-LLM's names: temperature (0 or left out: greedy), top_k, top_p,
repetition_penalty, seed, stop_words, bad_words, end_id, beam_width, exclude_input_in_output. A refused request
raises InferenceError with the server's message.
"""

from __future__ import annotations

import json
import queue
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np

__all__ = ["InferenceError", "generate", "generate_stream", "ensemble_inputs", "http_infer", "grpc_infer",
           "grpc_stream", "MODEL"]

MODEL = "ensemble"
# Each setting's tensor type in the ensemble (numpy dtype, Triton datatype).
_TYPES = {"max_tokens": (np.int32, "INT32"), "temperature": (np.float32, "FP32"), "top_k": (np.int32, "INT32"),
          "top_p": (np.float32, "FP32"), "repetition_penalty": (np.float32, "FP32"),
          "length_penalty": (np.float32, "FP32"), "seed": (np.uint64, "UINT64"), "end_id": (np.int32, "INT32"),
          "pad_id": (np.int32, "INT32"), "beam_width": (np.int32, "INT32"), "stream": (np.bool_, "BOOL"),
          "exclude_input_in_output": (np.bool_, "BOOL")}
_WORDS = ("stop_words", "bad_words")


class InferenceError(RuntimeError):
    """The server refused or failed a request; the message is the server's."""


def _http_base(url: str) -> str:
    return url if url.startswith(("http://", "https://")) else f"http://{url}"


def _json_body(prompt: str, max_tokens: int, settings: dict) -> bytes:
    body = {"text_input": prompt, "max_tokens": max_tokens}
    body.update({k: v for k, v in settings.items() if v is not None})
    return json.dumps(body).encode()


def _post(url: str, timeout: float):
    try:
        return urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        try:
            detail = json.loads(detail).get("error", detail)
        except ValueError:
            pass
        raise InferenceError(f"HTTP {e.code}: {detail}") from None


def generate(url: str, prompt: str, max_tokens: int = 64, model: str = MODEL, timeout: float = 120.0,
             **settings) -> str:
    """The ensemble's text_output for ``prompt`` through ``POST /v2/models/<model>/generate``."""
    req = urllib.request.Request(f"{_http_base(url)}/v2/models/{model}/generate",
                                 data=_json_body(prompt, max_tokens, settings),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with _post(req, timeout) as response:
        return json.loads(response.read().decode())["text_output"]


def generate_stream(url: str, prompt: str, max_tokens: int = 64, model: str = MODEL, timeout: float = 120.0,
                    **settings) -> Iterator[str]:
    """The text pieces of ``POST /v2/models/<model>/generate_stream`` (server-sent events), as they arrive."""
    settings.setdefault("stream", True)
    req = urllib.request.Request(f"{_http_base(url)}/v2/models/{model}/generate_stream",
                                 data=_json_body(prompt, max_tokens, settings),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with _post(req, timeout) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            event = json.loads(line[len("data:"):])
            if "error" in event:
                raise InferenceError(event["error"])
            yield event.get("text_output", "")


def ensemble_inputs(prompt: str, max_tokens: int, **settings) -> list[tuple[str, np.ndarray, str]]:
    """(name, array with the batch dimension, Triton datatype) of each input of one request to the ensemble."""
    inputs = [("text_input", np.array([[prompt.encode()]], dtype=object), "BYTES"),
              ("max_tokens", np.array([[max_tokens]], np.int32), "INT32")]
    for name, value in settings.items():
        if value is None:
            continue
        if name in _WORDS:
            words = [value] if isinstance(value, str) else list(value)
            inputs.append((name, np.array([[w.encode() for w in words]], dtype=object), "BYTES"))
        elif name in _TYPES:
            dtype, datatype = _TYPES[name]
            inputs.append((name, np.array([[value]], dtype=dtype), datatype))
        else:
            raise ValueError(f"{name} is not an input of the ensemble: use one of {sorted([*_TYPES, *_WORDS])}")
    return inputs


def _text_of(result) -> str:
    return result.as_numpy("text_output").reshape(-1)[0].decode()


def http_infer(url: str, prompt: str, max_tokens: int = 64, model: str = MODEL, **settings) -> str:
    """text_output of one inference through tritonclient.http (the KServe v2 infer API)."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(url)
    try:
        inputs = []
        for name, array, datatype in ensemble_inputs(prompt, max_tokens, **settings):
            tensor = httpclient.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return _text_of(client.infer(model, inputs))
    except InferenceServerException as e:
        hint = (" (the ensemble streams: use generate(), or render the repository with decoupled=False for this "
                "API)") if "decoupled" in str(e.message()) else ""
        raise InferenceError(e.message() + hint) from None
    finally:
        client.close()


def grpc_inputs(prompt: str, max_tokens: int, settings: dict) -> list:
    """tritonclient.grpc InferInputs of one request to the ensemble (settings as ensemble_inputs takes them)."""
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, array, datatype in ensemble_inputs(prompt, max_tokens, **settings):
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def grpc_infer(url: str, prompt: str, max_tokens: int = 64, model: str = MODEL, **settings) -> str:
    """text_output of one inference through tritonclient.grpc (ModelInfer; the stream for a decoupled model)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(url)
    try:
        return _text_of(client.infer(model, grpc_inputs(prompt, max_tokens, settings)))
    except InferenceServerException as e:
        if "decoupled" not in str(e.message()):
            raise InferenceError(e.message()) from None
    finally:
        client.close()
    return "".join(grpc_stream(url, prompt, max_tokens, model, **dict(settings, stream=False)))


def grpc_stream(url: str, prompt: str, max_tokens: int = 64, model: str = MODEL, timeout: float = 120.0,
                **settings) -> list[str]:
    """The text pieces of one streamed request over gRPC's bidirectional stream, in order."""
    import tritonclient.grpc as grpcclient

    settings.setdefault("stream", True)
    arrived: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=lambda result, error: arrived.put((result, error)))
        client.async_stream_infer(model, grpc_inputs(prompt, max_tokens, settings),
                                  enable_empty_final_response=True)
        pieces = []
        while True:
            result, error = arrived.get(timeout=timeout)
            if error is not None:
                raise InferenceError(error.message())
            response = result.get_response()
            if result.as_numpy("text_output") is not None:
                pieces.append(_text_of(result))
            if response.parameters.get("triton_final_response") and response.parameters[
                    "triton_final_response"].bool_param:
                return pieces
    finally:
        client.stop_stream()
        client.close()

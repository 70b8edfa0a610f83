"""The ``gpt`` model's engine: requests in TensorRT-LLM's tensor names to KV-cached generation and back.

The Triton model (triton_models/gpt/1/model.py) is a thin shell over :class:`GptEngine`, so everything here runs
and is tested without a server. Inputs are TensorRT-LLM's ``tensorrt_llm`` model's: ``input_ids``,
``input_lengths``, ``request_output_len``, ``end_id``, ``pad_id``, ``stop_words_list``, ``bad_words_list``,
``beam_width``, ``temperature``, ``runtime_top_k``, ``runtime_top_p``, ``len_penalty``, ``repetition_penalty``,
``seed``, ``exclude_input_in_output``, ``streaming``; outputs ``output_ids`` [beam, tokens] and ``sequence_length``.

Sampling rules, as TensorRT-LLM's: top_k 0 and top_p 0 mean "off"; with no temperature given the request is greedy
unless top_k / top_p ask for sampling; temperature 0 is greedy (top_k / top_p then change nothing and are dropped).
Generation is :func:`labs_lib.inference.generate.generate_ids` itself, so greedy output is local generation's,
token for token. Greedy requests with the same settings run as one left-padded batch (rows are independent);
a sampled request runs alone, so its seed gives what local generation of that prompt alone gives. A streamed
request sends its tokens as they come, grouped only where one token would split a UTF-8 character.

With ``tp`` > 1 the weights live in that many worker processes, each holding one tensor-parallel shard
(:mod:`labs_lib.deploy.tensor_parallel`); this process keeps the config and tokenizer and drives them.
With ``onnx_dir`` the engine is the ONNX export run by ONNX Runtime (``labs_lib.inference.export.OnnxGenerator``,
greedy and KV-cached); requests it cannot serve (sampling, penalties, beams, stop words, bad words,
streaming) are refused.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import astuple, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from labs_lib.core.checkpoint import resolve_run
from labs_lib.data.text import EOT, decode, load_tokenizer
from labs_lib.deploy.tensor_parallel import finished_rule
from labs_lib.deploy.words import from_word_list
from labs_lib.inference.generate import Decoding, _check_length, generate_ids, load_trained
from labs_lib.measure.memory import storage_bytes

__all__ = ["GPT_INPUTS", "GenerationRequest", "GptEngine", "Emit", "whole_characters"]

GPT_INPUTS = ("input_ids", "input_lengths", "request_output_len", "end_id", "pad_id", "stop_words_list",
              "bad_words_list", "beam_width", "temperature", "runtime_top_k", "runtime_top_p", "len_penalty",
              "repetition_penalty", "seed", "exclude_input_in_output", "streaming")

# emit(request index, new token ids or the error for that request, final): one call per response to send.
Emit = Callable[[int, "list[int] | Exception", bool], None]


@dataclass
class GenerationRequest:
    prompt: list[int]
    decoding: Decoding
    stop: tuple[tuple[int, ...], ...] = ()
    stream: bool = False
    exclude_input: bool = True
    batch_key: tuple = field(default=(), repr=False)

    def output(self, new: list[int]) -> list[int]:
        """What the response carries: the new tokens without the end id (TensorRT-LLM's), prompt first if asked."""
        new = [t for t in new if t != self.decoding.eos_token_id]
        return new if self.exclude_input else self.prompt + new


def whole_characters(tokenizer, tokens: list[int]) -> bool:
    """Whether ``tokens`` decode to whole characters (none split at their end): a piece a stream may send."""
    return not decode(tokenizer, tokens).endswith("\ufffd")


def _scalar(inputs: dict, name: str, kind=float):
    """One value per request (shape [1] or [1, 1]), or None when the input was not sent."""
    value = inputs.get(name)
    if value is None:
        return None
    value = np.asarray(value)
    if value.size != 1:
        raise ValueError(f"{name} takes one value per request, got shape {list(value.shape)}: send one prompt per "
                         "request")
    return kind(value.reshape(-1)[0].item())


def _finite(name: str, value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{name}={value}: send a finite number")
    return value


class GptEngine:
    """A trained run's GPT (or one of its step folders) serving requests; ``decoupled``: it may stream."""

    def __init__(self, checkpoint: str | Path | None = None, decoupled: bool = False, threads: int = 0,
                 onnx_dir: str | Path | None = None, tp: int = 1):
        if threads:
            torch.set_num_threads(threads)
        self.decoupled = decoupled
        self.onnx = self.workers = None
        if onnx_dir:  # the ONNX export run by ONNX Runtime: its folder has the graph, tokenizer and shapes
            from labs_lib.inference.export import OnnxGenerator

            self.onnx_dir = Path(onnx_dir)
            self.onnx = OnnxGenerator(self.onnx_dir, threads or None)
            self.tokenizer = load_tokenizer(Path(onnx_dir) / "tokenizer.json")
            self.vocab_size = json.loads((Path(onnx_dir) / "config.json").read_text())["vocab_size"]
            self.model = SimpleNamespace(config=SimpleNamespace(block_size=self.onnx.block_size))  # the length check
        elif tp > 1:  # the shards live in worker processes; this process keeps the config and the tokenizer only
            from labs_lib.deploy.tensor_parallel import TensorParallelWorkers

            self.workers = TensorParallelWorkers(checkpoint, tp, threads)
            self.model = SimpleNamespace(config=self.workers.config)
            self.tokenizer = load_tokenizer(resolve_run(checkpoint)[1] / "tokenizer.json")
            self.vocab_size = self.workers.config.vocab_size
        else:
            self.model, self.tokenizer, _ = load_trained(checkpoint)
            self.vocab_size = self.model.config.vocab_size
        self.eos = self.tokenizer.token_to_id(EOT)
        self._sampled = 0  # a counter that keeps every sampled request in a batch of its own

    @property
    def weight_bytes(self) -> list[int]:
        """Bytes of weights each process holds: one entry per tensor-parallel worker, or this process's."""
        if self.workers is not None:
            return self.workers.weight_bytes
        if self.onnx is not None:  # ONNX Runtime holds the graph's initializers: its files' bytes
            return [sum(f.stat().st_size for f in self.onnx_dir.iterdir() if f.suffix in (".onnx", ".data"))]
        return [storage_bytes([*self.model.parameters(), *self.model.buffers()])[0]]

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any."""
        if self.workers is not None:
            self.workers.close()

    def _generate(self, prompts: list[list[int]], d: Decoding, stop: tuple[tuple[int, ...], ...] = (),
                  on_token: Callable[[list[int]], None] | None = None) -> list[list[int]]:
        """generate_ids' rows, ending at the first stop sequence; ``on_token(new tokens)`` after each token."""
        if self.workers is not None:
            return self.workers.generate(prompts, d, stop, on_token)
        if self.onnx is not None:
            return self.onnx.generate_ids(prompts, d.max_new_tokens, d.eos_token_id)
        return generate_ids(self.model, prompts, d, finished_rule(stop, on_token))

    # ------------------------------------------------------------------------------------------------ parsing
    def parse(self, inputs: dict[str, np.ndarray | None]) -> GenerationRequest:
        """A request's tensors (absent ones None) as a GenerationRequest; ValueError naming the fix if bad."""
        prompt = self._prompt(inputs)
        max_new = _scalar(inputs, "request_output_len", int)
        if max_new is None:
            raise ValueError("request_output_len (the ensemble's max_tokens) is missing: say how many tokens to "
                             "generate")
        if max_new < 1:
            raise ValueError(f"max_tokens={max_new}: ask for at least 1 new token")
        temperature = _finite("temperature", _scalar(inputs, "temperature"))
        top_k = _scalar(inputs, "runtime_top_k", int) or None  # 0: off
        top_p = _finite("top_p", _scalar(inputs, "runtime_top_p")) or None  # 0: off
        if temperature is None:
            temperature = 1.0 if (top_k is not None or top_p is not None) else 0.0
        if temperature == 0:
            top_k = top_p = None  # greedy: the best token whatever the filters keep
        end_id = _scalar(inputs, "end_id", int)
        beams = _scalar(inputs, "beam_width", int) or 1
        d = Decoding(max_new_tokens=max_new, temperature=temperature, top_k=top_k, top_p=top_p,
                     repetition_penalty=_finite("repetition_penalty", _scalar(inputs, "repetition_penalty")) or 1.0,
                     num_beams=beams, length_penalty=_finite("length_penalty", _scalar(inputs, "len_penalty")) or 1.0,
                     bad_words=tuple(from_word_list(inputs.get("bad_words_list"))),
                     eos_token_id=self.eos if end_id is None else end_id, seed=_scalar(inputs, "seed", int) or 0)
        d.check(self.vocab_size)
        _check_length(self.model, len(prompt), max_new)
        stop = tuple(from_word_list(inputs.get("stop_words_list")))
        stream = bool(_scalar(inputs, "streaming", bool))
        if stream and not self.decoupled:
            raise ValueError("streaming needs the decoupled gpt model: render the repository with decoupled=True "
                             "(the default), or send stream=false")
        if beams > 1 and (stream or stop):
            raise ValueError("beam search (beam_width > 1) neither streams nor stops at stop words here: send "
                             "beam_width 1, or no stream / stop_words")
        if self.onnx is not None and (temperature != 0 or d.repetition_penalty != 1 or beams > 1 or stop or stream
                                      or d.bad_words):
            raise ValueError("the ONNX engine generates greedily, without repetition penalty, beams, stop words, bad "
                             "words or streaming: send temperature 0 (or none) and none of those, or serve the torch "
                             "engine")
        exclude = _scalar(inputs, "exclude_input_in_output", bool)
        key = (astuple(d), stop) if temperature == 0 else ("sampled", self._next_sampled())
        return GenerationRequest(prompt, d, stop, stream, True if exclude is None else exclude, key)

    def _next_sampled(self) -> int:
        self._sampled += 1
        return self._sampled

    def _prompt(self, inputs: dict) -> list[int]:
        ids = inputs.get("input_ids")
        if ids is None:
            raise ValueError("input_ids is missing: send the prompt's token ids (the ensemble sends text_input)")
        ids = np.asarray(ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise ValueError(f"one prompt per request: input_ids has shape {list(ids.shape)}, not [1, tokens]")
        length = _scalar(inputs, "input_lengths", int)
        length = ids.shape[1] if length is None else length
        if not 0 <= length <= ids.shape[1]:
            raise ValueError(f"input_lengths={length} but input_ids holds {ids.shape[1]} tokens: send the prompt's "
                             f"token count (1..{ids.shape[1]})")
        prompt = [int(t) for t in ids[0, :length]]
        if not prompt:
            raise ValueError("the prompt is empty (0 tokens): send a non-empty text_input")
        outside = [t for t in prompt if not 0 <= t < self.vocab_size]
        if outside:
            raise ValueError(f"token ids {outside[:5]} are outside the vocabulary 0..{self.vocab_size - 1}: send ids "
                             "from the run's tokenizer (the ensemble's text_input does)")
        return prompt

    # ------------------------------------------------------------------------------------------------ generation
    def run(self, requests: list[GenerationRequest | Exception], emit: Emit) -> None:
        """Answer every request through ``emit``: parse errors at once, then one generation per batch of equal
        settings, then the streamed requests one by one. A failing batch fails its own requests only."""
        groups: dict[tuple, list[int]] = {}
        streamed = []
        for i, request in enumerate(requests):
            if isinstance(request, Exception):
                emit(i, request, True)
            elif request.stream:
                streamed.append(i)
            else:
                groups.setdefault(request.batch_key, []).append(i)
        for members in groups.values():
            first = requests[members[0]]
            try:
                rows = self._generate([requests[i].prompt for i in members], first.decoding, first.stop)
            except Exception as e:  # a bad batch answers with its error; the server stays up
                for i in members:
                    emit(i, ValueError(f"generation failed: {type(e).__name__}: {e}"), True)
                continue
            for i, row in zip(members, rows):
                emit(i, requests[i].output(row), True)
        for i in streamed:
            self._stream(i, requests[i], emit)

    def _stream(self, index: int, request: GenerationRequest, emit: Emit) -> None:
        sent = 0

        def on_token(new: list[int]) -> None:  # called after each token that is not the end id
            nonlocal sent
            pending = new[sent:]
            if whole_characters(self.tokenizer, pending):
                emit(index, pending, False)
                sent = len(new)

        try:
            row = self._generate([request.prompt], request.decoding, request.stop, on_token)[0]
        except Exception as e:  # as above: the error is this request's answer
            emit(index, ValueError(f"generation failed: {type(e).__name__}: {e}"), True)
            return
        emit(index, [t for t in row[sent:] if t != request.decoding.eos_token_id], True)  # the prompt never streams

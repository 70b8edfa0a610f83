"""Triton python-backend model ``gpt``: token ids in, token ids out, KV-cached generation of a trained run.

A thin shell over labs_lib.deploy.engine.GptEngine (parsing, batching, streaming live there, tested without a
server). Decoupled (the default rendering): each request gets its responses through its own response sender,
one per token group when it streams, and a final flag; otherwise one response per request, in order.
With the parameter batching_strategy inflight_fused_batching (TensorRT-LLM's), execute() hands each request to
the in-flight scheduler's thread (labs_lib.deploy.inflight) and returns at once; that thread answers through the
request's sender as its tokens come, requests joining and leaving the running batch between decode steps; the
pool's blocks are on the metrics endpoint as nv_trt_llm_kv_cache_block_metrics (max, free, used, tokens_per).
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from labs_lib.deploy.engine import GPT_INPUTS, GptEngine
from labs_lib.deploy.inflight import kv_block_metrics, scheduler_from_parameters


def _inputs(request):
    tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in GPT_INPUTS}
    return {name: None if t is None else t.as_numpy() for name, t in tensors.items()}


def _response(tokens, end_id):
    # [batch 1, beam 1, tokens]; never zero-sized (padded with the end id), sequence_length says how many count
    ids = np.full((1, 1, max(1, len(tokens))), end_id, np.int32)
    ids[0, 0, :len(tokens)] = tokens
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("output_ids", ids), pb_utils.Tensor("sequence_length", np.array([[len(tokens)]], np.int32))])


def _error(e):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))


def _reply_through(sender, parsed):
    """reply(new tokens or an error, final) through a decoupled request's response sender."""
    final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

    def reply(tokens, last):
        if isinstance(tokens, Exception):
            sender.send(_error(tokens), flags=final)
        elif tokens or not last or not parsed.stream:  # a whole answer always has a response
            sender.send(_response(tokens, parsed.decoding.eos_token_id), flags=final if last else 0)
        else:
            sender.send(flags=final)  # the stream is over; nothing left to say

    return reply


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        # tensor_parallel_size > 1: this instance drives that many worker processes holding the shards
        self.engine = GptEngine(parameters["checkpoint_dir"], decoupled=self.decoupled,
                                threads=int(parameters.get("torch_threads") or 0),
                                onnx_dir=parameters.get("onnx_dir") or None,
                                tp=int(parameters.get("tensor_parallel_size") or 1))
        # batching_strategy inflight_fused_batching: a scheduler thread; V1 (or none): static batches in execute()
        self.scheduler = scheduler_from_parameters(self.engine, parameters, self.decoupled,
                                                   config.get("max_batch_size") or None)
        if self.scheduler is not None:  # the paged pool's blocks, as TensorRT-LLM's backend reports them
            self.kv_family = pb_utils.MetricFamily(
                name="nv_trt_llm_kv_cache_block_metrics", description="KV cache blocks of the in-flight batcher's pool",
                kind=pb_utils.MetricFamily.GAUGE)
            self.kv_metrics = {kind: self.kv_family.Metric(labels={"model": args["model_name"],
                                                                   "kv_cache_block_type": kind})
                               for kind in kv_block_metrics(self.scheduler.batcher.cache)}
            self._report_kv(self.scheduler.batcher.cache)
            self.scheduler.on_step = self._report_kv
        # What each process holds, on the metrics endpoint (a Metric must go before its family: see finalize).
        self.weight_family = pb_utils.MetricFamily(
            name="gpt_worker_weight_bytes", description="Bytes of weights held by each tensor-parallel worker",
            kind=pb_utils.MetricFamily.GAUGE)
        self.weight_metrics = []
        for rank, nbytes in enumerate(self.engine.weight_bytes):
            metric = self.weight_family.Metric(labels={"model": args["model_name"], "rank": str(rank)})
            metric.set(nbytes)
            self.weight_metrics.append(metric)

    def _report_kv(self, cache):
        for kind, value in kv_block_metrics(cache).items():
            self.kv_metrics[kind].set(value)

    def finalize(self):
        if self.scheduler is not None:
            self.scheduler.close()
            self.kv_metrics.clear()
        self.engine.close()
        self.weight_metrics.clear()

    def execute(self, requests):
        parsed = []
        for request in requests:
            try:
                parsed.append(self.engine.parse(_inputs(request)))
            except Exception as e:  # a bad request is answered with its error; the others go on
                parsed.append(e)
        if self.decoupled:
            replies = [_reply_through(request.get_response_sender(), p) for request, p in zip(requests, parsed)]
            if self.scheduler is not None:  # in flight: the scheduler's thread answers; return at once
                for p, reply in zip(parsed, replies):
                    self.scheduler.submit(p, reply)
            else:
                self.engine.run(parsed, lambda i, tokens, last: replies[i](tokens, last))
            return None
        responses = [None] * len(requests)

        def collect(i, tokens, last):
            responses[i] = _error(tokens) if isinstance(tokens, Exception) else _response(
                tokens, parsed[i].decoding.eos_token_id)

        self.engine.run(parsed, collect)
        return responses

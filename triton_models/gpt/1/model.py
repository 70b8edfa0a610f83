"""Triton python-backend model ``gpt``: token ids in, token ids out, KV-cached generation of a trained run.

A thin shell over labs_lib.deploy.engine.GptEngine (parsing, batching, streaming live there, tested without a
server). Decoupled (the default rendering): each request gets its responses through its own response sender,
one per token group when it streams, and a final flag; otherwise one response per request, in order.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from labs_lib.deploy.engine import GPT_INPUTS, GptEngine


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
        # What each process holds, on the metrics endpoint (a Metric must go before its family: see finalize).
        self.weight_family = pb_utils.MetricFamily(
            name="gpt_worker_weight_bytes", description="Bytes of weights held by each tensor-parallel worker",
            kind=pb_utils.MetricFamily.GAUGE)
        self.weight_metrics = []
        for rank, nbytes in enumerate(self.engine.weight_bytes):
            metric = self.weight_family.Metric(labels={"model": args["model_name"], "rank": str(rank)})
            metric.set(nbytes)
            self.weight_metrics.append(metric)

    def finalize(self):
        self.engine.close()
        self.weight_metrics.clear()

    def execute(self, requests):
        parsed = []
        for request in requests:
            try:
                parsed.append(self.engine.parse(_inputs(request)))
            except Exception as e:  # a bad request is answered with its error; the others go on
                parsed.append(e)
        end_ids = [r.decoding.eos_token_id if hasattr(r, "decoding") else 0 for r in parsed]
        if self.decoupled:
            senders = [request.get_response_sender() for request in requests]
            final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

            def emit(i, tokens, last):
                if isinstance(tokens, Exception):
                    senders[i].send(_error(tokens), flags=final)
                elif tokens or not last or not parsed[i].stream:  # a whole answer always has a response
                    senders[i].send(_response(tokens, end_ids[i]), flags=final if last else 0)
                else:
                    senders[i].send(flags=final)  # the stream is over; nothing left to say

            self.engine.run(parsed, emit)
            return None
        responses = [None] * len(requests)

        def collect(i, tokens, last):
            responses[i] = _error(tokens) if isinstance(tokens, Exception) else _response(tokens, end_ids[i])

        self.engine.run(parsed, collect)
        return responses

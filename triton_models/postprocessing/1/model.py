"""Triton python-backend model ``postprocessing``: token ids to text with the run's tokenizer (no torch).

TOKENS_BATCH [batch, beam, tokens] and SEQUENCE_LENGTH [batch, beam] in (TensorRT-LLM's names), OUTPUT
[batch, beam] text out: each beam's first SEQUENCE_LENGTH tokens decoded.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from labs_lib.deploy.words import decode_ids, load_run_tokenizer


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"])["parameters"]
        self.tokenizer = load_run_tokenizer(parameters["tokenizer_dir"]["string_value"])
        self.skip_special = parameters["skip_special_tokens"]["string_value"].lower() in ("true", "1", "yes")

    def execute(self, requests):
        responses = []
        for request in requests:
            tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()
            lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()
            texts = [[decode_ids(self.tokenizer, beam[:length], self.skip_special).encode()
                      for beam, length in zip(beams, beam_lengths)] for beams, beam_lengths in zip(tokens, lengths)]
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("OUTPUT", np.array(texts, dtype=object))]))
        return responses

"""Triton python-backend model ``preprocessing``: text to token ids with the run's tokenizer (no torch).

Outputs TensorRT-LLM's preprocessing tensors: INPUT_ID, REQUEST_INPUT_LEN, REQUEST_OUTPUT_LEN, STOP_WORDS_IDS,
BAD_WORDS_IDS (its [2, L] word lists), OUT_END_ID (the request's END_ID, else the tokenizer's <|endoftext|>),
OUT_PAD_ID. One prompt per request; a bad request gets an error response of its own.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from labs_lib.deploy.words import encode_text, load_run_tokenizer, strings_of, to_word_list

EOT = "<|endoftext|>"


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.tokenizer = load_run_tokenizer(config["parameters"]["tokenizer_dir"]["string_value"])
        self.eos = self.tokenizer.token_to_id(EOT)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(output_tensors=self._tensors(request)))
            except Exception as e:  # a bad request is answered with its error; the model stays up
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
        return responses

    def _tensors(self, request):
        query = strings_of(_input(request, "QUERY"), "text_input")
        if len(query) != 1:
            raise ValueError(f"one prompt per request: text_input holds {len(query)} strings; send each prompt as "
                             "a request of its own")
        ids = encode_text(self.tokenizer, query[0])
        if not ids:
            raise ValueError("text_input is empty: send a prompt of at least one character")
        output_len = _input(request, "REQUEST_OUTPUT_LEN")
        end_id, pad_id = _input(request, "END_ID"), _input(request, "PAD_ID")
        end_id = np.array([[self.eos]], np.int32) if end_id is None else end_id.astype(np.int32).reshape(1, 1)
        pad_id = end_id if pad_id is None else pad_id.astype(np.int32).reshape(1, 1)
        return [pb_utils.Tensor("INPUT_ID", np.array([ids], np.int32)),
                pb_utils.Tensor("REQUEST_INPUT_LEN", np.array([[len(ids)]], np.int32)),
                pb_utils.Tensor("REQUEST_OUTPUT_LEN", output_len.astype(np.int32).reshape(1, -1)),
                pb_utils.Tensor("STOP_WORDS_IDS", self._words(request, "STOP_WORDS_DICT", "stop_words")),
                pb_utils.Tensor("BAD_WORDS_IDS", self._words(request, "BAD_WORDS_DICT", "bad_words")),
                pb_utils.Tensor("OUT_END_ID", end_id), pb_utils.Tensor("OUT_PAD_ID", pad_id)]

    def _words(self, request, name, ensemble_name):
        return to_word_list(self.tokenizer, strings_of(_input(request, name), ensemble_name))[None]

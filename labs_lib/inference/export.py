"""A trained run to the Hugging Face GPT-2 format (with its tokenizer) or to ONNX with KV-cache inputs and outputs.

    python -m labs_lib.export --checkpoint build/runs/demo --format hf --out build/export/demo-hf
    python -m labs_lib.export --checkpoint build/runs/demo --format onnx --out build/export/demo-onnx

The Hugging Face folder loads with ``transformers`` alone: ``GPT2LMHeadModel.from_pretrained(DIR)`` and
``PreTrainedTokenizerFast.from_pretrained(DIR)`` (or the Auto classes); <|endoftext|> is bos, eos, unk and pad,
and its id is the eos of config.json and generation_config.json, so ``generate`` stops there.

The ONNX folder holds ``model.onnx``, ``tokenizer.json`` and ``config.json`` (the shapes, names and eos id a
serving program needs). The graph's inputs are ``input_ids``, ``position_ids`` (B, T) int64, ``attention_mask``
(B, past + T) int64 (1: a token, 0: padding) and ``past_key_<i>``, ``past_value_<i>`` (B, heads, past, head_dim)
for every layer; its outputs ``logits`` (B, T, vocab) and ``present_key_<i>``, ``present_value_<i>`` (the past
and this step's). Batch, sequence and past length are dynamic: one graph runs the prefill (past length 0) and
every decoding step. In code::

    export_hf_run("build/runs/demo", "build/export/demo-hf")
    export_onnx_run("build/runs/demo", "build/export/demo-onnx")
    generator = OnnxGenerator("build/export/demo-onnx")              # ONNX Runtime only, numpy in and out
    new_ids = generator.generate_ids([[12, 7], [3]], max_new_tokens=20)   # greedy, KV-cached, left-padded batch

A run trained with TP, PP or ZeRO exports the same way: its checkpoint's weights are single-device.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from labs_lib.data.text import EOT
from labs_lib.inference.cache import GrowingCache, forward_cached
from labs_lib.inference.generate import load_trained
from labs_lib.models.gpt import GPT
from labs_lib.models.hf import export_hf

__all__ = ["FORMATS", "export_hf_run", "save_hf_tokenizer", "onnx_names", "export_onnx", "export_onnx_run",
           "onnx_session", "OnnxGenerator", "onnx_generate_ids", "main"]

FORMATS = ("hf", "onnx")
ONNX_FILE = "model.onnx"


def _eot_id(tokenizer) -> int:
    eot = tokenizer.token_to_id(EOT)
    if eot is None:
        raise ValueError(f"the run's tokenizer has no {EOT} token: export a run trained with this course's tokenizer")
    return eot


# ---------------------------------------------------------------------------------------------------- Hugging Face

def save_hf_tokenizer(tokenizer, out: str | Path, model_max_length: int) -> Path:
    """Write ``tokenizer`` (a ``tokenizers.Tokenizer``) where ``PreTrainedTokenizerFast.from_pretrained(out)`` reads
    it: tokenizer.json, tokenizer_config.json, special_tokens_map.json; <|endoftext|> as bos / eos / unk / pad."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    eot = _eot_id(tokenizer)
    tokenizer.save(str(out / "tokenizer.json"))
    special = {name: EOT for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    config = dict(special, tokenizer_class="PreTrainedTokenizerFast", model_max_length=model_max_length,
                  padding_side="left",  # decoder-only generation pads on the left
                  clean_up_tokenization_spaces=False,  # decode(encode(s)) == s, as ours
                  add_bos_token=False, add_eos_token=False,  # encode adds nothing, as ours
                  added_tokens_decoder={str(eot): {"content": EOT, "lstrip": False, "normalized": False,
                                                   "rstrip": False, "single_word": False, "special": True}})
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return out


def export_hf_run(run: str | Path, out: str | Path) -> Path:
    """Write the run's model and tokenizer (a run folder or a checkpoints/step_N folder) as a ``transformers``
    GPT-2 folder; returns ``out``. FileNotFoundError / ValueError name the fix for a bad run or an MoE model."""
    model, tokenizer, _ = load_trained(run)
    eot = _eot_id(tokenizer)
    out = Path(out)
    export_hf(model, out, eos_token_id=eot)
    save_hf_tokenizer(tokenizer, out, model.config.block_size)
    # pad = eos, as the tokenizer says: generate then needs no pad_token_id and warns about none.
    gen_path = out / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    gen.update(eos_token_id=eot, pad_token_id=eot)
    gen_path.write_text(json.dumps(gen, indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------------------------- ONNX export

def onnx_names(n_layer: int) -> tuple[list[str], list[str]]:
    """(input names, output names) of the exported graph, in order."""
    past = [f"past_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]
    present = [f"present_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]
    return ["input_ids", "position_ids", "attention_mask", *past], ["logits", *present]


class _KVGraph(nn.Module):
    """The exported module: tokens, positions, mask and every layer's past in; logits and every layer's present out."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, attention_mask, *past):
        cache = GrowingCache(list(zip(past[0::2], past[1::2])))
        logits = forward_cached(self.model, input_ids, cache, position_ids, attention_mask)
        return (logits, *[t for kv in cache.present for t in kv])


def _example_inputs(model: GPT, batch: int = 2, new: int = 3, past: int = 5) -> tuple[torch.Tensor, ...]:
    """Inputs to trace with. Sizes above 1 and all different: torch.export fixes a dimension seen as 0 or 1, and
    would tie dimensions of equal example sizes; past length 0 runs anyway (the tests check it)."""
    device = model.lm_head.weight.device
    heads, head_dim = model.config.n_head, model.config.head_dim
    ids = torch.zeros(batch, new, dtype=torch.long, device=device)
    positions = torch.arange(past, past + new, device=device).expand(batch, new).contiguous()
    mask = torch.ones(batch, past + new, dtype=torch.long, device=device)
    kv = [torch.zeros(batch, heads, past, head_dim, device=device) for _ in range(2 * model.config.n_layer)]
    return ids, positions, mask, *kv


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's warnings (torchvision missing, deprecations) are not the user's business."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_onnx(model: GPT, out: str | Path, tokenizer=None, eos_token_id: int | None = None) -> Path:
    """Write ``out/model.onnx`` (the KV-cache graph, see the module docstring) and ``out/config.json``, plus
    ``out/tokenizer.json`` when a tokenizer is given (its <|endoftext|> is then the eos id); returns the
    model.onnx path. fp32, on the model's device, in eval mode (no dropout in the graph)."""
    if model.config.n_experts:
        raise ValueError(f"the ONNX export runs dense GPTs and this one has {model.config.n_experts} experts per MoE "
                         "block (its routing is data-dependent): export a dense GPT (n_experts=0)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        eos_token_id = _eot_id(tokenizer) if eos_token_id is None else eos_token_id
        tokenizer.save(str(out / "tokenizer.json"))
    c = model.config
    inputs, outputs = onnx_names(c.n_layer)
    dims = [{0: "batch", 1: "sequence"}, {0: "batch", 1: "sequence"}, {0: "batch", 1: "past_sequence + sequence"}]
    dims += [{0: "batch", 2: "past_sequence"}] * (2 * c.n_layer)
    if next(model.parameters()).dtype != torch.float32:
        model = copy.deepcopy(model).float()  # the graph is fp32; the caller's model stays as it is
    training = model.training
    try:
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(_KVGraph(model.eval()), _example_inputs(model), input_names=inputs,
                                        output_names=outputs, dynamic_shapes=(*dims[:3], tuple(dims[3:])),
                                        dynamo=True, verbose=False)
    finally:
        model.train(training)
    config = {"format": "onnx", "model": ONNX_FILE, "tokenizer": "tokenizer.json" if tokenizer is not None else None,
              "n_layer": c.n_layer, "n_head": c.n_head, "head_dim": c.head_dim, "n_embd": c.n_embd,
              "vocab_size": c.vocab_size, "block_size": c.block_size, "eos_token_id": eos_token_id,
              "dtype": "float32", "inputs": inputs, "outputs": outputs}
    # The same facts inside the graph: a session alone knows its context and end of text.
    program.model.metadata_props.update({k: json.dumps(config[k]) for k in ("block_size", "eos_token_id")})
    program.save(str(out / ONNX_FILE))  # over 2 GB the weights go beside it (model.onnx.data); ORT finds them
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out / ONNX_FILE


def export_onnx_run(run: str | Path, out: str | Path) -> Path:
    """``export_onnx`` of a run folder or step folder, with its tokenizer; returns the model.onnx path."""
    model, tokenizer, _ = load_trained(run)
    return export_onnx(model, out, tokenizer)


# ---------------------------------------------------------------------------------------------------- ONNX Runtime

def onnx_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime session (CPU) of an export folder or its model.onnx; ``threads``: intra-op threads."""
    import onnxruntime as ort

    path = Path(path)
    path = path / ONNX_FILE if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: export first (python -m labs_lib.export --checkpoint RUN "
                                "--format onnx --out DIR)")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxGenerator:
    """Greedy, KV-cached generation with an exported graph: numpy arrays in and out, no torch.

    The shapes come from the session itself (the past inputs are (batch, heads, past, head_dim)), the context and
    end-of-text id from the graph's metadata."""

    def __init__(self, session, threads: int | None = None):
        self.session = session if hasattr(session, "run") else onnx_session(session, threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.n_layer = sum(name.startswith("past_key_") for name in inputs)
        self.input_names, self.output_names = onnx_names(self.n_layer)
        if set(self.input_names) != set(inputs):
            raise ValueError(f"this ONNX graph's inputs are {sorted(inputs)}, not those of labs_lib's export: "
                             "export with python -m labs_lib.export --format onnx")
        _, self.n_head, _, self.head_dim = inputs["past_key_0"].shape
        meta = self.session.get_modelmeta().custom_metadata_map
        self.block_size = json.loads(meta.get("block_size", "null"))
        self.eos_token_id = json.loads(meta.get("eos_token_id", "null"))

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """Every layer's keys and values of no tokens: the prefill's past."""
        return [np.zeros((batch, self.n_head, 0, self.head_dim), np.float32) for _ in range(2 * self.n_layer)]

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
             past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """(logits (B, T, vocab), present) of one forward: ``past`` the previous step's present (or empty_past)."""
        feed = dict(zip(self.input_names, [input_ids.astype(np.int64), position_ids.astype(np.int64),
                                           attention_mask.astype(np.int64), *past]))
        logits, *present = self.session.run(self.output_names, feed)
        return logits, present

    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int,
                     eos_token_id: int | None = None) -> list[list[int]]:
        """Each prompt's new tokens, greedy, as one left-padded batch (``generate.generate_ids`` with temperature
        0): a row ends with ``eos_token_id`` (default: the graph's end of text; included) or at max_new_tokens."""
        eos = self.eos_token_id if eos_token_id is None else eos_token_id
        if max_new_tokens < 1 or not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("give at least one non-empty prompt and max_new_tokens >= 1")
        width = max(len(p) for p in prompts)
        if self.block_size is not None and width + max_new_tokens > self.block_size:
            raise ValueError(f"a {width}-token prompt + {max_new_tokens} new tokens is past the model's context of "
                             f"{self.block_size}: ask for fewer new tokens or a shorter prompt")
        ids = np.zeros((len(prompts), width), np.int64)
        mask = np.zeros((len(prompts), width), np.int64)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
        positions = np.maximum(mask.cumsum(axis=1) - 1, 0)  # real tokens count from 0 in every row
        logits, past = self.step(ids, positions, mask, self.empty_past(len(prompts)))
        out: list[list[int]] = [[] for _ in prompts]
        open_rows = set(range(len(prompts)))
        for step in range(max_new_tokens):
            token = logits[:, -1].argmax(axis=-1)
            for row in list(open_rows):
                out[row].append(int(token[row]))
                if token[row] == eos:
                    open_rows.discard(row)
            if not open_rows or step == max_new_tokens - 1:
                break
            mask = np.concatenate((mask, np.ones((len(prompts), 1), np.int64)), axis=1)
            positions = positions[:, -1:] + 1
            logits, past = self.step(token[:, None], positions, mask, past)
        return out


def onnx_generate_ids(session, prompts: list[list[int]], max_new_tokens: int,
                      eos_token_id: int | None = None) -> list[list[int]]:
    """Greedy new tokens of each prompt with an ONNX Runtime session (or an export folder / model.onnx path)."""
    return OnnxGenerator(session).generate_ids(prompts, max_new_tokens, eos_token_id)


# ---------------------------------------------------------------------------------------------------- command line

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m labs_lib.export",
                                description="Export a trained run to the Hugging Face GPT-2 format or to ONNX.")
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoints/step_N folder")
    p.add_argument("--format", default="hf", help="hf (transformers' GPT-2 folder) or onnx (model.onnx with a KV "
                                                  "cache); default hf")
    p.add_argument("--out", required=True, help="folder to write (created; files in it are replaced)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.format not in FORMATS:
        raise SystemExit(f"error: unknown format {args.format!r}: use --format hf (a transformers GPT-2 folder) or "
                         "--format onnx (ONNX Runtime)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {out} is a file: pass a folder to write the export into")
    try:
        if args.format == "hf":
            written = export_hf_run(args.checkpoint, out)
        else:
            written = export_onnx_run(args.checkpoint, out).parent
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"exported {args.checkpoint} ({args.format}) -> {written}")


if __name__ == "__main__":
    main()

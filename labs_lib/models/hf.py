"""Hugging Face GPT-2 format: the workshop GPT's weights to and from a ``transformers`` GPT2LMHeadModel.

    hf = to_hf(model)                      # a GPT2LMHeadModel with the same weights (transformers' own code runs it)
    export_hf(model, "build/hf/demo")      # config.json + model.safetensors, loadable with no code of ours
    model = import_hf("build/hf/demo")
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from labs_lib.core.config import GPTConfig
from labs_lib.models.gpt import GPT

__all__ = ["to_hf", "from_hf", "export_hf", "import_hf"]

# GPT-2's Conv1D stores its weight as (in, out), the transpose of nn.Linear's (out, in).

_HF_CONV1D = {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}


def _hf_name(name: str) -> tuple[str, bool]:
    """Our parameter name → (GPT2LMHeadModel's name, whether the weight is transposed there)."""
    if name == "lm_head.weight":
        return name, False
    top = {"tok_emb": "wte", "pos_emb": "wpe", "ln_f": "ln_f"}
    first, rest = name.split(".", 1)
    if first in top:
        return f"transformer.{top[first]}.{rest}", False
    layer, sub = rest.split(".", 1)  # blocks.<i>.<sub>
    module, kind = sub.rsplit(".", 1)
    conv = _HF_CONV1D.get(module)
    return f"transformer.h.{layer}.{conv or module}.{kind}", conv is not None and kind == "weight"


def _hf_config(config: GPTConfig, eos_token_id: int | None):
    from transformers import GPT2Config

    if not config.bias:
        raise ValueError("GPT-2 in transformers always has biases: export a model built with bias=True")
    return GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
                      n_layer=config.n_layer, n_head=config.n_head, activation_function="gelu_new",
                      resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
                      layer_norm_epsilon=1e-5, tie_word_embeddings=True,
                      bos_token_id=eos_token_id, eos_token_id=eos_token_id)  # GPT-2's 50256 is not in our vocab


@contextlib.contextmanager
def _quiet_transformers():
    """No progress bars or info lines on stderr (a notebook test cell that writes to stderr scores zero)."""
    from transformers.utils import logging

    bars, level = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def to_hf(model: GPT, eos_token_id: int | None = None, attn_implementation: str = "sdpa"):
    """A ``transformers`` GPT2LMHeadModel with ``model``'s weights (copied), in ``model``'s train/eval mode."""
    from transformers import GPT2LMHeadModel

    if model.config.n_experts:
        raise ValueError(f"GPT-2's format has no mixture-of-experts layers and this GPT has {model.config.n_experts} "
                         "experts per MoE block: export a dense GPT (n_experts=0)")

    hf_config = _hf_config(model.config, eos_token_id)
    hf_config._attn_implementation = attn_implementation
    hf = GPT2LMHeadModel(hf_config)
    hf.loss_type = "ForCausalLM"  # the loss transformers would pick anyway, without a warning about it
    hf_params = dict(hf.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, p in model.named_parameters(remove_duplicate=False):
            hf_name, transposed = _hf_name(name)
            hf_params[hf_name].copy_(p.t() if transposed else p)
    first = next(model.parameters())
    return hf.to(device=first.device, dtype=first.dtype).train(model.training)


def from_hf(hf) -> GPT:
    """Our GPT with the weights of a ``transformers`` GPT2LMHeadModel (copied)."""
    c = hf.config
    if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh") or c.n_inner not in (None, 4 * c.n_embd):
        raise ValueError(f"only GPT-2 with gelu_new and a 4x MLP converts, got activation {c.activation_function!r}, "
                         f"n_inner={c.n_inner}")
    config = GPTConfig(vocab_size=c.vocab_size, block_size=c.n_positions, n_layer=c.n_layer, n_head=c.n_head,
                       n_embd=c.n_embd, dropout=c.resid_pdrop, bias=True)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=next(hf.parameters()).device)
    model.lm_head.weight = model.tok_emb.weight  # to_empty gives each name its own tensor: tie again
    hf_params = dict(hf.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            hf_name, transposed = _hf_name(name)
            p.copy_(hf_params[hf_name].t() if transposed else hf_params[hf_name])
    return model.train(hf.training)


def export_hf(model: GPT, path: str | Path, eos_token_id: int | None = None) -> Path:
    """Write ``model`` as a ``transformers`` GPT2LMHeadModel folder (config.json + model.safetensors).

    ``eos_token_id``: the tokenizer's <|endoftext|> id, so that transformers' ``generate`` stops there."""
    path = Path(path)
    with _quiet_transformers():
        to_hf(model, eos_token_id).save_pretrained(path, safe_serialization=True)
    return path


def import_hf(path: str | Path) -> GPT:
    """Read a ``transformers`` GPT-2 folder (e.g. one written by ``export_hf``) into our GPT, in eval mode."""
    from transformers import GPT2LMHeadModel

    with _quiet_transformers():
        hf = GPT2LMHeadModel.from_pretrained(str(path), local_files_only=True)
    return from_hf(hf).eval()

"""The KV cache: each layer's keys and values kept from earlier steps, so a decoding step runs one new token.

Without it, every new token runs the whole context through every layer again (``GPT.generate``, the reference):
step t costs O(t) tokens of work and a generation of n tokens O(n²). With it, a step computes q, k, v of the new
token only, appends k and v to the cache and attends over all of them::

    cache = KVCache(max_len=prompt_len + max_new_tokens)
    logits = forward_cached(model, prompt_ids, cache, positions)         # prefill: the whole prompt at once
    logits = forward_cached(model, next_ids, cache, positions + 1)       # decode: one token per step

The model is the single-device GPT, untouched: :func:`forward_cached` walks its blocks and redoes only the
attention with the cache (the rest of every block is the model's own modules). A batch of prompts of different
lengths is left-padded: ``key_mask`` marks the real tokens, and positions count real tokens only, so a padded row
computes what the prompt alone would.

:class:`KVCache` preallocates each layer's buffers once (no reallocation per token); :class:`GrowingCache`
concatenates instead (past in, present out), the form an exported ONNX graph takes and returns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from labs_lib.models.gpt import GPT, CausalSelfAttention

__all__ = ["KVCache", "GrowingCache", "forward_cached", "attention_mask"]


class KVCache:
    """Preallocated keys and values, one (batch, heads, max_len, head_dim) buffer pair per layer.

    A layer's buffers are made on its first :meth:`update`, with that layer's head count (pruned heads make it
    smaller). ``length`` tokens are held; :meth:`advance` moves it after every layer has written its step."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k, v (B, heads, T, head_dim) after the held ones; return all of them so far."""
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} tokens and this step needs {end}: make the cache "
                             "with max_len = prompt length + max_new_tokens")
        if layer == len(self.keys):
            shape = (k.size(0), k.size(1), self.max_len, k.size(3))
            self.keys.append(k.new_zeros(shape))
            self.values.append(v.new_zeros(shape))
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep batch rows ``rows`` (in that order, repeats allowed): beam search continues the beams it kept."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class GrowingCache:
    """Keys and values passed in (``past``: per layer (k, v)) and grown by concatenation; ``present`` after a
    forward holds each layer's k, v including this step's: the KV-cache inputs and outputs of an exported graph."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]):
        self.past = past
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.length = past[0][0].size(2) if past else 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        past_k, past_v = self.past[layer]
        k, v = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
        self.present.append((k, v))
        return k, v

    def advance(self, n: int) -> None:
        self.length += n


def attention_mask(key_mask: torch.Tensor | None, past: int, new: int) -> torch.Tensor | None:
    """(B, 1, new, past + new) bool: query t (at slot past + t) sees the keys at slots <= past + t that are real
    tokens (``key_mask`` (B, past + new), True for a token, False for padding). None when no mask is needed: one
    query and no padding.

    A padding query sees itself too: a query that sees nothing makes NaNs, and a NaN value in the cache poisons
    every later query, even one that gives it weight 0 (0 x NaN is NaN)."""
    if key_mask is None and new == 1:
        return None
    device = key_mask.device if key_mask is not None else None
    slots = torch.arange(past + new, device=device)[None, :]
    queries = past + torch.arange(new, device=device)[:, None]
    causal = slots <= queries  # (new, past + new)
    if key_mask is None:
        return causal[None, None]
    return causal[None, None] & (key_mask[:, None, None, :].bool() | (slots == queries)[None, None])


def _attend(attn: CausalSelfAttention, x: torch.Tensor, cache, layer: int, mask: torch.Tensor | None) -> torch.Tensor:
    """The model's attention, with this step's keys and values appended to the cache and attended over."""
    B, T, _ = x.shape
    q, k, v = attn.split_heads(x)
    k, v = cache.update(layer, k, v)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attn.proj(y.transpose(1, 2).reshape(B, T, -1))


def forward_cached(model: GPT, idx: torch.Tensor, cache, positions: torch.Tensor,
                   key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, T, vocab) of tokens ``idx`` (B, T) at ``positions`` (B, T), after the ``cache.length`` tokens the
    cache holds; their keys and values are added to the cache. ``key_mask`` (B, cache.length + T): real tokens.

    Eval mode only (no dropout); positions past the model's context are refused (in an exported graph, where a
    tensor cannot become a Python number, by ONNX Runtime's lookup of the position embedding instead)."""
    if not torch.compiler.is_exporting() and int(positions.max()) >= model.config.block_size:
        raise ValueError(f"position {int(positions.max())} is past the model's context of {model.config.block_size} "
                         "tokens: shorten the prompt or generate fewer new tokens")
    mask = attention_mask(key_mask, cache.length, idx.size(1))
    x = model.tok_emb(idx) + model.pos_emb(positions)
    for layer, block in enumerate(model.blocks):
        x = x + _attend(block.attn, block.ln_1(x), cache, layer, mask)
        x = x + block.mlp(block.ln_2(x))
    cache.advance(idx.size(1))
    return model.lm_head(model.ln_f(x))

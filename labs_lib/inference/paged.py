"""A paged KV cache (TensorRT-LLM's ``--paged_kv_cache``, vLLM's PagedAttention) and the packed forward over it.

The contiguous :class:`~labs_lib.inference.cache.KVCache` holds (batch, heads, longest prompt + max_new_tokens,
head_dim) per layer from the first token: every row reserves the longest row's length for its whole life. Here each
layer has one pool of fixed-size blocks, ``[num_blocks, heads, block_size, head_dim]`` for keys and as many for
values, allocated once; a sequence holds a *block table* (the pool blocks its tokens live in, in order), takes a new
block only when its last one is full, and gives them all back when it ends::

    cache = PagedKVCache.for_model(model, num_blocks=64, block_size=16)
    logits = forward_paged(model, cache, [("a", prompt_a), ("b", prompt_b)])   # two prefills in one forward
    logits = forward_paged(model, cache, [("a", [next_a]), ("c", prompt_c)])   # a decode step beside a prefill
    cache.free("b")                                                            # b ended: its blocks go back

:func:`forward_paged` runs a *packed* batch, TensorRT-LLM's ``--remove_input_padding``: the new tokens of every
sequence concatenated into one row, with no padding, prefill chunks and single decode tokens mixed. The model is the
single-device GPT, untouched: as :func:`~labs_lib.inference.cache.forward_cached` does, it walks the model's blocks
and redoes only the attention, so each sequence attends to its own cached keys and values only.

Exercise-style helpers: :func:`blocks_needed` (the blocks a request holds at most), :func:`kv_bytes_per_token`, and
:func:`contiguous_kv_bytes` (what the contiguous cache holds for the same batch, to compare with ``nbytes_in_use``).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from labs_lib.inference.cache import attention_mask
from labs_lib.models.gpt import GPT, CausalSelfAttention

__all__ = ["PagedKVCache", "PoolExhausted", "PackLayout", "forward_paged", "blocks_needed", "kv_bytes_per_token",
           "contiguous_kv_bytes"]


def blocks_needed(prompt_len: int, max_new_tokens: int, block_size: int) -> int:
    """The most KV blocks a request ever holds: its prompt and all its new tokens but the last one (the last new
    token is never fed back, so its keys and values are never computed), in blocks of ``block_size`` tokens."""
    return math.ceil((prompt_len + max_new_tokens - 1) / block_size)


def kv_bytes_per_token(model: GPT, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of keys and values one token holds, over all layers: 2 (k and v) x heads x head_dim x bytes each."""
    element = torch.empty((), dtype=dtype).element_size()
    return sum(2 * _heads(block.attn) * block.attn.head_dim * element for block in model.blocks)


def contiguous_kv_bytes(model: GPT, prompt_lengths: list[int], max_new_tokens: int,
                        dtype: torch.dtype = torch.float32) -> int:
    """Bytes the contiguous KVCache of generate_ids holds for one left-padded batch: every row reserves the longest
    prompt + max_new_tokens from the start, however short its own prompt or early its end."""
    return len(prompt_lengths) * (max(prompt_lengths) + max_new_tokens) * kv_bytes_per_token(model, dtype)


def _heads(attn: CausalSelfAttention) -> int:
    """This layer's head count, from its weights (pruned or tensor-parallel layers hold fewer than the config)."""
    return attn.qkv.out_features // 3 // attn.head_dim


class PoolExhausted(RuntimeError):
    """The pool has too few free blocks for what was asked; nothing was allocated."""


@dataclass
class PackLayout:
    """Where a packed batch's tokens go: per sequence its start in the pack, new and total token counts and block
    table; per token the pool block and offset its keys and values are written to, and its position. The decode
    sequences (one new token) also as one batch: their tokens' places in the pack, their tables padded to the
    longest (with block 0) and which of those keys are theirs."""

    seqs: list[Hashable]
    starts: list[int]
    new: list[int]
    totals: list[int]
    tables: list[torch.Tensor]
    slot_blocks: torch.Tensor
    slot_offsets: torch.Tensor
    positions: torch.Tensor
    decodes: torch.Tensor
    decode_tables: torch.Tensor
    decode_keys: torch.Tensor


class PagedKVCache:
    """Per layer a pool of ``num_blocks`` blocks of ``block_size`` tokens for keys and for values, shared by all
    sequences; a block table and a token count per sequence (any hashable id; a new id starts empty)."""

    def __init__(self, num_blocks: int, block_size: int, heads: list[int], head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks}, block_size={block_size}: a pool needs at least one block of "
                             "at least one token")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.keys = [torch.zeros(num_blocks, h, block_size, head_dim, dtype=dtype, device=device) for h in heads]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.free_blocks = list(range(num_blocks - 1, -1, -1))  # a stack: block 0 is handed out first
        self.tables: dict[Hashable, list[int]] = {}
        self.lengths: dict[Hashable, int] = {}

    @classmethod
    def for_model(cls, model: GPT, num_blocks: int, block_size: int = 16) -> PagedKVCache:
        """A pool shaped for ``model``'s layers (each layer's own head count), on its device and in its dtype."""
        weight = model.ln_f.weight  # a float parameter every variant keeps (a quantized head dequantizes)
        heads = [_heads(block.attn) for block in model.blocks]
        return cls(num_blocks, block_size, heads, model.blocks[0].attn.head_dim, weight.dtype, weight.device)

    # ------------------------------------------------------------------------------------------------ accounting
    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def can_admit(self, tokens: int) -> bool:
        """Whether a new sequence of ``tokens`` tokens fits in the free blocks now."""
        return self.blocks_for(tokens) <= len(self.free_blocks)

    def length(self, seq: Hashable) -> int:
        return self.lengths.get(seq, 0)

    def held(self, seq: Hashable) -> int:
        """Blocks ``seq`` holds."""
        return len(self.tables.get(seq, ()))

    def growth(self, seq: Hashable, new_tokens: int) -> int:
        """New blocks ``seq`` needs to add ``new_tokens`` tokens."""
        return self.blocks_for(self.length(seq) + new_tokens) - self.held(seq)

    @property
    def blocks_in_use(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block over all layers, keys and values."""
        return sum(k[0].numel() * k.element_size() for k in self.keys + self.values)

    @property
    def nbytes_in_use(self) -> int:
        """Bytes of the blocks sequences hold now (the pool's own size is ``num_blocks * block_nbytes``)."""
        return self.blocks_in_use * self.block_nbytes

    # ------------------------------------------------------------------------------------------------ blocks
    def free(self, seq: Hashable) -> None:
        """Give ``seq``'s blocks back to the pool and forget it (an unknown id is a no-op)."""
        self.free_blocks.extend(reversed(self.tables.pop(seq, [])))
        self.lengths.pop(seq, None)

    def layout(self, pack: list[tuple[Hashable, list[int]]]) -> PackLayout:
        """Allocate the blocks ``pack`` (sequence id, its new tokens) needs, all or none, and say where each token
        goes. A PoolExhausted names the shortfall."""
        seqs = [seq for seq, _ in pack]
        if len(set(seqs)) != len(seqs) or any(len(tokens) == 0 for _, tokens in pack):
            raise ValueError("a pack holds each sequence once, with at least one new token: merge its tokens")
        wanted = sum(self.growth(seq, len(tokens)) for seq, tokens in pack)
        if wanted > len(self.free_blocks):
            raise PoolExhausted(f"this step needs {wanted} new KV blocks and the pool has {len(self.free_blocks)} "
                                f"free of {self.num_blocks}: make the pool bigger (num_blocks), run fewer sequences "
                                "at once, or free (evict) one")
        starts, new, totals, tables, slots, positions = [], [], [], [], [], []
        for seq, tokens in pack:
            table = self.tables.setdefault(seq, [])
            past = self.length(seq)
            table.extend(self.free_blocks.pop() for _ in range(self.growth(seq, len(tokens))))
            starts.append(len(positions))
            new.append(len(tokens))
            totals.append(past + len(tokens))
            tables.append(torch.tensor(table))
            positions.extend(range(past, past + len(tokens)))
            slots.extend(table[p // self.block_size] for p in range(past, past + len(tokens)))
        device = self.keys[0].device
        positions_t = torch.tensor(positions, device=device)
        decoding = [i for i, n in enumerate(new) if n == 1]
        widest = max((len(tables[i]) for i in decoding), default=0)
        decode_tables = torch.zeros(len(decoding), widest, dtype=torch.long)
        for row, i in enumerate(decoding):
            decode_tables[row, :len(tables[i])] = tables[i]
        decode_keys = torch.arange(widest * self.block_size)[None, :] < torch.tensor([totals[i] for i in decoding],
                                                                                     dtype=torch.long)[:, None]
        return PackLayout(seqs, starts, new, totals, [t.to(device) for t in tables], torch.tensor(slots, device=device),
                          positions_t % self.block_size, positions_t,
                          torch.tensor([starts[i] for i in decoding], dtype=torch.long, device=device),
                          decode_tables.to(device), decode_keys[:, None, None, :].to(device))

    def advance(self, layout: PackLayout) -> None:
        """Count the pack's tokens as held (after every layer has written them)."""
        for seq, total in zip(layout.seqs, layout.totals):
            self.lengths[seq] = total

    def gather(self, layer: int, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of ``layer`` in the blocks of ``tables`` (rows, blocks), in order: each
        (rows, heads, blocks x block_size, head_dim)."""
        def contiguous(pool: torch.Tensor) -> torch.Tensor:
            blocks = pool[tables]  # (rows, blocks, heads, block_size, head_dim)
            return blocks.transpose(1, 2).reshape(tables.size(0), pool.size(1), -1, pool.size(3))
        return contiguous(self.keys[layer]), contiguous(self.values[layer])


def _attend_paged(attn: CausalSelfAttention, x: torch.Tensor, cache: PagedKVCache, layer: int,
                  layout: PackLayout) -> torch.Tensor:
    """The model's attention over a packed row ``x`` (1, N, C): every token's k, v written to its pool slot, then
    each sequence's queries attend to that sequence's keys and values.

    The projections run over the whole pack at once (nearly all the FLOPs: they act on each token alone). Attention
    runs per sequence, not as one block-diagonal mask over the pack, which would cost N x (all sequences' keys)
    scores, almost all masked out: the decode tokens (one query each) in one batched call over their block tables
    padded to the longest, the padding masked (what a paged-attention kernel does), and each prefill chunk alone,
    causal within itself after all of its sequence's past."""
    q, k, v = attn.split_heads(x)  # each (1, heads, N, head_dim)
    cache.keys[layer][layout.slot_blocks, :, layout.slot_offsets] = k[0].transpose(0, 1)  # (N, heads, head_dim)
    cache.values[layer][layout.slot_blocks, :, layout.slot_offsets] = v[0].transpose(0, 1)
    y = torch.empty_like(q)
    if len(layout.decodes):
        keys, values = cache.gather(layer, layout.decode_tables)
        queries = q[0][:, layout.decodes].transpose(0, 1)[:, :, None]  # (decodes, heads, 1, head_dim)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=layout.decode_keys)
        y[0][:, layout.decodes] = out[:, :, 0].transpose(0, 1)
    for start, new, total, table in zip(layout.starts, layout.new, layout.totals, layout.tables):
        if new > 1:
            keys, values = cache.gather(layer, table[None])
            mask = attention_mask(None, total - new, new)  # causal within the chunk, all of the sequence's past
            y[:, :, start:start + new] = F.scaled_dot_product_attention(
                q[:, :, start:start + new], keys[:, :, :total], values[:, :, :total], attn_mask=mask)
    return attn.proj(y.transpose(1, 2).reshape(1, x.size(1), -1))


def forward_paged(model: GPT, cache: PagedKVCache, pack: list[tuple[Hashable, list[int]]],
                  last_only: bool = False) -> torch.Tensor:
    """Logits (N, vocab) of a packed batch: ``pack`` lists (sequence id, its new tokens), each sequence's tokens
    following the ones the cache holds for it; their keys and values are added to the cache (blocks allocated as
    needed, or PoolExhausted before any is). ``last_only``: only each sequence's last token, (len(pack), vocab).

    Eval mode only (no dropout), as forward_cached; positions past the model's context are refused."""
    if not pack:
        raise ValueError("the pack is empty: give at least one (sequence id, new tokens)")
    top = max(cache.length(seq) + len(tokens) for seq, tokens in pack) - 1
    if top >= model.config.block_size:
        raise ValueError(f"position {top} is past the model's context of {model.config.block_size} tokens: shorten "
                         "the prompt or generate fewer new tokens")
    layout = cache.layout(pack)
    idx = torch.tensor([t for _, tokens in pack for t in tokens], device=layout.positions.device)
    x = model.tok_emb(idx[None]) + model.pos_emb(layout.positions[None])
    for layer, block in enumerate(model.blocks):
        x = x + _attend_paged(block.attn, block.ln_1(x), cache, layer, layout)
        x = x + block.mlp(block.ln_2(x))
    cache.advance(layout)
    if last_only:
        x = x[:, [start + new - 1 for start, new in zip(layout.starts, layout.new)]]
    return model.lm_head(model.ln_f(x))[0]


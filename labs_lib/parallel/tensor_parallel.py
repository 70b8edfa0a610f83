"""Megatron-style tensor parallelism (Shoeybi et al. 2019) with sequence parallelism (Korthikanti et al. 2022).

``apply_tensor_parallel`` converts a single-device :class:`~labs_lib.models.gpt.GPT` in place, from outside (model.py
knows nothing of it). Each rank keeps exactly its shard ``r`` of every split weight, sliced from the full model,
so the result can be checked against one process::

    tp_group = dist.new_group([...])                       # or None: the whole world
    model = apply_tensor_parallel(GPT(config), tp_group, sequence_parallel=True)
    logits_shard, loss = model(idx, targets)               # the same loss as the single-device GPT
    loss.backward(); reduce_sequence_parallel_grads(model) # once per step: replicated weights' grads summed
    full = gather_full_state_dict(model, tp_group)         # full weights again (checkpoints, comparisons)

Per block: attention's fused qkv is column-parallel by heads (rank r holds q, k and v of heads r·h/t..), its
output projection row-parallel; the MLP's fc column-parallel and proj row-parallel. One all-reduce per
sublayer forward (g) and one backward (f). The token embedding is split by vocabulary rows and the tied lm_head
uses that same shard, so logits stay vocab-sharded and :func:`vocab_parallel_cross_entropy` never gathers them.

Sequence parallelism splits what lies *between* those regions (LayerNorms, dropouts, residual adds) along the
sequence: g becomes a reduce-scatter and f an all-gather, so activations there take 1/t of the memory for the
same traffic. The LayerNorm weights, row-parallel biases and position embedding are replicated but see only a
sequence shard: their grads are summed over the TP group once per step in one flat all-reduce, as Megatron's
finalize_model_grads does (:func:`reduce_sequence_parallel_grads`), not per parameter and micro-batch.
Every rule lives in a module (the embeddings split the sequence, ln_f + lm_head gather it), so a pipeline stage
built from these modules (pipeline.py) runs sequence-parallel too, and sends its (b, T/t, C) shard to the next.

Dropout: activations that differ between tensor-parallel ranks (a shard of heads, a shard of the sequence) draw
masks from a per-rank generator (``get_rng_tracker().fork()``); replicated activations use the default
generator, seeded alike on every rank so that they stay identical. Seed both with
:func:`tensor_parallel_manual_seed`.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from labs_lib.core.config import GPTConfig, padded_vocab
from labs_lib.core.dist import all_reduce_flat_
from labs_lib.models.gpt import GPT, CausalSelfAttention
from labs_lib.parallel.comms import (
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    group_rank,
    group_size,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)
from labs_lib.parallel.rng import get_rng_tracker

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "vocab_parallel_cross_entropy",
           "SequenceParallelPositionEmbedding", "SequenceParallelLayerNorm", "ShardedDropout",
           "TensorParallelSelfAttention", "TensorParallelGPT", "apply_tensor_parallel", "gather_full_state_dict",
           "check_tensor_parallel", "check_sequence_split", "shard_tensor", "unshard_tensors",
           "sequence_parallel_params", "reduce_sequence_parallel_grads"]

# ---------------------------------------------------------------------------------------------------------------
# Slicing full weights into shards and back. A split parameter carries ``tp_dim`` (the split dim) and
# ``tp_fused`` (how many matrices are stacked along it, e.g. 3 for q;k;v, each split on its own).


def shard_tensor(full: torch.Tensor, dim: int, rank: int, world: int, fused: int = 1) -> torch.Tensor:
    """Shard ``rank`` of ``world`` along ``dim``; with ``fused`` stacked matrices, slice ``rank`` of each."""
    return torch.cat([part.chunk(world, dim)[rank] for part in full.chunk(fused, dim)], dim).contiguous()


def unshard_tensors(shards: list[torch.Tensor], dim: int, fused: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_tensor`: the full tensor from every rank's shard, in rank order."""
    pieces = [shard.chunk(fused, dim) for shard in shards]
    return torch.cat([torch.cat([p[i] for p in pieces], dim) for i in range(fused)], dim)


def _split_parameter(full: torch.Tensor, dim: int, group, fused: int = 1) -> nn.Parameter:
    param = nn.Parameter(shard_tensor(full.detach(), dim, group_rank(group), group_size(group), fused))
    param.tp_dim, param.tp_fused = dim, fused
    return param


def _divisible(size: int, group, what: str, fix: str) -> None:
    if size % group_size(group):
        raise ValueError(f"{what}={size} is not divisible by the tensor-parallel size {group_size(group)}: {fix}")


def _pad_vocab_fix(vocab_size: int, tp: int) -> str:
    return f"pad the vocabulary to a multiple of tp*64 (vocab_size={padded_vocab(vocab_size, 64 * tp)})"


def check_tensor_parallel(config: GPTConfig, tp: int, seq_len: int | None = None,
                          sequence_parallel: bool = False) -> None:
    """Raise ValueError naming the fix if ``config`` cannot be split ``tp`` ways. Needs no process group, so it
    can run before spawning (``labs_lib.core.config.validate`` checks heads and vocabulary the same way)."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    need(tp >= 1, f"the tensor-parallel size must be >= 1, got {tp}")
    need(config.n_head % tp == 0, f"n_head={config.n_head} is not divisible by the tensor-parallel size {tp}: "
                                  "choose tp among the divisors of n_head")
    need(config.vocab_size % tp == 0, f"vocab_size={config.vocab_size} is not divisible by the tensor-parallel "
                                      f"size {tp}: {_pad_vocab_fix(config.vocab_size, tp)}")
    if sequence_parallel:
        check_sequence_split(seq_len or config.block_size, tp)


def check_sequence_split(seq_len: int, tp: int) -> None:
    """Raise ValueError naming the fix if a sequence of ``seq_len`` tokens cannot be split over ``tp`` ranks."""
    if seq_len % tp:
        raise ValueError(f"sequence parallelism splits the sequence over {tp} ranks, but its length {seq_len} is not "
                         f"divisible by {tp}: use a sequence length (block_size) that is a multiple of the "
                         "tensor-parallel size")


class ShardedDropout(nn.Dropout):
    """Dropout on activations that differ between TP ranks: the mask comes from the per-rank generator."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        with get_rng_tracker().fork():
            return super().forward(x)


# ---------------------------------------------------------------------------------------------------------------
# Layers.


class ColumnParallelLinear(nn.Module):
    """Y = X·Aᵀ with A split by output features: rank r computes Y's columns r (no communication in forward).

    The input enters through f (all-reduce of its grad), or with ``sequence_parallel`` through an all-gather of
    the sequence shards. ``gather_output`` all-gathers Y; usually Y feeds a RowParallelLinear instead. Built
    directly, every rank draws the full initial weight (seed the ranks alike) and keeps its slice."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group=None, gather_output: bool = False,
                 sequence_parallel: bool = False, fused: int = 1):
        super().__init__()
        _divisible(out_features // fused, group, "out_features", "choose sizes divisible by the TP size")
        self.group, self.gather_output, self.sequence_parallel = group, gather_output, sequence_parallel
        full = torch.empty(out_features, in_features)
        nn.init.normal_(full, std=0.02)
        self.weight = _split_parameter(full, 0, group, fused)
        self.bias = _split_parameter(torch.zeros(out_features), 0, group, fused) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group=None, sequence_parallel: bool = False, fused: int = 1,
                    gather_output: bool = False) -> ColumnParallelLinear:
        """This rank's shard of ``linear``. ``fused``: matrices stacked along the output (3 for q;k;v)."""
        with torch.device("meta"):  # no full-size init just to throw it away
            layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group, gather_output,
                        sequence_parallel, fused)
        layer.weight = _split_parameter(linear.weight, 0, group, fused)
        if linear.bias is not None:
            layer.bias = _split_parameter(linear.bias, 0, group, fused)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, self.group)
        else:
            x = copy_to_tensor_parallel_region(x, self.group)
        y = F.linear(x, self.weight, self.bias)
        return gather_from_tensor_parallel_region(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """Y = X·Aᵀ + b with A split by input features: rank r multiplies X's columns r, then the partial Ys are summed
    (g: all-reduce; with ``sequence_parallel`` a reduce-scatter). The bias is added once, after the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group=None,
                 input_is_parallel: bool = True, sequence_parallel: bool = False):
        super().__init__()
        _divisible(in_features, group, "in_features", "choose sizes divisible by the TP size")
        if sequence_parallel and not input_is_parallel:
            raise ValueError("sequence_parallel needs input_is_parallel=True (the input comes from a column layer)")
        self.group, self.input_is_parallel, self.sequence_parallel = group, input_is_parallel, sequence_parallel
        full = torch.empty(out_features, in_features)
        nn.init.normal_(full, std=0.02)
        self.weight = _split_parameter(full, 1, group)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group=None, sequence_parallel: bool = False,
                    input_is_parallel: bool = True) -> RowParallelLinear:
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group, input_is_parallel,
                        sequence_parallel)
        layer.weight = _split_parameter(linear.weight, 1, group)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_parallel_region(x, self.group)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y, self.group)
        else:
            y = reduce_from_tensor_parallel_region(y, self.group)
        # With sequence parallelism the bias meets this rank's tokens only: reduce_sequence_parallel_grads sums it.
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding split by vocabulary rows. Ids outside this rank's range look up zeros; the sum over ranks (g, or a
    reduce-scatter along the sequence with ``sequence_parallel``) gives every token its one real row."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group=None, sequence_parallel: bool = False):
        super().__init__()
        _divisible(num_embeddings, group, "vocab_size", _pad_vocab_fix(num_embeddings, group_size(group)))
        self.group, self.sequence_parallel = group, sequence_parallel
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        per_rank = num_embeddings // group_size(group)
        self.vocab_start, self.vocab_end = group_rank(group) * per_rank, (group_rank(group) + 1) * per_rank
        full = torch.empty(num_embeddings, embedding_dim)
        nn.init.normal_(full, std=0.02)
        self.weight = _split_parameter(full, 0, group)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, group=None, sequence_parallel: bool = False):
        with torch.device("meta"):
            layer = cls(embedding.num_embeddings, embedding.embedding_dim, group, sequence_parallel)
        layer.weight = _split_parameter(embedding.weight, 0, group)
        return layer

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        outside = (idx < self.vocab_start) | (idx >= self.vocab_end)
        local = F.embedding((idx - self.vocab_start).masked_fill(outside, 0), self.weight)
        local = local.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:  # the sequence is split here first: say how to fix a length that cannot be
            check_sequence_split(idx.size(1), group_size(self.group))
            return reduce_scatter_to_sequence_parallel_region(local, self.group)
        return reduce_from_tensor_parallel_region(local, self.group)


class SequenceParallelPositionEmbedding(nn.Embedding):
    """The position table, replicated, looked up for this rank's shard of the positions it is given (rank r:
    positions r·T/t ..), to add to that shard of the token embeddings. Each rank reads its own rows, so the table's
    grad is summed over the TP group (:func:`reduce_sequence_parallel_grads`)."""

    group = None

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, group=None) -> SequenceParallelPositionEmbedding:
        with torch.device("meta"):
            layer = cls(embedding.num_embeddings, embedding.embedding_dim)
        layer.weight, layer.group = embedding.weight, group
        return layer

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        shard = pos.chunk(group_size(self.group))[group_rank(self.group)]
        return F.embedding(shard, self.weight)


class SequenceParallelLayerNorm(nn.LayerNorm):
    """LayerNorm on a sequence shard. Its weights are replicated but see only this rank's tokens, so their grads
    are summed over the TP group (:func:`reduce_sequence_parallel_grads`)."""

    def __init__(self, *args, group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group

    @classmethod
    def from_layernorm(cls, ln: nn.LayerNorm, group=None) -> SequenceParallelLayerNorm:
        with torch.device("meta"):
            layer = cls(ln.normalized_shape, ln.eps, ln.elementwise_affine, ln.bias is not None, group=group)
        layer.weight, layer.bias = ln.weight, ln.bias
        return layer


def sequence_parallel_params(model: nn.Module) -> list[tuple[nn.Parameter, object]]:
    """(parameter, TP group) of every replicated weight that sees only this rank's sequence shard: the
    sequence-parallel LayerNorms' and position table's weights, the row-parallel layers' biases."""
    found = {}
    for m in model.modules():
        if isinstance(m, (SequenceParallelLayerNorm, SequenceParallelPositionEmbedding)):
            found.update({id(p): (p, m.group) for p in m.parameters(recurse=False)})
        elif isinstance(m, RowParallelLinear) and m.sequence_parallel and m.bias is not None:
            found[id(m.bias)] = (m.bias, m.group)
    return list(found.values())


@torch.no_grad()
def reduce_sequence_parallel_grads(model: nn.Module) -> None:
    """Sum the grads of :func:`sequence_parallel_params` over their TP group, in one flat all-reduce: call it once
    per step, after the last micro-batch's backward and before clipping (a no-op without sequence parallelism)."""
    params = [(p, group) for p, group in sequence_parallel_params(model) if p.grad is not None]
    if params and group_size(params[0][1]) > 1:
        all_reduce_flat_([p.grad for p, _ in params], params[0][1])


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy of vocab-sharded logits from all-reduces of (batch·seq) numbers only: the max, then the target
    logit and the sum of exps (one all-reduce for both). The full logits are never gathered."""

    @staticmethod
    def forward(ctx, logits, targets, group, ignore_index):
        ctx.logits_dtype = logits.dtype
        logits = logits.float()
        # Subtract the global max for stability (any constant cancels; the max keeps exp() <= 1).
        logits_max = logits.max(dim=-1).values
        if group_size(group) > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)
        # Each target's logit lives on one rank; the others contribute 0 to the sum.
        per_rank = logits.size(-1)
        start = group_rank(group) * per_rank
        outside = (targets < start) | (targets >= start + per_rank)
        local_targets = (targets - start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_targets.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        if group_size(group) > 1:
            both = torch.stack([target_logit, sum_exp])  # one all-reduce for the two sums
            dist.all_reduce(both, group=group)
            target_logit, sum_exp = both.unbind(0)
        valid = targets != ignore_index
        n_valid = valid.sum()
        loss = ((sum_exp.log() - target_logit) * valid).sum() / n_valid  # mean over non-ignored, as F.cross_entropy
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_targets, outside, valid, n_valid)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_targets, outside, valid, n_valid = ctx.saved_tensors
        # d loss / d logits = (softmax - one_hot(target)) / n_valid per non-ignored token; in place, as Megatron.
        grad = softmax.scatter_add_(-1, local_targets.unsqueeze(-1), -(~outside).to(softmax.dtype).unsqueeze(-1))
        grad.mul_((valid.to(grad.dtype) * grad_loss / n_valid).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, targets: torch.Tensor, group=None,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of (..., vocab/t) logits against (...) targets, ``ignore_index`` left out. In fp32 whatever
    the logits' dtype, as F.cross_entropy under autocast (a bf16 loss would log only 2-3 significant digits)."""
    logits = logits_shard.reshape(-1, logits_shard.size(-1))
    return _VocabParallelCrossEntropy.apply(logits, targets.reshape(-1), group, ignore_index)


# ---------------------------------------------------------------------------------------------------------------
# The GPT: attention and the top-level forward change; everything else is a module swap.


class TensorParallelSelfAttention(nn.Module):
    """CausalSelfAttention on this rank's heads. The math is model.py's; only the attention dropout differs: each
    rank holds different heads, so its mask comes from the per-rank generator."""

    def __init__(self, attn: CausalSelfAttention, group=None, sequence_parallel: bool = False):
        super().__init__()
        self.head_dim, self.dropout = attn.head_dim, attn.dropout
        self.qkv = ColumnParallelLinear.from_linear(attn.qkv, group, sequence_parallel, fused=3)
        self.proj = RowParallelLinear.from_linear(attn.proj, group, sequence_parallel)
        self.resid_drop = ShardedDropout(attn.resid_drop.p) if sequence_parallel else attn.resid_drop

    split_heads = CausalSelfAttention.split_heads  # q, k, v of this rank's heads (the KV-cached attention uses it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_heads(x)  # (B, heads/t, T, head_dim); T is the full sequence
        B, T = q.size(0), q.size(2)
        with get_rng_tracker().fork() if self.training and self.dropout > 0 else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=True)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, -1)))


class TensorParallelGPT(GPT):
    """The GPT after :func:`apply_tensor_parallel` (its class is swapped in place, as FSDP2's fully_shard does).

    ``forward(idx, targets)`` returns (vocab-sharded logits, the same loss as GPT); without targets, the full
    logits (sampling needs the whole vocabulary)."""

    tp_group = None
    sequence_parallel = False

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than the model's block_size={self.config.block_size}: "
                             "crop the input to the last block_size tokens")
        # (B, T, C); with sequence parallelism (B, T/t, C), this rank's tokens and their positions
        x = self.drop(self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab/t)
        if targets is None:
            return gather_from_tensor_parallel_region(logits, self.tp_group), None
        return logits, vocab_parallel_cross_entropy(logits, targets, self.tp_group)


def apply_tensor_parallel(model: GPT, tp_group=None, sequence_parallel: bool = False) -> TensorParallelGPT:
    """Turn ``model`` into rank ``group_rank(tp_group)``'s tensor-parallel shard, in place; returns it.

    Every rank must pass the same full weights (same seed): each keeps its own slice of them."""
    if isinstance(model, TensorParallelGPT):
        raise ValueError("this model is already tensor-parallel: apply_tensor_parallel to a single-device GPT")
    cfg, sp = model.config, sequence_parallel
    check_tensor_parallel(cfg, group_size(tp_group))
    model.tok_emb = VocabParallelEmbedding.from_embedding(model.tok_emb, tp_group, sp)
    with torch.device("meta"):
        model.lm_head = ColumnParallelLinear(cfg.n_embd, cfg.vocab_size, False, tp_group, sequence_parallel=sp)
    model.lm_head.weight = model.tok_emb.weight  # still tied: the lm_head's output rows are this rank's vocabulary
    for block in model.blocks:
        block.attn = TensorParallelSelfAttention(block.attn, tp_group, sp)
        block.mlp.fc = ColumnParallelLinear.from_linear(block.mlp.fc, tp_group, sp)
        block.mlp.proj = RowParallelLinear.from_linear(block.mlp.proj, tp_group, sp)
        if sp:
            block.ln_1 = SequenceParallelLayerNorm.from_layernorm(block.ln_1, tp_group)
            block.ln_2 = SequenceParallelLayerNorm.from_layernorm(block.ln_2, tp_group)
            block.mlp.drop = ShardedDropout(block.mlp.drop.p)
    if sp:
        model.pos_emb = SequenceParallelPositionEmbedding.from_embedding(model.pos_emb, tp_group)
        model.ln_f = SequenceParallelLayerNorm.from_layernorm(model.ln_f, tp_group)
        model.drop = ShardedDropout(model.drop.p)
    model.__class__ = TensorParallelGPT
    model.tp_group, model.sequence_parallel = tp_group, sp
    return model.train(model.training)  # the new modules take the model's train/eval mode


@torch.no_grad()
def gather_full_state_dict(tp_model: nn.Module, group=None, grads: bool = False) -> dict[str, torch.Tensor]:
    """The single-device state dict, on every rank: split tensors all-gathered and stitched back together.

    ``group`` defaults to the model's TP group (the world for bare layers). ``grads=True`` gathers the gradients
    instead, under the same names (None where a parameter has none)."""
    if group is None:
        group = getattr(tp_model, "tp_group", None)
    full = {}
    for name, p in tp_model.state_dict(keep_vars=True).items():
        t = p.grad if grads else p
        if t is None:
            full[name] = None
            continue
        t = t.detach()
        if hasattr(p, "tp_dim") and group_size(group) > 1:
            shards = [torch.empty_like(t) for _ in range(group_size(group))]
            dist.all_gather(shards, t.contiguous(), group=group)
            t = unshard_tensors(shards, p.tp_dim, p.tp_fused)
        full[name] = t.clone()
    return full

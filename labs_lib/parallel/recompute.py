"""Activation checkpointing, applied from outside the model: recompute in backward what is cheap to recompute.

    model = apply_activation_checkpointing(GPT(cfg), "selective")   # after TP, before compile and DP/ZeRO

**Activation checkpointing** (``--activation-checkpointing``) wraps every transformer block's ``forward`` in
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``; the module tree and its parameter names stay as
they are (checkpoints and ZeRO-3's hooks on the blocks see the same model).

    none       autograd keeps every tensor each operation saves for backward
    full       each block keeps only its input; backward runs the block's forward again first (one extra forward)
    selective  each block keeps its input and the outputs of its four matmuls (qkv, attention projection, MLP fc,
               MLP projection); backward recomputes only what lies between them: the two LayerNorms, the attention
               core (SDPA), GELU and the residual adds. Cheap (elementwise or memory-bound) but large: the LayerNorm
               outputs, the attention output and GELU's 4h-wide output are not stored. The matmuls are never run
               twice (torch's selective activation checkpointing with :func:`selective_policy`).

``selective`` is Korthikanti et al.'s idea (recompute what is cheap to recompute but big to keep) adapted to SDPA:
their selective recomputation drops the s×s attention scores, which SDPA's fused kernel already never stores (its
backward recomputes them from q, k and the softmax's log-sum-exp), so what is left worth dropping here is the LayerNorm
and GELU outputs. The MLP projection's output is cached though backward never reads it: an op-level policy cannot tell
one matmul from another (torchtitan's op-level policy has the same cost). labs_lib.measure.trace.ActivationMeter counts
what each mode keeps (the inputs a checkpoint saves, and the outputs the selective policy caches).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from labs_lib.core.config import CHECKPOINT_MODES
from labs_lib.measure.memory import ActivationMeter

__all__ = ["CHECKPOINT_MODES", "apply_activation_checkpointing", "selective_policy"]

# The matmuls whose outputs selective checkpointing keeps (nn.Linear runs as addmm/mm at the aten level).
MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.baddbmm.default}


# ------------------------------------------------------------------------------------------- activation checkpointing
def selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep matmul outputs, recompute everything else. Kept outputs are reported to any open ActivationMeter."""
    if op in MATMULS:
        out = getattr(ctx, "op_output", None)
        if isinstance(out, torch.Tensor):
            ActivationMeter.record(out)
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed(forward, mode: str, *args, **kwargs):
    context_fn = (functools.partial(create_selective_checkpoint_contexts, selective_policy) if mode == "selective"
                  else None)
    extra = {"context_fn": context_fn} if context_fn is not None else {}
    return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)


def apply_activation_checkpointing(model: nn.Module, mode: str = "full") -> nn.Module:
    """Checkpoint every transformer block (labs_lib.models.gpt.Block) inside ``model``, in place; returns ``model``.

    ``mode``: "none" (leave it), "full" or "selective" (see the module docstring). Works on the GPT, on a tensor-
    parallel GPT and on pipeline stages (it looks for Block modules); apply it before compile and DP/ZeRO."""
    from labs_lib.models.gpt import Block

    if mode not in CHECKPOINT_MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} does not exist: choose one of "
                         f"{', '.join(CHECKPOINT_MODES)}")
    if mode == "none":
        return model
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        raise ValueError(f"no transformer Block in {type(model).__name__}: nothing to checkpoint")
    for block in blocks:
        if "forward" in vars(block):
            raise ValueError("activation checkpointing is already applied to this model: apply it once")
        block.forward = functools.partial(_checkpointed, block.forward, mode)  # the bound Block.forward
    return model

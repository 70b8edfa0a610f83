"""labs_lib.estimates.activations.labs_activation_bytes against what autograd really keeps on 2 tensor-parallel
gloo ranks: every recompute mode, with and without sequence parallelism, fp32 and bf16 autocast, to the byte."""

import itertools

import torch
from multiproc import run_ranks

from labs_lib.core.config import GPTConfig
from labs_lib.estimates.activations import labs_activation_bytes
from labs_lib.measure.memory import ActivationMeter
from labs_lib.models.gpt import GPT
from labs_lib.parallel.recompute import apply_activation_checkpointing
from labs_lib.parallel.tensor_parallel import apply_tensor_parallel

CFG = GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=64)
MICRO_BATCH = 4
CASES = list(itertools.product((False, True), ("none", "selective", "full"), ("fp32", "bf16")))


def measure_block(rank, world_size):
    """(sequence_parallel, mode, dtype, bytes kept by one block's forward) on this rank."""
    rows = []
    for sp, mode, dtype in CASES:
        torch.manual_seed(0)
        model = apply_activation_checkpointing(apply_tensor_parallel(GPT(CFG), None, sequence_parallel=sp), mode)
        seq = CFG.block_size // (world_size if sp else 1)  # a block of a sequence-parallel GPT gets a shard
        x = torch.randn(MICRO_BATCH, seq, CFG.n_embd, requires_grad=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bf16"), ActivationMeter(model) as meter:
            y = model.blocks[0](x)
        y.float().sum().backward()  # release what was kept (and prove backward runs with it)
        rows.append((sp, mode, dtype, meter.bytes))
    return rows


def test_labs_tensor_parallel_activations_are_measured_exactly():
    for rows in run_ranks(measure_block, 2):
        for sp, mode, dtype, measured in rows:
            predicted = labs_activation_bytes(CFG, MICRO_BATCH, dtype=dtype, tp=2, sequence_parallel=sp,
                                              recompute=mode)
            assert measured == predicted, (sp, mode, dtype)

"""The planner's tensor-parallel formulas (lab 04): activation memory, parameters per rank against the real shards,
communication per layer; and trace.collectives, which the lab uses to count a run's collectives."""

import json

import pytest
import torch
from multiproc import run_ranks

from labs_lib.core.config import GPTConfig
from labs_lib.estimates import memory, parallel
from labs_lib.measure import trace

CFG = GPTConfig(vocab_size=128, block_size=16, n_layer=2, n_head=4, n_embd=32)


def test_activation_formulas_reduce_to_the_single_device_one():
    cfg = GPTConfig.preset("gpt3-175b")
    s, h, a = cfg.block_size, cfg.n_embd, cfg.n_head
    alone = memory.activation_bytes_per_layer(cfg)
    assert alone == s * h * (34 + 5 * a * s / h)
    assert memory.activation_bytes_per_layer(cfg, tp=1) == alone
    assert memory.activation_bytes_per_layer(cfg, tp=1, sequence_parallel=True) == alone
    assert memory.activation_bytes_per_layer(cfg, tp=8) == pytest.approx(s * h * (10 + 24 / 8 + 5 * a * s / (h * 8)))
    assert memory.activation_bytes_per_layer(cfg, tp=8, sequence_parallel=True) == pytest.approx(alone / 8)
    # tensor parallelism alone never gets below the 10·s·b·h that stays whole on every rank
    assert memory.activation_bytes_per_layer(cfg, tp=10**6) > 10 * s * h
    with pytest.raises(ValueError, match="tp must be"):
        memory.activation_bytes_per_layer(cfg, tp=0)


def test_comm_per_layer():
    comm = parallel.tensor_parallel_comm_per_layer(CFG, tp=4, micro_batch=2, bytes_per_element=4)
    tensor = 2 * CFG.block_size * CFG.n_embd * 4
    assert comm["all-reduces forward"] == comm["all-reduces backward"] == 2
    assert comm["tensor bytes"] == tensor
    assert comm["bytes sent per rank"] == pytest.approx(4 * 2 * 3 / 4 * tensor)
    sp = parallel.tensor_parallel_comm_per_layer(CFG, tp=4, micro_batch=2, bytes_per_element=4, sequence_parallel=True)
    assert sp["bytes sent per rank"] == comm["bytes sent per rank"]
    assert parallel.tensor_parallel_comm_per_layer(CFG, tp=1)["bytes sent per rank"] == 0


def _held_by_rank(rank, world_size):
    from labs_lib.models.gpt import GPT
    from labs_lib.parallel.tensor_parallel import apply_tensor_parallel

    torch.manual_seed(0)
    model = apply_tensor_parallel(GPT(CFG))
    return sum(p.numel() for p in model.parameters())  # parameters() lists the tied weight once


@pytest.mark.slow
def test_param_count_per_rank_matches_the_real_shards():
    assert parallel.tensor_parallel_param_count(CFG, 1) == memory.param_count(CFG)
    for tp in (2, 4):
        held = run_ranks(_held_by_rank, tp)
        assert held == [parallel.tensor_parallel_param_count(CFG, tp)] * tp


def test_collectives_reads_the_profiled_step(tmp_path):
    def op(name, ts, dims):
        return {"ph": "X", "name": name, "ts": ts, "dur": 1, "args": {"Input Dims": dims}}

    events = [op("c10d::allreduce_", 5, [[[9]]]),  # before the profiled step: left out
              {"ph": "X", "name": "ProfilerStep#3", "ts": 10, "dur": 100},
              op("c10d::allreduce_", 20, [[[2, 3, 4]], [], []]), op("aten::mm", 30, [[2, 3], [3, 4]]),
              op("c10d::_allgather_base_", 40, [[2, 6], [1, 6]]), op("c10d::allreduce_", 50, [[[]]])]
    path = tmp_path / "rank0.trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    assert trace.collectives(path) == [{"op": "allreduce_", "shape": (2, 3, 4), "numel": 24},
                                           {"op": "_allgather_base_", "shape": (2, 6), "numel": 12},
                                           {"op": "allreduce_", "shape": (), "numel": 1}]
    path.write_text(json.dumps({"traceEvents": events[:1]}))
    with pytest.raises(ValueError, match="no profiled step"):
        trace.collectives(path)

"""Profiling tools measured against what they must report: traces, the time split, MFU, saved activations."""

import json

import pytest
import torch
import torch.nn as nn

from labs_lib.core.config import GPTConfig
from labs_lib.core.runs import read_metrics
from labs_lib.measure.flops import mfu, peak_flops
from labs_lib.measure.memory import ActivationMeter
from labs_lib.measure.trace import step_breakdown, trace_files
from labs_lib.models.gpt import GPT, MLP

from conftest import run_train


def test_activation_meter_linear():
    layer = nn.Linear(32, 48)
    x = torch.randn(4, 10, 32, requires_grad=True)
    with ActivationMeter(layer) as meter:
        layer(x)
    assert meter.bytes == 4 * 10 * 32 * 4  # only the input is kept (for the weight gradient); the weight is a param


def test_activation_meter_mlp_block():
    cfg = GPTConfig(n_embd=16, n_head=2, n_layer=1, vocab_size=64, block_size=8)
    mlp = MLP(cfg).eval()
    x = torch.randn(3, 8, 16, requires_grad=True)
    with ActivationMeter(mlp) as meter:
        mlp(x)
    b, t, c = 3, 8, 16
    # fc keeps its input (b·t·c), GELU keeps its input (b·t·4c), proj keeps GELU's output (b·t·4c); fp32
    assert meter.bytes == 4 * (b * t * c + b * t * 4 * c + b * t * 4 * c)


def test_activation_meter_counts_shared_storage_once():
    x = torch.randn(100, requires_grad=True)
    with ActivationMeter() as meter:
        y = x * 2  # multiplying by a constant keeps no tensor
        (y * y).sum()  # y is saved twice (as both factors): one buffer
    assert meter.bytes == 100 * 4


def test_mfu_and_peak():
    peak, source = peak_flops("cpu")
    assert peak > 1e8 and "measured" in source
    model = GPT(GPTConfig(n_embd=64, n_head=2, n_layer=2, vocab_size=512, block_size=64))
    assert 0 < mfu(model.flops_per_token(), 1000.0, peak) <= 1


@pytest.mark.slow
def test_two_rank_trace(tmp_path, ci_data):
    out = tmp_path / "prof"
    run_train(out, nproc=2, max_steps=6, trace_steps=3, eval_interval=0, checkpoint_interval=0, batch_size=4)
    files = trace_files(out / "trace")
    assert sorted(files) == [0, 1]
    for rank, path in files.items():
        json.loads(path.read_text())  # valid Chrome trace JSON
        ops = json.loads((out / "trace" / f"ops_rank{rank}.json").read_text())
        names = [o["name"] for o in ops]
        assert any("mm" in n for n in names[:15]), names  # matmuls are among the top operators
        assert any(o["flops"] > 0 for o in ops)
        rows = step_breakdown(path)
        assert len(rows) == 3
        for r in rows:
            assert r["comm_ms"] > 0 and r["compute_ms"] > 0
            accounted = r["compute_ms"] + r["comm_ms"] - r["overlap_ms"] + r["idle_ms"]
            assert accounted == pytest.approx(r["total_ms"], rel=0.05)
            assert r["idle_ms"] >= -1e-6
    tokens_per_s = read_metrics(out)[-1]["tokens_per_s"]
    model = GPT(GPTConfig(n_embd=64, n_head=2, n_layer=2, vocab_size=512, block_size=64))
    assert 0 < mfu(model.flops_per_token(), tokens_per_s, peak_flops("cpu")[0]) <= 1


def test_collective_share_is_the_union_of_that_collectives_time_within_the_steps(tmp_path):
    import json

    from labs_lib.measure.trace import collective_share

    events = [{"ph": "X", "name": "ProfilerStep#2", "ts": 0, "dur": 100, "tid": 1},
              {"ph": "X", "name": "ProfilerStep#3", "ts": 200, "dur": 100, "tid": 1},
              {"ph": "X", "name": "gloo:all_to_all", "ts": 10, "dur": 20, "tid": 2},
              {"ph": "X", "name": "c10d::alltoall_base_", "ts": 20, "dur": 20, "tid": 1},  # overlaps: counted once
              {"ph": "X", "name": "gloo:all_to_all", "ts": 290, "dur": 40, "tid": 2},  # half inside step 3
              {"ph": "X", "name": "gloo:all_reduce", "ts": 50, "dur": 40, "tid": 2}]  # another collective
    path = tmp_path / "rank0.pt.trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    assert collective_share(path, ("alltoall", "all_to_all")) == (30 + 10) / 200

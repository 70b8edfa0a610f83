"""Per-rank memory measured on every layout (the numbers the planner is validated against): the real training CLI
under torchrun records ``mem_rank<r>`` (params, grads, optimizer held after the step) on data-parallel and
tensor-parallel runs, and with ``--measure-activations`` ``act_rank<r>`` (the peak bytes kept for backward), equal
to the formulas computed independently here."""

import pytest
import torch

from labs_lib.core.config import get_profile
from labs_lib.core.runs import read_metrics
from labs_lib.estimates.memory import activation_bytes_formula
from labs_lib.estimates.parallel import tensor_parallel_param_count
from labs_lib.measure.memory import ActivationMeter, ActivationPeak
from labs_lib.models.gpt import GPT

from conftest import run_train

CFG = get_profile("ci").model
BATCH = 8  # per rank
STEPS = dict(max_steps=2, warmup_steps=1, eval_interval=0, checkpoint_interval=0, batch_size=BATCH)


def head_bytes(b: int, tp: int = 1) -> int:
    """What the meter sees outside the blocks, fp32, per rank (the blocks are activation_bytes_formula's): the
    final LayerNorm's fp32 input and the lm_head's input, its output (8sbh); that LayerNorm's mean and 1/std (8sb);
    cross-entropy's log-softmax output, this rank's vocabulary shard (4sbV/t); the batch's int64 token windows the
    embedding keeps (the ids and the targets are views of one (b, s + 1) tensor: 8b(s + 1)); the loss's contiguous
    copy of the targets (8sb); the positions (8s); the loss's 4-byte total weight. Under TP the vocab-parallel loss
    keeps about 11 bytes per token more (its masks and shard indices), left out here."""
    s, h, v = CFG.block_size, CFG.n_embd, CFG.vocab_size
    return 8 * s * b * h + 8 * s * b + 4 * s * b * v // tp + 8 * b * (s + 1) + 8 * s * b + 8 * s + 4


def tp_block_bytes(b: int, tp: int) -> float:
    """One block on one of ``tp`` ranks: activation_bytes_formula less what tensor parallelism splits, q, k, v, SDPA's
    output, the fc and GELU outputs (12 widths of h, fp32: 48sbh) and SDPA's log-sum-exp (4asb), split 1/t; the fp32
    residual stream, LayerNorm outputs (the column-parallel inputs) and LayerNorm statistics stay whole."""
    s, h, a = CFG.block_size, CFG.n_embd, CFG.n_head
    return activation_bytes_formula(CFG, b) - (1 - 1 / tp) * (48 * s * b * h + 4 * a * s * b)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ci_data):
    root = tmp_path_factory.mktemp("measured")
    run_train(root / "dp2", nproc=2, measure_activations=True, **STEPS)
    run_train(root / "tp2", nproc=2, measure_activations=True, tp=2, **STEPS)
    return root


def _last(out):
    return read_metrics(out)[-1]


def _check_states(held: dict, params: int) -> None:
    """fp32 AdamW: every parameter's 4 bytes, its gradient's 4 (measured before zero_grad), m and v's 8."""
    assert held == {"params": 4 * params, "grads": 4 * params, "optimizer": 8 * params}, (held, params)


@pytest.mark.slow
def test_data_parallel_ranks_hold_and_keep_what_the_formulas_say(runs):
    record = _last(runs / "dp2")
    expected = CFG.n_layer * activation_bytes_formula(CFG, BATCH) + head_bytes(BATCH)
    for rank in (0, 1):
        _check_states(record[f"mem_rank{rank}"], GPT(CFG).num_params())
        assert record[f"act_rank{rank}"] == pytest.approx(expected, rel=1e-3), (rank, record[f"act_rank{rank}"])


@pytest.mark.slow
def test_tensor_parallel_ranks_hold_their_shard_and_keep_its_activations(runs):
    record = _last(runs / "tp2")
    expected = CFG.n_layer * tp_block_bytes(BATCH, 2) + head_bytes(BATCH, tp=2)
    for rank in (0, 1):
        _check_states(record[f"mem_rank{rank}"], tensor_parallel_param_count(CFG, 2))
        assert record[f"act_rank{rank}"] == pytest.approx(expected, rel=0.01), (rank, record[f"act_rank{rank}"])
    assert record["act_rank0"] < 0.75 * _last(runs / "dp2")["act_rank0"]  # the split tensors are most of it


@pytest.mark.slow
def test_pipeline_stages_keep_their_micro_batches_in_flight(tmp_path, ci_data):
    """1F1B on 2 stages, 2 micro-batches of 4: the first stage holds both forwards before its first backward, the
    last one at a time (labs_lib.parallel.pipeline's schedule meters every forward when the flag is on)."""
    run_train(tmp_path / "pp2", nproc=2, measure_activations=True, pp=2, micro_batches=2, **STEPS)
    record = _last(tmp_path / "pp2")
    s, h, v, b = CFG.block_size, CFG.n_embd, CFG.vocab_size, BATCH // 2
    block = activation_bytes_formula(CFG, b)  # one layer per stage
    # Each micro-batch's ids are a view of the whole batch's token windows: its meter counts that storage whole.
    first = 2 * (block + 8 * BATCH * (s + 1) + 8 * s)
    last = block + 8 * s * b * h + 8 * s * b + 4 * s * b * v + 8 * s * b + 4  # head_bytes without the embedding's
    assert record["act_rank0"] == pytest.approx(first, rel=1e-3) and record["act_rank1"] == pytest.approx(last, 1e-3)
    held = [record[f"mem_rank{r}"] for r in (0, 1)]
    # Each stage holds its own layers; the tied embedding is on both (the first reads tokens, the last writes them).
    assert held[0]["params"] + held[1]["params"] == 4 * (GPT(CFG).num_params() + v * h)
    assert all(r["optimizer"] == 2 * r["params"] for r in held)


def test_without_the_flag_nothing_is_metered():
    model = torch.nn.Linear(16, 16)
    off = ActivationPeak(model, enabled=False)
    with off.forward():
        assert not ActivationMeter._open  # no hooks are installed
        model(torch.randn(4, 16)).sum().backward()
    assert off.take() == {}


def test_activation_peak_is_the_largest_forward():
    model = torch.nn.Linear(16, 16)
    peak = ActivationPeak(model)
    for batch in (4, 2):  # two micro-batches: the peak is the larger one's input, not their sum
        with peak.forward():
            loss = model(torch.randn(batch, 16)).sum()
        loss.backward()
    assert peak.take() == {"activations": 4 * 16 * 4} and peak.take() == {"activations": 0}

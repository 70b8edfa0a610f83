"""Pipeline parallelism checked against one process, against torch.distributed.pipelining, and against the formulas.

Every multi-rank check runs on real gloo ranks (tests/multiproc.py) with a tiny fp32 GPT without dropout:
  * GPipe, 1F1B and interleaved 1F1B on 2 and 4 ranks give the single-process losses over 5 AdamW steps and its
    gradients;
  * torch's ScheduleGPipe / Schedule1F1B / ScheduleInterleaved1F1B over the same stage modules give our losses;
  * the measured bubble matches (p − 1)/(v·m + p − 1): the share of the step's wall-clock time a stage does not
    compute (GPipe's convention; Megatron's (p − 1)/m divides by the ideal time instead);
  * 1F1B keeps at most p − r micro-batches' activations on stage r, GPipe all m.
"""

from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from multiproc import run_ranks

from labs_lib.core.config import GPTConfig
from labs_lib.estimates.parallel import bubble_fraction
from labs_lib.models.gpt import GPT
from labs_lib.parallel.pipeline import GPipe, OneFOneB, check_pipeline, gpt_loss, make_schedule, partition_gpt

pytestmark = pytest.mark.slow

CFG = GPTConfig(vocab_size=128, block_size=16, n_layer=4, n_head=2, n_embd=32, dropout=0.0)
BATCH, STEPS, LR = 8, 5, 1e-2


def _model(chunks: int = 1) -> GPT:
    """The tiny GPT, with 4 layers per model chunk (interleaving p = 4 ranks x v = 2 chunks needs 8 layers)."""
    torch.manual_seed(0)
    return GPT(replace(CFG, n_layer=4 * chunks))


def _stages(rank, world_size, chunks=1):
    model = _model(chunks)
    return [partition_gpt(model, rank, world_size, chunk=c, chunks=chunks) for c in range(chunks)]


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, CFG.vocab_size, (BATCH, CFG.block_size), generator=g),
             torch.randint(0, CFG.vocab_size, (BATCH, CFG.block_size), generator=g)) for _ in range(STEPS)]


def _reference(chunks: int = 1) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses of 5 full-batch AdamW steps in one process, and the gradients of the first step."""
    model = _model(chunks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, grads = [], {}
    for step, (x, y) in enumerate(_batches()):
        loss = model(x, y)[1]
        loss.backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, grads


def _train(rank, world_size, schedule_name, micro_batches, chunks):
    """Our schedule for 5 AdamW steps: (losses, this rank's first-step gradients by the full model's names)."""
    stages = _stages(rank, world_size, chunks)
    schedule = make_schedule(schedule_name, stages, micro_batches)
    optimizer = torch.optim.AdamW(nn.ModuleList(stages).parameters(), lr=LR)
    losses, grads = [], {}
    for step, (x, y) in enumerate(_batches()):
        losses.append(schedule.step(x, y))
        if step == 0:
            # The last stage's copy of the tied matrix is the full model's tok_emb.weight. Numpy arrays, not tensors,
            # go back to the test: torch would share tensors through files the exiting rank takes away.
            grads = {n.replace("lm_head.weight", "tok_emb.weight"): p.grad.numpy().copy()
                     for stage in stages for n, p in stage.named_parameters()}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, grads


def _train_configs(rank, world_size, configs):
    return {config: _train(rank, world_size, *config) for config in configs}


def _configs(pp):
    """(schedule, micro-batches, chunks): every valid schedule with m in {1, 2, 4} (and 8 when interleaved)."""
    return ([("gpipe", m, 1) for m in (1, 2, 4)] + [("1f1b", m, 1) for m in (1, 2, 4) if m >= pp]
            + [("interleaved-1f1b", m, 2) for m in (2, 4, 8) if m % pp == 0])


@pytest.mark.parametrize("pp", [2, 4])
def test_pipeline_matches_single_process(pp):
    references = {chunks: _reference(chunks) for chunks in (1, 2)}
    results = run_ranks(_train_configs, pp, _configs(pp))
    for config in _configs(pp):
        ref_losses, ref_grads = references[config[2]]
        per_rank = [r[config] for r in results]
        for losses, _ in per_rank:  # every rank reports the broadcast loss
            assert losses == pytest.approx(ref_losses, abs=1e-5), config
        grads: dict[str, torch.Tensor] = {}
        for _, stage_grads in per_rank:
            for name, array in stage_grads.items():
                grad = torch.from_numpy(array)
                if name in grads:  # the tied matrix on the first and last stage: the same full gradient on both
                    torch.testing.assert_close(grads[name], grad, rtol=0, atol=0)
                grads[name] = grad
        assert grads.keys() == ref_grads.keys(), config
        for name, grad in ref_grads.items():
            error = (grads[name] - grad).abs().max().item()
            assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-6), (config, name, error)


def _train_torch(rank, world_size, schedule_name, micro_batches, chunks):
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    stages = _stages(rank, world_size, chunks)
    torch_stages = [PipelineStage(s, s.stage_index, world_size * chunks, torch.device("cpu")) for s in stages]
    # scale_grads=True (the default) divides the summed micro-batch gradients by m: our 1/m on each loss.
    if schedule_name == "interleaved-1f1b":
        schedule = ScheduleInterleaved1F1B(torch_stages, micro_batches, loss_fn=gpt_loss)
    else:
        schedule_cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule_name]
        schedule = schedule_cls(torch_stages[0], micro_batches, loss_fn=gpt_loss)
    optimizer = torch.optim.AdamW(nn.ModuleList(stages).parameters(), lr=LR)
    has_first, has_last = stages[0].is_first, stages[-1].is_last
    losses = []
    for x, y in _batches():
        micro_losses: list[torch.Tensor] = []
        if has_first:
            schedule.step(x)
        elif has_last:
            schedule.step(target=y, losses=micro_losses)
        else:
            schedule.step()
        for stage in stages:
            stage.sync_tied_grads()  # torch's stages know nothing of the tied embedding
        loss = torch.stack(micro_losses).mean().detach() if has_last else torch.zeros(())
        torch.distributed.broadcast(loss, src=world_size - 1)
        losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses


def _ours_and_torch(rank, world_size, configs):
    return {config: (_train(rank, world_size, *config)[0], _train_torch(rank, world_size, *config))
            for config in configs}


@pytest.mark.parametrize("pp", [2, 4])
def test_torch_pipelining_gives_our_losses(pp):
    configs = [("gpipe", 4, 1), ("1f1b", 4, 1), ("interleaved-1f1b", 4, 2)]
    results = run_ranks(_ours_and_torch, pp, configs)
    for config in configs:
        for ours, theirs in (r[config] for r in results):
            assert theirs == pytest.approx(ours, abs=1e-5), config


def _bubble(rank, world_size, configs, delay_s):
    """Idle fraction of this rank per (schedule, m, chunks): the smaller of steps 2 and 3 (step 1 warms up). Other
    processes on the shared cores can only add idle time, so the better step is the closer measurement."""
    fractions = {}
    for name, m, chunks in configs:
        stages = _stages(rank, world_size, chunks)
        # The same compute per rank whatever v: each of the v chunks is 1/v of the rank's layers.
        schedule = make_schedule(name, stages, m, compute_delay_s=delay_s / chunks)
        measured = []
        for x, y in _batches()[:3]:
            schedule.step(x, y)
            for stage in stages:
                stage.zero_grad(set_to_none=True)
            measured.append(schedule.idle_fraction())
        fractions[name, m, chunks] = min(measured[1:])
    return fractions


def test_bubble_matches_formula():
    """p = 4 balanced stages (a 40 ms forward / 80 ms backward delay per rank dominates the tiny model's compute and
    the messages): every stage idles (p − 1)/(v·m + p − 1) of the step (v = 1 for GPipe and 1F1B).

    Stage r waits r·t_f for its first activation, (p − 1 − r)(t_f + t_b) between its last forward and first
    backward (GPipe) and r·t_b after its last backward for stage 0 to finish: (p − 1)(t_f + t_b) on every stage, so
    each rank is compared with the formula on its own (and the mean over ranks printed alongside).

    The measurement lands slightly above the formula (about +1 point, +2.5 interleaved, on 2 busy cores): every
    message's latency lies on the critical path, and interleaving sends v times more of them."""
    p = 4
    configs = ([("gpipe", m, 1) for m in (1, 2, 4, 8)] + [("1f1b", m, 1) for m in (4, 8)]
               + [("interleaved-1f1b", m, 2) for m in (4, 8)])
    results = run_ranks(_bubble, p, configs, 0.04)
    for config in configs:
        measured = [r[config] for r in results]
        expected = bubble_fraction(p, config[1], config[2])
        print(f"{config}: formula {expected:.3f}, measured per rank {[round(f, 3) for f in measured]}, "
              f"mean {sum(measured) / p:.3f}")
        for rank, fraction in enumerate(measured):
            assert fraction == pytest.approx(expected, abs=0.05), (config, rank)
    # Interleaving v = 2 chunks shrinks the bubble at the same m (measured, not just by the formula).
    for m in (4, 8):
        assert max(r["interleaved-1f1b", m, 2] for r in results) < min(r["1f1b", m, 1] for r in results)


def _activations(rank, world_size, micro_batches):
    x, y = _batches()[0]
    peaks, orders = {}, {}
    for name, chunks in (("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2)):
        stages = _stages(rank, world_size, chunks)
        schedule = make_schedule(name, stages, micro_batches)
        schedule.step(x, y)
        peaks[name] = (schedule.peak_in_flight, schedule.peak_activation_bytes)
        orders[name] = [f"{e.kind[0].upper()}{e.micro_batch}" for e in schedule.timeline
                        if e.kind in ("forward", "backward")]
        assert all(a.end <= b.start for a, b in zip(schedule.timeline, schedule.timeline[1:]))
    return peaks, orders


def test_1f1b_keeps_fewer_activations_than_gpipe():
    p, m, v = 4, 8, 2
    results = run_ranks(_activations, p, m)
    for rank, (peaks, orders) in enumerate(results):
        (gpipe_live, gpipe_bytes), (ofob_live, ofob_bytes) = peaks["gpipe"], peaks["1f1b"]
        assert gpipe_live == m and ofob_live == p - rank
        # Each micro-batch saves the same bytes on a stage, so memory follows the count of live micro-batches.
        assert gpipe_bytes > 0 and ofob_bytes * m == gpipe_bytes * (p - rank)
        assert orders["gpipe"] == [f"F{i}" for i in range(m)] + [f"B{i}" for i in range(m)]
        warmup = p - rank - 1  # 1F1B: p − r − 1 forwards, then the first backward right after the next forward
        assert orders["1f1b"][:warmup + 2] == [f"F{i}" for i in range(warmup + 1)] + ["B0"]
        # Interleaved: a longer warm-up of (chunk, micro-batch) units, each 1/v of the rank's layers.
        assert peaks["interleaved-1f1b"][0] == min(2 * (p - rank - 1) + (v - 1) * p + 1, m * v)
    assert results[0][1]["1f1b"] == "F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7".split()
    assert results[p - 1][1]["1f1b"] == [f"{k}{i}" for i in range(m) for k in "FB"]


def test_single_stage_is_the_model():
    model = _model()
    stage = partition_gpt(model, 0, 1)
    assert [n for n, _ in stage.named_parameters()] == [n for n, _ in model.named_parameters()]
    x, y = _batches()[0]
    loss = GPipe(stage, 4).step(x, y)
    stage_grads = [p.grad.clone() for p in stage.parameters()]
    model.zero_grad(set_to_none=True)
    ref = model(x, y)[1]
    ref.backward()
    assert loss == pytest.approx(ref.item(), abs=1e-6)
    for grad, p in zip(stage_grads, model.parameters()):
        torch.testing.assert_close(grad, p.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("args, fix", [
    (dict(n_layer=6, pp=4, batch_size=8, micro_batches=4), "choose pp among the divisors of n_layer"),
    (dict(n_layer=4, pp=4, batch_size=8, micro_batches=2), "raise --micro-batches to at least 4 or use --schedule "
                                                           "gpipe"),
    (dict(n_layer=4, pp=2, batch_size=8, micro_batches=3, schedule="gpipe"), "choose --micro-batches among the "
                                                                            "divisors of the batch size"),
    (dict(n_layer=4, pp=2, batch_size=8, micro_batches=2, schedule="zero-bubble"), "one of gpipe, 1f1b"),
    (dict(n_layer=8, pp=4, batch_size=8, micro_batches=2, schedule="interleaved-1f1b", chunks=2), "multiple of 4"),
    (dict(n_layer=4, pp=4, batch_size=8, micro_batches=4, schedule="interleaved-1f1b", chunks=2),
     "not divisible by pp\\*chunks=8"),
    (dict(n_layer=4, pp=2, batch_size=8, micro_batches=4, schedule="1f1b", chunks=2), "use --schedule interleaved"),
])
def test_bad_configs_name_the_fix(args, fix):
    with pytest.raises(ValueError, match=fix):
        check_pipeline(**args)


def test_schedules_validate_before_running():
    with pytest.raises(ValueError, match="divisors of n_layer"):
        partition_gpt(_model(), 0, 3)
    stage = partition_gpt(_model(), 0, 1)
    x, y = _batches()[0]
    with pytest.raises(ValueError, match="divisors of the batch size"):
        OneFOneB(stage, 3).step(x, y)
    assert stage.tok_emb.weight.grad is None  # nothing ran

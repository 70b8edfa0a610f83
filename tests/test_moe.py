"""Mixture of experts by hand (labs_lib.models.moe, labs_lib.parallel.experts): routing, capacity and drops, the
auxiliary losses against hand-computed values, and expert parallelism over 2 and 4 gloo ranks against one process."""

import math

import pytest
import torch

from labs_lib.models.moe import (
    MoEMLP,
    assign,
    check_moe,
    expert_capacity,
    load_balancing_loss,
    router_z_loss,
)
from tests.multiproc import run_ranks

TOL = dict(rtol=1e-5, atol=1e-6)  # fp32: the same sums in another order


def test_load_balancing_loss_by_hand():
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]])
    first = torch.tensor([0, 0, 1, 0])
    # f = (3/4, 1/4), P = (0.6, 0.4): E * sum f P = 2 * (0.45 + 0.1)
    assert load_balancing_loss(probs, first).item() == pytest.approx(1.1)
    uniform = torch.full((8, 4), 0.25)
    assert load_balancing_loss(uniform, torch.arange(8) % 4).item() == pytest.approx(1.0)  # balanced: 1


def test_router_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert router_z_loss(logits).item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)


def test_capacity_drops_exactly_the_tokens_over_it():
    index = torch.tensor([[0], [0], [0], [1], [0], [2]])
    capacity = expert_capacity(6, 4, 1, 1.0)
    assert capacity == 2
    r = assign(index, torch.ones(6, 1), 4, capacity)
    assert r.counts == [2, 1, 1, 0] and r.dropped == 2 and r.assignments == 6
    assert r.token.tolist() == [0, 1, 3, 5]  # tokens 2 and 4 came third and fourth to expert 0


def test_first_choices_take_slots_before_second_choices():
    index = torch.tensor([[1, 0], [0, 1], [0, 1]])  # token 0 wants expert 0 only as its second choice
    r = assign(index, torch.ones(3, 2), 2, capacity=2)
    assert r.token[:r.counts[0]].tolist() == [1, 2] and r.dropped == 2  # expert 1: tokens 0 and 1; 2's 2nd dropped
    assert r.token[r.counts[0]:].tolist() == [0, 1]


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_mlp_is_the_gated_sum_of_its_experts(top_k):
    torch.manual_seed(0)
    moe = MoEMLP(16, 4, top_k=top_k, capacity_factor=None)
    x = torch.randn(12, 16)
    probs = moe.gate(x).softmax(-1)
    top, idx = probs.topk(top_k, -1)
    gates = top / top.sum(-1, keepdim=True) if top_k > 1 else top
    expected = torch.stack([sum(gates[t, j] * moe.experts.expert(int(idx[t, j]), x[t:t + 1])[0]
                                for j in range(top_k)) for t in range(12)])
    torch.testing.assert_close(moe(x), expected, **TOL)
    assert moe.last_routing.dropped == 0 and sum(moe.last_routing.counts) == 12 * top_k


def test_a_dropped_token_gets_nothing_from_the_layer():
    torch.manual_seed(0)
    moe = MoEMLP(8, 2, top_k=1, capacity_factor=0.5)
    x = torch.randn(8, 8)
    y = moe(x)
    routing = assign(moe.gate(x).softmax(-1).topk(1, -1).indices, torch.ones(8, 1), 2, expert_capacity(8, 2, 1, 0.5))
    dropped = sorted(set(range(8)) - set(routing.token.tolist()))
    assert moe.last_routing.dropped == len(dropped) > 0
    assert torch.all(y[dropped] == 0) and torch.all(y[routing.token].abs().sum(-1) > 0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_experts=4, top_k=5, capacity_factor=1.0, noise="none"), "top_k must be between"),
    (dict(n_experts=6, top_k=1, capacity_factor=1.0, noise="none", ep=4), "divides 6"),
    (dict(n_experts=4, top_k=1, capacity_factor=0.0, noise="none"), "capacity_factor must be > 0"),
    (dict(n_experts=4, top_k=1, capacity_factor=1.0, noise="gumbel"), "noise must be one of"),
])
def test_bad_moe_settings_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_moe(**kwargs)


def _expert_parallel_matches_one_process(rank, world, top_k, capacity_factor):
    from labs_lib.parallel.experts import apply_expert_parallel, expert_parameters

    def make():
        torch.manual_seed(0)
        return MoEMLP(16, 8, top_k=top_k, capacity_factor=capacity_factor)

    xs = [torch.randn(2, 7 + r, 16, generator=torch.Generator().manual_seed(100 + r)) for r in range(world)]
    reference, grads = make(), []
    for r, x in enumerate(xs):  # one process: each rank's batch through the whole layer
        reference.zero_grad()
        x = x.clone().requires_grad_()
        y = reference(x)
        (y * (r + 1)).sum().backward()
        grads.append((y.detach(), x.grad, {n: p.grad.clone() for n, p in reference.named_parameters()}))
    moe = apply_expert_parallel(make())
    x = xs[rank].clone().requires_grad_()
    y = moe(x)
    (y * (rank + 1)).sum().backward()
    ref_y, ref_x_grad, ref_grads = grads[rank]
    torch.testing.assert_close(y, ref_y, **TOL)
    torch.testing.assert_close(x.grad, ref_x_grad, **TOL)
    torch.testing.assert_close(moe.gate.weight.grad, ref_grads["gate.weight"], **TOL)  # the router: local batch
    local = 8 // world
    for name, p in moe.experts.local.named_parameters():  # an expert: every rank's tokens that reached it
        total = sum(g[2][f"experts.{name}"] for g in grads)[rank * local:(rank + 1) * local]
        torch.testing.assert_close(p.grad, total, **TOL)
    assert len(expert_parameters(moe)) == 4
    return moe.last_routing.dropped


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("top_k, capacity_factor", [(1, None), (2, None), (1, 1.0)])
def test_expert_parallel_matches_one_process(world, top_k, capacity_factor):
    dropped = run_ranks(_expert_parallel_matches_one_process, world, top_k, capacity_factor)
    assert (sum(dropped) > 0) == (capacity_factor is not None)


def test_gpt_with_moe_blocks_trains_and_counts_active_parameters():
    from labs_lib.core.config import GPTConfig, validate
    from labs_lib.models.gpt import GPT

    dense_cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=4, n_head=2, n_embd=32)
    cfg = GPTConfig(**{**dense_cfg.to_dict(), "n_experts": 4, "moe_top_k": 2, "moe_every": 2})
    validate(cfg)
    torch.manual_seed(0)
    model, dense = GPT(cfg), GPT(dense_cfg)
    assert [cfg.is_moe_block(i) for i in range(4)] == [False, True, False, True]
    assert len(model.moe_layers()) == 2
    expert = 2 * 32 * 128 + 128 + 32  # one expert: fc, proj and their biases
    gate = 32 * 4
    assert model.num_params() == dense.num_params() + 2 * (3 * expert + gate)  # each MoE block: 4 experts, 1 MLP
    assert model.active_params() == dense.active_params() + 2 * (expert + gate)  # top-2: one expert more than dense
    assert model.flops_per_token() - dense.flops_per_token() == 6 * 2 * (expert + gate)
    idx = torch.randint(0, 64, (2, 16))
    _, loss = model(idx, idx)
    aux = model.moe_aux_loss()
    assert aux.item() == pytest.approx(sum(m.aux_loss.item() for m in model.moe_layers())) and aux.item() > 0
    (loss + 0.01 * aux).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("changes, message", [
    (dict(n_experts=4, moe_top_k=5), "top_k must be between"),
    (dict(n_experts=4, moe_every=9), "moe_every=9 must lie between"),
])
def test_bad_moe_gpt_configs_fail_before_anything_runs(changes, message):
    from labs_lib.core.config import GPTConfig, validate

    with pytest.raises(ValueError, match=message):
        validate(GPTConfig(vocab_size=64, block_size=16, n_layer=4, n_head=2, n_embd=32, **changes))


@pytest.mark.parametrize("layout", [dict(tp=2), dict(pp=2)])
def test_tensor_or_pipeline_parallel_moe_is_refused_naming_the_fix(layout):
    from labs_lib.core.config import GPTConfig, ParallelConfig, validate

    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=4, n_head=2, n_embd=32, n_experts=4)
    with pytest.raises(ValueError, match="use tp=1 pp=1"):
        validate(cfg, parallel=ParallelConfig(**layout), world_size=2)


@pytest.mark.slow
def test_moe_gpt_under_ddp_matches_one_process(tmp_path, ci_data):
    """2 ranks x batch 4 = 1 rank x batch 8 for an MoE GPT when nothing is dropped (capacity 4 x the fair share
    holds every token) and the balancing loss is off (E·Σ f·P of each half is not half of the whole's; the
    z-loss is a mean over tokens, so it averages exactly)."""
    from labs_lib.core.runs import read_metrics

    from conftest import run_train

    moe = dict(n_experts=4, moe_top_k=2, moe_capacity_factor=4.0, moe_aux_coef=0.0, max_steps=5, warmup_steps=1,
               eval_interval=0, checkpoint_interval=0)
    run_train(tmp_path / "one", batch_size=8, **moe)
    run_train(tmp_path / "ddp", nproc=2, batch_size=4, **moe)
    records = {name: read_metrics(tmp_path / name) for name in ("one", "ddp")}
    one, ddp = ([r["loss"] for r in records[name]] for name in ("one", "ddp"))
    torch.testing.assert_close(torch.tensor(ddp), torch.tensor(one), rtol=1e-5, atol=1e-5)
    assert one[-1] < one[0]
    # the expert load of each step, summed over the ranks: the same routing, every token's 2 assignments kept
    assert [r["moe_load"] for r in records["ddp"]] == [r["moe_load"] for r in records["one"]]
    assert all(sum(r["moe_load"][0]) == 8 * 64 * 2 and r["moe_dropped_fraction"] == 0 for r in records["one"])


@pytest.mark.slow
@pytest.mark.parametrize("world, ep", [(2, 2), (4, 2)])
def test_expert_parallel_training_matches_ddp(tmp_path, ci_data, world, ep):
    """The same MoE GPT trained by DDP (every rank holds every expert) and with the experts spread over ep ranks:
    the same losses, with drops and the balancing loss on (each rank routes its own tokens either way), and the
    same single-device weights in the checkpoint; the expert-parallel run resumes from it."""
    from labs_lib.core import checkpoint
    from labs_lib.core.runs import read_metrics

    from conftest import run_train

    moe = dict(n_experts=4, moe_top_k=2, moe_capacity_factor=1.0, max_steps=4, warmup_steps=1, eval_interval=0,
               checkpoint_interval=2, batch_size=2, grad_clip=0.5)
    run_train(tmp_path / "ddp", nproc=world, **moe)
    run_train(tmp_path / "ep", nproc=world, ep=ep, **moe)
    ddp, exp = ([r["loss"] for r in read_metrics(tmp_path / name)] for name in ("ddp", "ep"))
    torch.testing.assert_close(torch.tensor(exp), torch.tensor(ddp), rtol=1e-5, atol=1e-5)
    weights = [checkpoint.load_model_state(checkpoint.latest_checkpoint(tmp_path / name / "checkpoints"))
               for name in ("ddp", "ep")]
    assert weights[0].keys() == weights[1].keys()
    # atol 1e-4 (lr is 3e-3): Adam divides by sqrt(v), so an element whose gradient is nearly zero turns a summation-
    # order difference in the 7th digit into a visible step (one element of 65,536 moved 1.9e-5 on a 2-core Xeon)
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-4, atol=1e-4,
                                   msg=lambda m, key=key: f"{key}: {m}")
    if world == 2:
        run_train(tmp_path / "ep", nproc=world, ep=ep, resume=True, **{**moe, "max_steps": 6})
        assert [r["step"] for r in read_metrics(tmp_path / "ep")] == list(range(1, 7))


@pytest.mark.parametrize("changes, message", [
    (dict(ep=2), "this GPT has none"),
    (dict(ep=3, n_experts=6), "must divide the 2 data-parallel ranks"),
    (dict(ep=2, n_experts=3), "3 experts cannot be spread over --ep 2"),
    (dict(ep=2, n_experts=4, zero_stage=2), "drop --zero-stage"),
])
def test_bad_expert_parallel_layouts_fail_before_launch(tmp_path, changes, message):
    from labs_lib.jobs.launch import launch, settings_args

    with pytest.raises(ValueError, match=message):
        launch("labs_lib.train.gpt", settings_args("ci", **changes), tmp_path / "bad", nodes=1, nproc_per_node=2,
               progress=False)
    assert not (tmp_path / "bad").exists()


def test_rsample_samples_the_first_choice_from_the_softmax_and_keeps_clean_gates():
    torch.manual_seed(0)
    moe = MoEMLP(4, 3, top_k=1, capacity_factor=None, noise="rsample")
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).expand(6000, 3)
    picks = torch.bincount(moe.choose(logits)[:, 0], minlength=3).float() / 6000
    torch.testing.assert_close(picks, torch.tensor([0.6, 0.3, 0.1]), atol=0.03, rtol=0)  # Gumbel-max: a sample
    moe.eval()
    assert torch.all(moe.choose(logits)[:, 0] == 0)  # no noise in evaluation

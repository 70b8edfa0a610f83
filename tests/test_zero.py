"""ZeRO-1/2/3 by hand equal one process on the full batch, ZeRO-3 equals torch FSDP2, and each rank holds the bytes
the ZeRO formulas predict.

Same setting as test_data_parallel.py (tiny GPT with a frozen position embedding and the tied token embedding /
lm_head, 10 AdamW steps, global batch split over the ranks). Each rank runs every variant once and returns numbers;
the tests below only read them.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from multiproc import run_ranks
from test_data_parallel import (
    ADAMW,
    ATOL,
    CFG,
    FROZEN,
    GRAD_ATOL,
    batches,
    compare,
    max_diff,
    named_grads,
    reference,
    tiny_gpt,
    train,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from labs_lib.estimates.memory import zero_bytes_per_rank
from labs_lib.measure.memory import held_bytes
from labs_lib.parallel.data_parallel import DataParallel
from labs_lib.parallel.zero import FullyShardedModule, ShardedOptimizer, _AllReduceThenSlice, reduce_scatter

pytestmark = pytest.mark.slow

BUCKET_MB = 0.01  # ~2,600 fp32 values: several buckets even for the tiny model

# bf16 keeps 8 significant bits, so each value it stores is off by up to u = 2^-9 relative (round to nearest).
# - Gradients (first step, same weights): a gradient goes through ~45 rounded tensors (about 10 per block each way,
#   plus embeddings, final norm, head and loss). Worst case the errors add: 45u ~ 2^-3.5; we allow 2^-4 = 32u
#   (norm-wise, per tensor). Measured: ~0.018, about 9u, as the errors partly cancel.
# - Losses over 10 steps: a loss computed in bf16 is off by ~2^-8 relative (measured ~1.3 * 2^-8), and since the
#   fp32 master weights and fp32 reduction stop errors from compounding, each step can add at most about one such
#   error: 10 * 2^-8 (~4%).
BF16_GRAD_RTOL = 2**-4
BF16_LOSS_RTOL = 10 * 2**-8


def _after_one_more_step(model, optimizer, finish, rank: int, world_size: int) -> dict[str, int]:
    """held_bytes right after a step, when gradients, optimizer state and parameters all exist."""
    inputs, targets = batches()
    model(inputs[0].chunk(world_size)[rank], targets[0].chunk(world_size)[rank])[1].backward()
    if finish is not None:
        finish()
    optimizer.step()
    return held_bytes(model, optimizer)


def _unshard(layout, shard: torch.Tensor, shapes) -> list[torch.Tensor]:
    """All ranks' shards put back together, as views shaped like the original tensors."""
    full = shard.new_empty(layout.padded_numel)
    dist.all_gather_single(full, shard.detach().contiguous())
    return layout.views(full, shapes)


def zero2_grads(model, optimizer: ShardedOptimizer) -> dict[str, torch.Tensor]:
    names: dict[torch.nn.Parameter, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(p, []).append(n)
    grads = {}
    for b in optimizer.buckets:
        for p, g in zip(b.params, _unshard(b.layout, b.grad_shard, [p.shape for p in b.params])):
            grads.update(dict.fromkeys(names[p], g))
    return grads


def zero3_grads(model: FullyShardedModule) -> dict[str, torch.Tensor]:
    grads = {}
    for flat in model.flat_params:
        if flat.shard.grad is not None:
            views = _unshard(flat.layout, flat.shard.grad, flat.shapes)
            grads.update({name: views[i] for _, _, name, i in flat.slots})
    return grads


def relative_error(values: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    """Worst tensor's |values - expected| / |expected| (Euclidean norms)."""
    return max(((values[n].float() - e).norm() / e.norm()).item() for n, e in expected.items())


def _zero_variants(rank: int, world_size: int) -> dict:
    ref = reference()
    plain = tiny_gpt()
    trainable = sum(p.numel() for p in plain.parameters() if p.requires_grad)
    frozen = plain.get_parameter(FROZEN).numel()
    initial_frozen = plain.get_parameter(FROZEN).detach().clone()
    out, finals = {}, {}  # finals: the final parameters, to compare the variants with each other

    def check(name, stage, model, optimizer, finish, read_grads, full_params, module):
        losses, grads = train(model, optimizer, world_size, rank, finish, read_grads=read_grads)
        params = finals[name] = full_params()
        r = {**compare(losses, params, grads, ref), "losses": losses, "grads_rel": relative_error(grads, ref[2])}
        r["frozen_moved"] = (params[FROZEN] - initial_frozen).abs().max().item()
        r["tied_one_tensor"] = params["lm_head.weight"] is params["tok_emb.weight"] or (
            module.lm_head.weight is module.tok_emb.weight)
        if stage is not None:
            measured = _after_one_more_step(model, optimizer, finish, rank, world_size)
            expected = zero_bytes_per_rank(trainable, world_size, stage, frozen_params=frozen)
            r["bytes"] = {k: (measured[k], expected[k]) for k in expected}
        out[name] = r

    model = DataParallel(tiny_gpt(), bucket_size_mb=BUCKET_MB)
    check("dp", 0, model, torch.optim.AdamW(model.parameters(), **ADAMW), model.finish_gradient_synchronization,
          lambda: named_grads(model.module), lambda: dict(model.module.named_parameters(remove_duplicate=False)),
          model.module)

    model1 = DataParallel(tiny_gpt(), bucket_size_mb=BUCKET_MB)
    zero1 = ShardedOptimizer(model1.parameters(), torch.optim.AdamW, bucket_size_mb=BUCKET_MB, **ADAMW)
    check("zero1", 1, model1, zero1, model1.finish_gradient_synchronization, lambda: named_grads(model1.module),
          lambda: dict(model1.module.named_parameters(remove_duplicate=False)), model1.module)
    state = zero1.state_dict()
    out["zero1"]["state_numels"] = [s["exp_avg"].numel() for s in state["state"].values()]
    out["zero1"]["shard_numels"] = [b.layout.shard_numel for b in zero1.buckets]
    out["zero1"]["lr_visible"] = zero1.param_groups[0]["lr"]
    # Resume: a fresh model and optimizer loaded from (params, this rank's state_dict) take the same next step.
    twin = DataParallel(tiny_gpt(), bucket_size_mb=BUCKET_MB)
    twin.module.load_state_dict(model1.module.state_dict())
    twin_zero1 = ShardedOptimizer(twin.parameters(), torch.optim.AdamW, bucket_size_mb=BUCKET_MB, **ADAMW)
    twin_zero1.load_state_dict(copy.deepcopy(zero1.state_dict()))
    zero1.zero_grad()
    for model, optimizer in ((model1, zero1), (twin, twin_zero1)):
        _after_one_more_step(model, optimizer, model.finish_gradient_synchronization, rank, world_size)
    out["zero1"]["resume_diff"] = max_diff(dict(twin.module.named_parameters(remove_duplicate=False)),
                                           dict(model1.module.named_parameters(remove_duplicate=False)))

    model2 = tiny_gpt()
    zero2 = ShardedOptimizer(model2.parameters(), torch.optim.AdamW, shard_gradients=True,
                             bucket_size_mb=BUCKET_MB, **ADAMW)
    check("zero2", 2, model2, zero2, zero2.finish_gradient_synchronization, lambda: zero2_grads(model2, zero2),
          lambda: dict(model2.named_parameters(remove_duplicate=False)), model2)

    for name, dtype in [("zero3", None), ("zero3_bf16", torch.bfloat16)]:
        model3 = FullyShardedModule(tiny_gpt(), compute_dtype=dtype)
        check(name, 3, model3, torch.optim.AdamW(model3.parameters(), **ADAMW),
              model3.finish_gradient_synchronization, lambda m=model3: zero3_grads(m), model3.gather_full_params,
              model3.module)

    x = torch.arange(world_size * 3, dtype=torch.float32) * (rank + 1)
    real, fallback = torch.empty(3), torch.empty(3)
    reduce_scatter(real, x.clone()).wait()
    _AllReduceThenSlice(fallback, x.clone(), None).wait()
    expected = torch.arange(rank * 3, rank * 3 + 3) * world_size * (world_size + 1) / 2
    out["reduce_scatter"] = {"real": real.tolist(), "fallback": fallback.tolist(), "expected": expected.tolist()}

    inputs, targets = batches()
    loss = model3(inputs[0].chunk(world_size)[rank], targets[0].chunk(world_size)[rank])[1]
    after_forward = model3.gathered_bytes()
    loss.backward()
    model3.finish_gradient_synchronization()
    out["zero3_gathered"] = {"after_forward": after_forward, "after_backward": model3.gathered_bytes()}

    for name, dtype in [("fsdp2", None), ("fsdp2_bf16", torch.bfloat16)]:
        fsdp = tiny_gpt()
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in fsdp.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(fsdp, mp_policy=policy)
        check(name, None, fsdp, torch.optim.AdamW(fsdp.parameters(), **ADAMW), None,
              lambda m=fsdp: {n: g.full_tensor() for n, g in named_grads(m).items()},
              lambda m=fsdp: {n: p.full_tensor() for n, p in m.named_parameters(remove_duplicate=False)}, fsdp)
    for suffix in ("", "_bf16"):
        ours, theirs = out[f"zero3{suffix}"], out[f"fsdp2{suffix}"]
        out[f"zero3_vs_fsdp2{suffix}"] = {"loss": max(abs(a - b) for a, b in zip(ours["losses"], theirs["losses"])),
                                          "params": max_diff(finals[f"zero3{suffix}"], finals[f"fsdp2{suffix}"])}
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"world{n}")
def variants(request) -> list[dict]:
    return run_ranks(_zero_variants, request.param)


@pytest.mark.parametrize("variant", ["zero1", "zero2", "zero3", "fsdp2"])
def test_matches_single_process_full_batch(variants, variant):
    for rank, result in enumerate(variants):
        r = result[variant]
        assert r["loss"] < ATOL and r["params"] < ATOL and r["grads"] < GRAD_ATOL, (rank, r)


@pytest.mark.parametrize("compute", ["fp32", "bf16"])
def test_zero3_matches_torch_fsdp2(variants, compute):
    """Same math as FSDP2 with MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=fp32): bf16 included."""
    for result in variants:
        r = result["zero3_vs_fsdp2" + ("_bf16" if compute == "bf16" else "")]
        assert r["loss"] < ATOL and r["params"] < ATOL, r


def test_zero3_bf16_compute_within_bf16_tolerance_of_fp32(variants):
    ref_losses = reference()[0]
    for result in variants:
        r = result["zero3_bf16"]
        worst_loss = max(abs(a - b) / b for a, b in zip(r["losses"], ref_losses))
        assert r["grads_rel"] < BF16_GRAD_RTOL and worst_loss < BF16_LOSS_RTOL, (r["grads_rel"], worst_loss)
        assert r["grads_rel"] > 2**-12  # bf16 really ran: fp32 would agree to ~1e-7


def test_zero3_full_parameters_live_only_while_needed(variants):
    """After forward only the root unit (embeddings, final norm, tied head: backward starts there) is whole, in
    bf16 here; after backward and the reduce-scatters nothing is."""
    r = variants[0]["zero3_gathered"]
    embedding_and_norm = (tiny_gpt().tok_emb.weight.numel() + tiny_gpt().pos_emb.weight.numel() + 2 * CFG.n_embd)
    assert r["after_forward"] == {"": 2 * embedding_and_norm, "blocks.0": 0, "blocks.1": 0}, r
    assert all(v == 0 for v in r["after_backward"].values()), r


@pytest.mark.parametrize("variant", ["dp", "zero1", "zero2", "zero3", "zero3_bf16"])
def test_frozen_parameter_untouched_and_tied_embedding_one_tensor(variants, variant):
    for result in variants:
        assert result[variant]["frozen_moved"] == 0 and result[variant]["tied_one_tensor"]


@pytest.mark.parametrize("variant", ["dp", "zero1", "zero2", "zero3"])
def test_held_bytes_per_rank_match_the_zero_formula(variants, variant):
    """Params, grads and Adam state actually held equal 4Ψ/4Ψ/8Ψ divided by N where the stage shards them; the
    flat buffers' padding (fewer than N values per buffer) stays well inside 1%."""
    for result in variants:
        for kind, (measured, expected) in result[variant]["bytes"].items():
            assert measured == pytest.approx(expected, rel=0.01), (variant, kind, measured, expected)


def test_sharded_optimizer_state_is_this_ranks_shard_and_resumes(variants):
    for result in variants:
        r = result["zero1"]
        assert r["state_numels"] == r["shard_numels"] and r["lr_visible"] == ADAMW["lr"]
        assert r["resume_diff"] == 0


def test_reduce_scatter_fallback_gives_the_same_slices(variants):
    for result in variants:
        r = result["reduce_scatter"]
        assert r["real"] == r["fallback"] == r["expected"], r

"""DataParallel by hand equals one process on the full batch, and equals torch DDP.

Each rank trains a tiny GPT for 10 AdamW steps on its slice of the batch; the single-process reference trains the
same initial model on the whole batch. Averaged gradients make the two take the same steps, up to float rounding
of sums done in another order (fp32: ~1e-7 relative), hence allclose at atol 1e-5. The helpers here are shared with
test_zero.py.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
from multiproc import run_ranks

from labs_lib.models.gpt import GPT, GPTConfig
from labs_lib.parallel.data_parallel import DataParallel

pytestmark = pytest.mark.slow

CFG = GPTConfig(vocab_size=128, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
STEPS = 10
GLOBAL_BATCH = 8  # split evenly over 1, 2 or 4 ranks
ATOL = 1e-5
# Gradients reach ~0.1, where an fp32 ulp is ~1e-8; a sum instead of a mean would be off by ~0.1. (Adam hides such a
# scale error in the parameters: it divides it out.)
GRAD_ATOL = 1e-6
FROZEN = "pos_emb.weight"  # a trainable-looking parameter switched off, to check that it is left alone
# The attention key bias has a true gradient of exactly zero (softmax ignores a shift shared by all keys), so its
# computed gradient is rounding noise (~1e-10) that differs with the order of the sums. Adam divides by
# sqrt(v) + eps: with the default eps=1e-8 that noise becomes steps of size ~lr, different in every run; with
# eps=1e-6 it stays noise. The other parameters move by ~lr per step either way.
ADAMW = dict(lr=3e-3, weight_decay=0.1, eps=1e-6)


def tiny_gpt(freeze: bool = True) -> GPT:
    torch.manual_seed(0)
    model = GPT(CFG)
    model.get_parameter(FROZEN).requires_grad_(not freeze)
    return model


def batches() -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (STEPS, GLOBAL_BATCH, T): the global batch of every step."""
    tokens = torch.randint(0, CFG.vocab_size, (STEPS, GLOBAL_BATCH, CFG.block_size + 1),
                           generator=torch.Generator().manual_seed(1))
    return tokens[..., :-1], tokens[..., 1:]


def named_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters(remove_duplicate=False) if p.grad is not None}


def train(model, optimizer, world_size: int, rank: int = 0, finish=None, accumulate: int = 1,
          read_grads=None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """STEPS optimizer steps on this rank's slice of each global batch: the loss of each step, averaged over ranks,
    and ``read_grads()`` (full gradients by name) after the first backward, once they are synchronized.

    ``accumulate`` > 1 splits the slice into micro-batches, all but the last under ``model.no_sync()``."""
    inputs, targets = batches()
    losses, first_grads = [], {}
    for step in range(STEPS):
        x, y = inputs[step].chunk(world_size)[rank], targets[step].chunk(world_size)[rank]
        step_loss = 0.0
        for i, (xm, ym) in enumerate(zip(x.chunk(accumulate), y.chunk(accumulate))):
            last = i == accumulate - 1
            with contextlib.nullcontext() if last else model.no_sync():
                loss = model(xm, ym)[1] / accumulate
                loss.backward()
            step_loss += loss.item()
        if finish is not None:
            finish()
        if step == 0 and read_grads is not None:
            first_grads = read_grads()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
    if world_size > 1:
        mean = torch.tensor(losses, dtype=torch.float64)
        dist.all_reduce(mean)
        losses = (mean / world_size).tolist()
    return losses, first_grads


def reference(freeze: bool = True) -> tuple[list[float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One process, the whole global batch: the losses, final parameters and first gradients to match."""
    model = tiny_gpt(freeze)
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)
    losses, grads = train(model, optimizer, world_size=1, read_grads=lambda: named_grads(model))
    return losses, dict(model.named_parameters(remove_duplicate=False)), grads


def max_diff(params: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    assert params.keys() == expected.keys()
    return max((params[n].detach().float() - expected[n].detach()).abs().max().item() for n in expected)


def compare(losses, params, grads, ref) -> dict[str, float]:
    """Largest differences from the reference: step losses, final parameters, first (averaged) gradients."""
    return {"loss": max(abs(a - b) for a, b in zip(losses, ref[0])), "params": max_diff(params, ref[1]),
            "grads": max_diff(grads, ref[2])}


def _data_parallel_variants(rank: int, world_size: int) -> dict:
    """Every variant trained on this rank, each compared with the single-process reference."""
    ref = reference()
    out = {}
    for name, bucket_size_mb, accumulate in [("per_param", None, 1), ("bucketed", 0.01, 1), ("no_sync", 0.01, 2)]:
        model = DataParallel(tiny_gpt(), bucket_size_mb=bucket_size_mb)
        optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)
        initial_frozen = model.module.get_parameter(FROZEN).detach().clone()
        # When backward reaches the embeddings (its last work), how many all-reduces are already on their way?
        in_flight = []

        def count_in_flight(module, args, output, model=model, in_flight=in_flight):
            output.register_hook(lambda grad: in_flight.append(len(model._launched)))

        model.module.drop.register_forward_hook(count_in_flight)
        losses, grads = train(model, optimizer, world_size, rank, model.finish_gradient_synchronization, accumulate,
                              read_grads=lambda model=model: named_grads(model.module))
        out[name] = compare(losses, dict(model.module.named_parameters(remove_duplicate=False)), grads, ref)
        frozen = model.module.get_parameter(FROZEN)
        out[name]["frozen_moved"] = (frozen - initial_frozen).abs().max().item()
        out[name]["frozen_has_grad"] = frozen.grad is not None
        out[name]["frozen_in_buckets"] = any(p is frozen for b in model.buckets for p in b.params)
        tied = model.module.tok_emb.weight
        out[name]["tied_is_one_tensor"] = model.module.lm_head.weight is tied
        out[name]["tied_reduced_times"] = sum(p is tied for b in model.buckets for p in b.params)
        out[name]["n_buckets"] = len(model.buckets)
        out[name]["in_flight_before_backward_ends"] = max(in_flight)  # no_sync backwards send nothing

    ddp = torch.nn.parallel.DistributedDataParallel(tiny_gpt())
    losses, grads = train(ddp, torch.optim.AdamW(ddp.parameters(), **ADAMW), world_size, rank,
                          read_grads=lambda: named_grads(ddp.module))
    out["torch_ddp"] = compare(losses, dict(ddp.module.named_parameters(remove_duplicate=False)), grads, ref)
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"world{n}")
def variants(request) -> list[dict]:
    return run_ranks(_data_parallel_variants, request.param)


@pytest.mark.parametrize("variant", ["per_param", "bucketed", "torch_ddp"])
def test_matches_single_process_full_batch(variants, variant):
    for rank, result in enumerate(variants):
        r = result[variant]
        assert r["loss"] < ATOL and r["params"] < ATOL and r["grads"] < GRAD_ATOL, (rank, r)


def test_all_reduces_overlap_backward(variants):
    """Communication starts while backward still runs: all buckets but the embedding's are sent before backward
    reaches the embeddings."""
    for result in variants:
        for variant in ("per_param", "bucketed", "no_sync"):
            assert result[variant]["in_flight_before_backward_ends"] >= result[variant]["n_buckets"] - 1


def test_buckets_group_parameters(variants):
    trainable = sum(1 for p in tiny_gpt().parameters() if p.requires_grad)
    assert variants[0]["per_param"]["n_buckets"] == trainable
    assert 1 < variants[0]["bucketed"]["n_buckets"] < trainable


def test_no_sync_accumulation_equals_big_batch(variants):
    for result in variants:
        r = result["no_sync"]
        assert r["loss"] < ATOL and r["params"] < ATOL and r["grads"] < GRAD_ATOL, r


def test_frozen_parameter_untouched_and_not_reduced(variants):
    for result in variants:
        for variant in ("per_param", "bucketed", "no_sync"):
            r = result[variant]
            assert r["frozen_moved"] == 0 and not r["frozen_has_grad"] and not r["frozen_in_buckets"], r


def test_tied_embedding_is_reduced_once(variants):
    for result in variants:
        for variant in ("per_param", "bucketed", "no_sync"):
            assert result[variant]["tied_is_one_tensor"] and result[variant]["tied_reduced_times"] == 1


def _unused_parameter(rank: int, world_size: int) -> str:
    model = DataParallel(tiny_gpt(), bucket_size_mb=1.0)  # one bucket: the unused parameter holds it back
    model.module.tok_emb.weight.sum().backward()  # only tok_emb gets a gradient
    try:
        model.finish_gradient_synchronization()
    except RuntimeError as e:
        return str(e)
    return "no error"


def test_unused_parameter_is_a_clear_error():
    message = run_ranks(_unused_parameter, 2)[0]
    assert "got no gradient" in message and "blocks.0.attn.qkv.weight" in message

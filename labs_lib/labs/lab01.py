"""Lab 01 (notebooks/01_data_parallel_gpt.ipynb): the exercises' checks (its jobs are labs_lib.jobs.launch.train_gpt).

    check_training_state_gb(gb)            exercise 1: GPT-2 small's training state in GB
    check_data_parallel_step(fn)           exercise 2: one rank's part of a DDP step, written by the learner, run on
                                           4 simulated ranks against one process on the whole batch
    check_tokens_per_step(n, run)          exercise 3: the tokens one optimizer step of ``run`` consumed (its config)
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from labs_lib.core.config import GPTConfig
from labs_lib.core.runs import read_json
from labs_lib.estimates.memory import GB, MIXED_ADAM, param_count, zero_bytes_per_rank
from labs_lib.labs.checks import check, simulate_ranks, whole_batch_reference

__all__ = ["check_data_parallel_step", "check_tokens_per_step", "check_training_state_gb"]


def check_training_state_gb(answer) -> bool:
    expected = sum(zero_bytes_per_rank(param_count(GPTConfig.preset("gpt2-small")), 1, 0, MIXED_ADAM).values()) / GB
    return check("GPT-2 small training state (GB)", answer, expected, rtol=0.01,
                 hint="parameters x bytes each parameter costs in mixed-precision Adam training, in GB (1e9 bytes)",
                 more="bytes per parameter = 2 (weights) + 2 (gradients) + 12 (fp32 master, m, v) = 16")


def check_tokens_per_step(answer, run: str | Path) -> bool:
    """The tokens one optimizer step of ``run`` consumed, from its config.json."""
    config = read_json(Path(run) / "config.json")
    train = config["train"]
    expected = train["batch_size"] * train["grad_accum"] * config["world_size"] * config["model"]["block_size"]
    return check("tokens per optimizer step", answer, expected,
                 hint="every rank takes its own micro-batches of full-length sequences each step",
                 more="b x cfg.grad_accum x (2 nodes x 2 processes) x profile.model.block_size")


# Exercise 2: the learner's fn(model, x, y, rank, world_size, all_reduce) on simulated ranks, against one process.
DDP_STEP = "one data-parallel step on 4 ranks"
_DDP_MORE = ("x_mine, y_mine = x.chunk(world_size)[rank], y.chunk(world_size)[rank]; loss = model(x_mine, y_mine)[1]; "
             "loss.backward(); then for every p in model.parameters(): p.grad = all_reduce(p.grad) / world_size; "
             "return all_reduce(loss.detach()) / world_size")


def _ddp_diagnosis(models, results, seen, reference, loss, batch, world_size) -> str:
    """What is wrong with the ranks' step ('' if nothing): their gradients and losses against one process's."""
    if sum(seen) != batch:
        return (f"the ranks ran the model on {sum(seen)} sequences in all, the batch has {batch}: each rank takes "
                "only its own slice (x.chunk(world_size)[rank]), so together they see the batch once")
    for rank, model in enumerate(models):
        for name, p in model.named_parameters():
            if p.grad is None:
                return f"rank {rank} has no gradient for {name}: call backward on the loss of its slice"
            want = reference[name]
            if torch.allclose(p.grad, want * world_size, rtol=1e-4, atol=1e-6):
                return (f"rank {rank}'s gradients are {world_size}x one process's: all_reduce sums over the ranks; "
                        "divide by world_size to average")
            if not torch.allclose(p.grad, want, rtol=1e-4, atol=1e-6):
                return (f"rank {rank}'s gradient of {name} differs from one process's on the whole batch: replace "
                        "every parameter's .grad with its average over the ranks (all_reduce returns the sum; it "
                        "does not change its argument)")
    for rank, result in enumerate(results):
        value = result.item() if isinstance(result, torch.Tensor) and result.numel() == 1 else result
        if not isinstance(value, (int, float)) or abs(value - loss) > 1e-5 * max(1.0, abs(loss)):
            return (f"the gradients are right; rank {rank} returned {value!r}, the whole batch's mean loss is "
                    f"{loss:.5f}: return this rank's loss averaged over the ranks (all_reduce, then / world_size)")
    return ""


def check_data_parallel_step(fn, world_size: int = 4, batch: int = 8, cfg: GPTConfig | None = None) -> bool:
    """Exercise 2: ``fn(model, x, y, rank, world_size, all_reduce)`` is one rank's part of a data-parallel step. Each
    of ``world_size`` simulated ranks (threads, :func:`~labs_lib.labs.checks.simulate_ranks`) gets its own replica of
    a tiny GPT and the same global batch; afterwards every replica's ``.grad`` must equal the gradient one process
    gets from one backward on the whole batch, and ``fn`` must return that batch's mean loss."""
    hint = "each rank: backward on its slice of the batch, then average every gradient over the ranks"
    if fn is None or fn is Ellipsis:
        return check(DDP_STEP, None, True, hint=hint, more=_DDP_MORE)
    model, x, y, loss, reference = whole_batch_reference(cfg, batch)
    models = [copy.deepcopy(model) for _ in range(world_size)]  # DDP starts every replica from rank 0's weights
    seen: list[int] = []  # sequences each forward call got, over all ranks
    for m in models:
        m.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(len((*args, *kwargs.values())[0])),
                                    with_kwargs=True)
    results = simulate_ranks(lambda rank, all_reduce: fn(models[rank], x, y, rank, world_size, all_reduce),
                             world_size)
    if all(r is None or r is Ellipsis for r in results) and not seen:
        return check(DDP_STEP, None, True, hint=hint, more=_DDP_MORE)
    problem = _ddp_diagnosis(models, results, seen, reference, loss, batch, world_size)
    return check(DDP_STEP, not problem, True, hint=problem or hint, more=_DDP_MORE)

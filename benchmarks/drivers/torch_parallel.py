"""torch's own tensor and pipeline parallelism training the workshop GPT: the production side of
benchmarks/parallel_scaling.py. A job module like ``labs_lib.train`` (``--out``, ``--no-progress``,
``check_args``; the loop of labs_lib.train.loop.run_loop, so the same metrics.jsonl: step, loss, lr, grad_norm,
tokens_per_s, step_time_s, tokens, elapsed_s), so the benchmark launches it the same way (labs_lib.jobs.launch:
Slurm's train_gpt.sbatch with ``TRAIN_MODULE=benchmarks.drivers.torch_parallel``, or torchrun; from the repo root,
where the module is importable) and reads it with the same code:

    torchrun --standalone --nproc-per-node=4 -m benchmarks.drivers.torch_parallel --impl dtensor-tp \\
        --profile ci --out build/runs/bench_dtensor --n-layer 8 --n-head 8 --n-embd 128 --batch-size 16
    torchrun --standalone --nproc-per-node=4 -m benchmarks.drivers.torch_parallel --impl pipelining --pp 4 \\
        --micro-batches 8 --profile ci --out build/runs/bench_pipelining --n-layer 8 --n-head 8 --n-embd 128

``dtensor-tp``: every rank is one TP rank; ``parallelize_module`` with ColwiseParallel / RowwiseParallel as Megatron
splits (qkv by heads, fc by columns, the projections by rows, the embedding and tied lm_head by vocabulary) and
``loss_parallel`` on the vocab-sharded logits, as tests/test_tensor_parallel.py checks against ours.
``pipelining``: every rank is one stage of :func:`labs_lib.parallel.pipeline.partition_gpt`, driven by
``torch.distributed.pipelining``'s Schedule1F1B / ScheduleGPipe (labs_lib.train.pipeline_job.torch_schedule).
Both: every rank reads the same global batch, AdamW with the profile's settings (labs_lib.train.optim), gradients
clipped to the profile's global norm, constant learning rate. A step's time covers reading the batch, forward,
backward, clipping and the optimizer step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from labs_lib.core.config import GPTConfig, TrainConfig, get_profile, override, parse_job_args, validate
from labs_lib.core.dist import cleanup, init_distributed
from labs_lib.data.text import TokenBatches, prepare_data
from labs_lib.models.gpt import GPT
from labs_lib.parallel.pipeline import check_pipeline
from labs_lib.parallel.tensor_parallel import check_tensor_parallel, shard_tensor
from labs_lib.train.cli import add_model_args, add_run_args, model_config_from_args
from labs_lib.train.loop import Loop, run_loop
from labs_lib.train.optim import make_optimizer, param_groups

IMPLS = ("dtensor-tp", "pipelining")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.drivers.torch_parallel", description=__doc__.split("\n")[0])
    p.add_argument("--impl", choices=IMPLS, required=True)
    add_run_args(p, resume=False)
    add_model_args(p)
    for name in ("batch-size", "max-steps", "seed"):
        p.add_argument(f"--{name}", type=int, help="override the profile's value")
    p.add_argument("--pp", type=int, default=1, help="pipelining: stages (= processes)")
    p.add_argument("--micro-batches", type=int, default=1, help="pipelining: micro-batches per step")
    p.add_argument("--pp-schedule", choices=("gpipe", "1f1b"), default="1f1b")
    return p


def configs_from_args(a: argparse.Namespace) -> tuple[GPTConfig, TrainConfig]:
    profile = get_profile(a.profile)
    model_cfg = model_config_from_args(profile.model, a)
    train_cfg = override(profile.train, batch_size=a.batch_size, max_steps=a.max_steps, seed=a.seed)
    train_cfg = override(train_cfg, warmup_steps=min(train_cfg.warmup_steps, train_cfg.max_steps))  # lr is constant
    validate(model_cfg, train_cfg)
    return model_cfg, train_cfg


def _check(a: argparse.Namespace, world_size: int) -> tuple[GPTConfig, TrainConfig]:
    model_cfg, train_cfg = configs_from_args(a)
    if a.impl == "dtensor-tp":
        check_tensor_parallel(model_cfg, world_size)
    else:
        if a.pp != world_size:
            raise ValueError(f"--pp {a.pp} but {world_size} processes: launch {a.pp} processes (one per stage)")
        check_pipeline(model_cfg.n_layer, a.pp, train_cfg.batch_size, a.micro_batches, a.pp_schedule)
    return model_cfg, train_cfg


def check_args(argv: list[str], world_size: int) -> int:
    """The pre-launch check (labs_lib.jobs.launch calls it): ValueError naming the fix; returns the steps logged."""
    _, train_cfg = _check(parse_job_args(build_parser(), argv), world_size)
    return train_cfg.max_steps


def _dtensor_tp(model: GPT, world_size: int, device: torch.device):
    """The GPT under DTensor TP; returns step(x, y) -> loss tensor (after backward)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, loss_parallel, parallelize_module

    # ColwiseParallel gives rank r a contiguous block of the weight's rows: reorder the fused q;k;v rows so that
    # block r holds q, k and v of rank r's heads.
    with torch.no_grad():
        for block in model.blocks:
            for p in (block.attn.qkv.weight, block.attn.qkv.bias):
                p.copy_(torch.cat([shard_tensor(p, 0, r, world_size, fused=3) for r in range(world_size)]))
    plan = {"tok_emb": RowwiseParallel(input_layouts=Replicate()),
            "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)}
    for i in range(model.config.n_layer):
        plan |= {f"blocks.{i}.attn.qkv": ColwiseParallel(), f"blocks.{i}.attn.proj": RowwiseParallel(),
                 f"blocks.{i}.mlp.fc": ColwiseParallel(), f"blocks.{i}.mlp.proj": RowwiseParallel()}
    parallelize_module(model, init_device_mesh(device.type, (world_size,)), plan)
    model.lm_head.weight = model.tok_emb.weight  # tie again after parallelize_module

    def step(x, y):
        with loss_parallel():
            loss = model(x, y)[1]
            loss.backward()
        return loss.detach().full_tensor().item()

    return model, step


def _pipelining(model: GPT, a: argparse.Namespace, rank: int, device: torch.device):
    from labs_lib.parallel.pipeline import partition_gpt
    from labs_lib.train.pipeline_job import torch_schedule  # the wrapper lab 05 and its tests use

    stage = partition_gpt(model, rank, a.pp)
    del model  # the other stages' layers go away
    return stage, torch_schedule([stage], a.pp_schedule, a.micro_batches, device)


def _clip_global(params: list, max_norm: float, replicated_share: float) -> float:
    """Clip to the global norm over all ranks' gradients (``inf``: only measure it); returns that norm. A rank's own
    gradients (a stage's, a DTensor shard's) count once, replicated ones (same on every rank) ``replicated_share``
    each."""
    square = torch.zeros((), device=params[0].device)
    grads = []
    for p in params:
        g = p.grad
        if g is None:
            continue
        sharded = hasattr(g, "placements") and any(pl.is_shard() for pl in g.placements)
        g = g.to_local() if hasattr(g, "to_local") else g
        grads.append(g)
        square += g.float().pow(2).sum() * (1.0 if sharded else replicated_share)
    dist.all_reduce(square)
    norm = square.sqrt()
    scale = max_norm / (norm + 1e-6)
    if scale < 1:
        for g in grads:
            g.mul_(scale)
    return norm.item()


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    info = init_distributed()
    model_cfg, train_cfg = _check(a, info.world_size)
    out = Path(a.out)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(train_cfg.data, train_cfg.tokenizer_vocab, train_cfg.corpus_max_bytes, train_cfg.val_fraction,
                        progress=False)
    batches = TokenBatches(data.train_path, train_cfg.batch_size, model_cfg.block_size, seed=train_cfg.seed)
    torch.manual_seed(train_cfg.seed)
    model = GPT(model_cfg).to(info.device)
    if a.impl == "dtensor-tp":
        module, forward_backward = _dtensor_tp(model, info.world_size, info.device)
    else:
        module, forward_backward = _pipelining(model, a, info.rank, info.device)
    params = list(module.parameters())
    optimizer = make_optimizer(param_groups(module, train_cfg.weight_decay), train_cfg)
    replicated_share = 1 / info.world_size if a.impl == "dtensor-tp" else 1.0

    def train_step(step: int) -> dict:
        x, y = (t.to(info.device) for t in next(batches))
        loss = forward_backward(x, y)  # the same on every rank
        grad_norm = _clip_global(params, train_cfg.grad_clip or float("inf"), replicated_share)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "grad_norm": grad_norm, "impl": a.impl}

    loop = Loop(out=out, max_steps=train_cfg.max_steps, samples_per_step=train_cfg.batch_size * model_cfg.block_size,
                is_main=info.is_main, progress=not a.no_progress, desc=a.impl, device=info.device)
    run_loop(train_step, loop, optimizer=optimizer)
    cleanup()


if __name__ == "__main__":
    from labs_lib.core.dist import exit_process

    main()
    exit_process()  # not the interpreter's teardown: leftover gloo threads can abort it

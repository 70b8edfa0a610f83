"""torch's own tensor and pipeline parallelism training the workshop GPT: the production side of
benchmarks/parallel_scaling.py. Same command line and same metrics.jsonl as ``labs_lib.train``, so the benchmark
launches it the same way (Slurm's train_gpt.sbatch with ``TRAIN_MODULE=benchmarks.drivers.torch_parallel``, or
torchrun) and reads it with the same code:

    torchrun --standalone --nproc-per-node=4 -m benchmarks.drivers.torch_parallel --impl dtensor-tp \\
        --profile ci --out build/runs/bench_dtensor --n-layer 8 --n-head 8 --n-embd 128 --batch-size 16
    torchrun --standalone --nproc-per-node=4 -m benchmarks.drivers.torch_parallel --impl pipelining --pp 4 \\
        --micro-batches 8 --profile ci --out build/runs/bench_pipelining --n-layer 8 --n-head 8 --n-embd 128

``dtensor-tp``: every rank is one TP rank; ``parallelize_module`` with ColwiseParallel / RowwiseParallel as Megatron
splits (qkv by heads, fc by columns, the projections by rows, the embedding and tied lm_head by vocabulary) and
``loss_parallel`` on the vocab-sharded logits, as tests/test_tensor_parallel.py checks against ours.
``pipelining``: every rank is one stage of :func:`labs_lib.parallel.pipeline.partition_gpt`, driven by
``torch.distributed.pipelining``'s Schedule1F1B / ScheduleGPipe (labs_lib.parallel.pipeline_run's wrapper).
Both: every rank reads the same global batch, AdamW with the profile's settings, gradients clipped to the profile's
global norm, constant learning rate. A step's time covers forward, backward, clipping and the optimizer step.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from labs_lib.config import GPTConfig, TrainConfig, get_profile, override, validate
from labs_lib.data import TokenBatches, prepare_data
from labs_lib.dist import all_reduce_mean, cleanup, init_distributed
from labs_lib.model import GPT
from labs_lib.parallel.pipeline import check_pipeline
from labs_lib.parallel.tensor_parallel import check_tensor_parallel, shard_tensor

IMPLS = ("dtensor-tp", "pipelining")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.drivers.torch_parallel", description=__doc__.split("\n")[0])
    p.add_argument("--impl", choices=IMPLS, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--profile")
    p.add_argument("--no-progress", action="store_true", help="accepted for labs_lib.train's command line; no bar")
    for name in ("n-layer", "n-head", "n-embd", "block-size", "batch-size", "max-steps", "seed"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--pp", type=int, default=1, help="pipelining: stages (= processes)")
    p.add_argument("--micro-batches", type=int, default=1, help="pipelining: micro-batches per step")
    p.add_argument("--pp-schedule", choices=("gpipe", "1f1b"), default="1f1b")
    return p


def configs_from_args(a: argparse.Namespace) -> tuple[GPTConfig, TrainConfig]:
    profile = get_profile(a.profile)
    model_cfg = override(profile.model, n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd, block_size=a.block_size)
    train_cfg = override(profile.train, batch_size=a.batch_size, max_steps=a.max_steps, seed=a.seed)
    train_cfg = override(train_cfg, warmup_steps=min(train_cfg.warmup_steps, train_cfg.max_steps))  # lr is constant
    validate(model_cfg, train_cfg)
    return model_cfg, train_cfg


def check_training_config(args: list[str], world_size: int):
    """What slurm/train_gpt.sbatch calls before starting any node: ValueError naming the fix."""
    return _check(build_parser().parse_args(args), world_size)


def _check(a: argparse.Namespace, world_size: int) -> tuple[GPTConfig, TrainConfig]:
    model_cfg, train_cfg = configs_from_args(a)
    if a.impl == "dtensor-tp":
        check_tensor_parallel(model_cfg, world_size)
    else:
        if a.pp != world_size:
            raise ValueError(f"--pp {a.pp} but {world_size} processes: launch {a.pp} processes (one per stage)")
        check_pipeline(model_cfg.n_layer, a.pp, train_cfg.batch_size, a.micro_batches, a.pp_schedule)
    return model_cfg, train_cfg


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
        return loss.detach().full_tensor()

    return list(model.parameters()), step


def _pipelining(model: GPT, a: argparse.Namespace, rank: int, device: torch.device):
    from labs_lib.parallel.pipeline import partition_gpt
    from labs_lib.parallel.pipeline_run import _torch_schedule  # the wrapper lab 05 and its tests use

    stage = partition_gpt(model, rank, a.pp)
    step_fn = _torch_schedule([stage], a.pp_schedule, a.micro_batches, device)
    del model  # the other stages' layers go away
    return list(stage.parameters()), lambda x, y: torch.tensor(step_fn(x, y))


def _clip_global(params: list, max_norm: float, replicated_share: float) -> None:
    """Clip to the global norm over all ranks' gradients: a rank's own (a stage's, a DTensor shard's) count once,
    replicated ones (same on every rank) ``replicated_share`` each."""
    square = torch.zeros(())
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
    scale = max_norm / (square.sqrt() + 1e-6)
    if scale < 1:
        for g in grads:
            g.mul_(scale)


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
        params, step = _dtensor_tp(model, info.world_size, info.device)
    else:
        params, step = _pipelining(model, a, info.rank, info.device)
    optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2),
                                  weight_decay=train_cfg.weight_decay)
    tokens_per_step = train_cfg.batch_size * model_cfg.block_size
    metrics = out / "metrics.jsonl"
    t_start = time.perf_counter()
    for n in range(1, train_cfg.max_steps + 1):
        x, y = (t.to(info.device) for t in next(batches))
        t0 = time.perf_counter()
        loss = step(x, y)
        if train_cfg.grad_clip:
            _clip_global(params, train_cfg.grad_clip, 1 / info.world_size if a.impl == "dtensor-tp" else 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_time = time.perf_counter() - t0
        record = {"step": n, "loss": all_reduce_mean(float(loss)), "tokens_per_s": tokens_per_step / step_time,
                  "step_time_s": step_time, "tokens": n * tokens_per_step, "elapsed_s": time.perf_counter() - t_start,
                  "impl": a.impl}
        if info.is_main:
            with open(metrics, "a") as f:
                f.write(json.dumps(record) + "\n")
    if info.is_main:
        print(f"done: {a.impl} step {train_cfg.max_steps} loss {record['loss']:.4f} -> {out}")
    cleanup()


if __name__ == "__main__":
    from labs_lib.dist import exit_process

    main()
    exit_process()  # not the interpreter's teardown: leftover gloo threads can abort it

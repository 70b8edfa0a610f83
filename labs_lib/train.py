"""Train the workshop GPT: one process, several with torchrun, or many nodes through Slurm.

    python -m labs_lib.train --profile ci --out build/runs/demo                  # one process
    torchrun --standalone --nproc-per-node=2 -m labs_lib.train --profile ci --out build/runs/ddp
    sbatch slurm/train_gpt.sbatch --max-steps 200                                # 2 nodes x 2 processes
    python -m labs_lib.train --profile ci --out build/runs/demo --resume         # continue from "latest"
    torchrun --standalone --nproc-per-node=8 -m labs_lib.train --profile ci --out build/runs/3d \
        --tp 2 --pp 2 --micro-batches 4                                          # 2 replicas x 2 stages x 2 TP
    torchrun --standalone --nproc-per-node=2 -m labs_lib.train --profile ci --out build/runs/z2 \
        --zero-stage 2 --activation-checkpointing selective                      # ZeRO-2 by hand, recompute

Data parallelism is torch's DistributedDataParallel. Each optimizer step sees ``batch_size x grad_accum x world``
sequences; the data loader hands every rank a disjoint slice of the same global batch, so 2 ranks with batch 4
see exactly what 1 process with batch 8 sees (and log the same losses).

With ``--tp`` / ``--pp`` the ranks form a DP x TP x PP mesh (labs_lib.parallel.mesh): the single-device GPT is
split by tensor parallelism, cut into pipeline stages, and each of the ``dp`` replicas of that pipeline reads its
own slice of the global batch (``batch_size x grad_accum x dp`` sequences per step). Checkpoints stay single-device
(weights gathered on save, sharded again on resume); the optimizer state is saved per shard, so resuming needs the
same ``--tp``/``--pp``/``--pp-chunks``.

Memory saving (labs_lib.memory): ``--activation-checkpointing full|selective`` recomputes each transformer block
(or the cheap parts of it) in backward, on any layout. ``--zero-stage 1|2|3`` replaces DDP with ZeRO by hand
(labs_lib.parallel.zero; data parallelism only): weights are gathered whole into the checkpoint, each rank saves its
own optimizer shard, so resuming needs the same stage and number of ranks. On the data-parallel path every record
has ``mem_rank<r>``: the bytes of parameters, gradients and optimizer state rank r holds after the step
(labs_lib.parallel.zero.held_bytes; DDP's own gradient buckets are not counted). Outputs in ``--out``:

    metrics.jsonl   one JSON object per step: step, loss, lr, grad_norm, tokens_per_s, ... (+ val_loss)
    config.json     the resolved model / train settings and world size
    tokenizer.json  the BPE tokenizer the run was trained with
    checkpoints/    see labs_lib.checkpoint (atomic, the newest ``keep_checkpoints`` kept)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from labs_lib import checkpoint
from labs_lib.config import GPTConfig, ParallelConfig, TrainConfig, get_profile, override
from labs_lib.data import TokenBatches, eval_batches, prepare_data
from labs_lib.dist import DistInfo, all_reduce_mean, cleanup, init_distributed, print0
from labs_lib.memory import (
    CHECKPOINT_MODES,
    ZeroDataParallel,
    apply_activation_checkpointing,
    check_zero_resume,
    gather_held_bytes,
)
from labs_lib.model import GPT
from labs_lib.parallel.mesh import Mesh, build_mesh, check_layout
from labs_lib.parallel.parallel3d import Parallel3D
from labs_lib.parallel.pipeline import SCHEDULES
from labs_lib.parallel.tensor_parallel import TP_RNG, get_rng_tracker, tensor_parallel_manual_seed
from labs_lib.parallel.zero import held_bytes
from labs_lib.profiling import profile_steps

# Fault injection for the resume tests: SIGKILL this process after the given step, or halfway through writing
# the checkpoint of the given step. Real kills, so the tests prove what a crash or `scancel -s KILL` leaves.
KILL_AFTER_STEP = "LABS_FAULT_KILL_AFTER_STEP"
KILL_IN_CHECKPOINT = "LABS_FAULT_KILL_IN_CHECKPOINT"


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_lr`` at the end of the schedule."""
    it, total = step - 1, cfg.schedule_steps()
    if it < cfg.warmup_steps:
        return cfg.lr * (it + 1) / cfg.warmup_steps
    if it >= total:
        return cfg.min_lr
    progress = (it - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, LayerNorm gains or embeddings' position table)."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()  # tied weights once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for the whole update on GPU instead of a dozen per parameter
    fused = all(p.is_cuda for p in params) or None
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def read_metrics(out_dir: str | Path) -> list[dict]:
    """The per-step records a run wrote to ``metrics.jsonl`` (empty if it has not started)."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records past the checkpoint we resume from: those steps are about to be trained again."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line)["step"] <= last_step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


def all_reduce_gradients(model: torch.nn.Module, world_size: int, group=None) -> None:
    """Average all gradients over ``group`` (of ``world_size`` ranks) in one flat all-reduce after backward (the
    no-overlap baseline of lab 02; the data parallelism of a tensor/pipeline-parallel run)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= world_size
    for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(chunk.view_as(g))


def _autocast(dtype: str, device: torch.device):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list, cfg: TrainConfig, device: torch.device) -> float:
    model.eval()
    losses = []
    for x, y in batches:
        with _autocast(cfg.dtype, device):
            losses.append(model(x.to(device), y.to(device))[1].float().item())
    model.train()
    return all_reduce_mean(sum(losses) / len(losses))


def _tensor_parallel_rng_state() -> dict[str, torch.Tensor]:
    cpu, cuda = get_rng_tracker().states[TP_RNG]
    return {"tensor_parallel_torch": cpu} | ({"tensor_parallel_cuda": cuda} if cuda is not None else {})


def _check_same_layout(saved: dict, parallel: ParallelConfig, path: Path) -> None:
    """The optimizer state is saved per TP/PP shard: resuming needs the layout it was written with."""
    keys = ("tp", "pp", "pp_chunks")
    was = {k: saved.get("parallel", {}).get(k, 1) for k in keys}
    now = {k: getattr(parallel, k) for k in keys}
    if was != now:
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in was.items())
        raise ValueError(f"{path} was written with {was}, this run has {now}: resume with {flags} (its weights are "
                         "single-device: python -m labs_lib.generate reads them with any layout)")


def save(out: Path, step: int, model: GPT | Parallel3D, optimizer, batches: TokenBatches, meta: dict,
         info: DistInfo, cfg: TrainConfig, mesh: Mesh | None = None, zero: ZeroDataParallel | None = None) -> None:
    tmp = checkpoint.begin(out / "checkpoints", step)
    if zero is not None:  # ZeRO: the weights gathered whole (stage 3: a collective), each rank's optimizer shard
        checkpoint.write_rank_state(tmp, info.rank)
        model_state, optimizer_state = zero.full_state_dict(), None
        checkpoint.write_optimizer_shard(tmp, zero.shard_name(info.rank), optimizer.state_dict())
    elif mesh is None:
        checkpoint.write_rank_state(tmp, info.rank)
        model_state = model.state_dict() if info.is_main else None
        optimizer_state = optimizer.state_dict()
    else:  # the single-device weights (a collective), and the optimizer state of each shard
        checkpoint.write_rank_state(tmp, info.rank, _tensor_parallel_rng_state())
        model_state, optimizer_state = model.full_state_dict(), None
        if mesh.dp_rank == 0:  # the other replicas hold the same
            checkpoint.write_optimizer_shard(tmp, mesh.shard_name, optimizer.state_dict())
    if info.is_main:
        if os.environ.get(KILL_IN_CHECKPOINT) == str(step):
            checkpoint._save_tensors(checkpoint.dedupe_shared(model_state)[0], tmp / "model.safetensors")
            os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.write_main_state(tmp, model_state, optimizer_state,
                                    dict(meta, step=step, data=batches.state_dict()))
    if info.distributed:
        dist.barrier()  # every rank's files are on disk before the folder is committed
    if info.is_main:
        checkpoint.commit(tmp, keep=cfg.keep_checkpoints)
    if info.distributed:
        dist.barrier()


def train(model_cfg: GPTConfig, cfg: TrainConfig, out: str | Path, resume: bool = False,
          progress: bool = True, parallel: ParallelConfig | None = None) -> list[dict]:
    """Run (or resume) training in this process, as one rank of whatever launched it. Returns the metrics.

    ``parallel``: the DP x TP x PP layout (default: data parallel over all ranks)."""
    info = init_distributed()
    out = Path(out)
    parallel = check_layout(model_cfg, cfg, parallel or ParallelConfig(), info.world_size, info.device.type)
    latest = checkpoint.latest_checkpoint(out / "checkpoints") if resume else None
    saved = checkpoint.load_meta(latest) if latest is not None else None
    if saved is not None:
        _check_same_layout(saved, parallel, latest)
        check_zero_resume(saved, cfg.zero_stage, info.world_size, latest)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg.data, cfg.tokenizer_vocab, cfg.corpus_max_bytes, cfg.val_fraction,
                        progress=progress and info.is_main)
    meta = {"model": model_cfg.to_dict(), "train": cfg.to_dict(), "parallel": parallel.to_dict(),
            "world_size": info.world_size, "data_dir": str(data.dir)}
    if info.is_main:
        shutil.copyfile(data.tokenizer_path, out / "tokenizer.json")
        (out / "config.json").write_text(json.dumps(meta, indent=1))

    # Tensor or pipeline parallelism: a mesh of process groups; data parallelism alone: torch DDP over the world.
    mesh = build_mesh(parallel, info.rank, info.world_size) if parallel.tp * parallel.pp > 1 else None
    dp_rank = mesh.dp_rank if mesh else info.rank

    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = GPT(model_cfg).to(info.device)
    if mesh is not None:
        if saved is not None:  # the checkpoint is single-device: load it whole, the shards are cut from it
            model.load_state_dict(checkpoint.load_model_state(latest))
        model = Parallel3D(model, mesh, parallel)  # TP, then pipeline stages; DP is the gradient all-reduce below
    apply_activation_checkpointing(model, cfg.activation_checkpointing)  # after TP, before compile and DP/ZeRO
    optimizer = make_optimizer(model, cfg)
    # Every TP and PP rank of one replica reads the same batch: the replica's slice of the global batch.
    batches = TokenBatches(data.train_path, cfg.batch_size, model_cfg.block_size, dp_rank, parallel.dp,
                           seed=cfg.seed)
    val = eval_batches(data.val_path, cfg.batch_size, model_cfg.block_size, cfg.eval_iters, dp_rank, parallel.dp)
    if mesh is None:
        torch.manual_seed(cfg.seed + 1 + info.rank)  # dropout masks differ between ranks
    else:  # alike within a TP group (replicated activations), different per replica and stage
        tensor_parallel_manual_seed(cfg.seed + 1 + dp_rank + parallel.dp * mesh.pp_rank, mesh.tp_group)

    start = 0
    if saved is not None:
        if mesh is None:
            model.load_state_dict(checkpoint.load_model_state(latest))
            if not cfg.zero_stage:  # ZeRO: each rank's shard, once the sharded optimizer exists (below)
                optimizer.load_state_dict(checkpoint.load_optimizer_state(latest))
        else:
            optimizer.load_state_dict(checkpoint.load_optimizer_shard(latest, mesh.shard_name))
        batches.load_state_dict(saved["data"])
        rank_state = checkpoint.load_rank_state(latest, info.rank)
        if mesh is not None and rank_state is not None:
            get_rng_tracker().states[TP_RNG] = (rank_state["tensor_parallel_torch"],
                                                rank_state.get("tensor_parallel_cuda"))
        start = saved["step"]
        print0(f"resumed from {latest} (step {start})")
    metrics_path = out / "metrics.jsonl"
    if info.is_main:
        if resume:
            _truncate_metrics(metrics_path, start)
        elif metrics_path.exists():
            metrics_path.unlink()

    zero = None
    if mesh is None:
        compiled = torch.compile(model) if cfg.compile else model  # compile, then wrap (torchtitan's order)
        ddp = DistributedDataParallel(compiled, bucket_cap_mb=cfg.ddp_bucket_mb) if info.distributed else compiled
        if cfg.zero_stage:  # ZeRO by hand instead of DDP: it owns the forward, the optimizer and the sync
            zero = ZeroDataParallel(model, cfg.zero_stage, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay,
                                    cfg.ddp_bucket_mb, forward_model=compiled)
            ddp, optimizer = zero, zero.optimizer
            if saved is not None:
                optimizer.load_state_dict(checkpoint.load_optimizer_shard(latest, zero.shard_name(info.rank)))
        # Without overlap every micro-batch runs under no_sync and the gradients are all-reduced after backward.
        overlap = cfg.ddp_overlap or not info.distributed or zero is not None
    scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.dtype == "fp16")
    tokens_per_step = cfg.batch_size * model_cfg.block_size * cfg.grad_accum * parallel.dp
    bar = tqdm(total=cfg.max_steps, initial=start, desc="train", unit="step", mininterval=1.0,
               disable=not (progress and info.is_main))
    records, t_start = [], time.perf_counter()
    tracer = (profile_steps(out / "trace", info.rank, active=cfg.trace_steps) if cfg.trace_steps
              else contextlib.nullcontext())
    prof = tracer.__enter__()
    for step in range(start + 1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=info.device)  # summed on the device: no sync per micro-batch
        if mesh is None:
            for micro in range(cfg.grad_accum):
                x, y = (t.to(info.device, non_blocking=True) for t in next(batches))
                last = micro == cfg.grad_accum - 1
                if zero is not None:  # stage 1: no_sync but for the last; 2/3: reduce-scatter after each backward
                    sync = zero.micro_batch(last)
                else:
                    sync = contextlib.nullcontext() if (last and overlap) or not info.distributed else ddp.no_sync()
                with sync:
                    with _autocast(cfg.dtype, info.device):
                        loss = ddp(x, y)[1] / cfg.grad_accum
                    scaler.scale(loss).backward()
                loss_sum += loss.detach().float()
            if not overlap:
                all_reduce_gradients(model, info.world_size)
            scaler.unscale_(optimizer)
            grad_norm = (zero.clip_grad_norm_(cfg.grad_clip or float("inf")) if zero is not None else
                         torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")))
        else:
            for _ in range(cfg.grad_accum):
                x, y = (t.to(info.device, non_blocking=True) for t in next(batches))
                with _autocast(cfg.dtype, info.device):
                    loss_sum += model.forward_backward(x, y, cfg.grad_accum).float()
            if parallel.dp > 1:
                all_reduce_gradients(model, parallel.dp, mesh.dp_group)
            grad_norm = model.clip_grad_norm_(cfg.grad_clip or float("inf"))
        scaler.step(optimizer)
        scaler.update()
        held = None if mesh is not None else zero.held_bytes() if zero is not None else held_bytes(model, optimizer)
        optimizer.zero_grad(set_to_none=True)
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        step_time = time.perf_counter() - t0
        if prof is not None:
            prof.step()

        # Every rank of a replica holds its loss (the last stage broadcasts it), so the world mean is the DP mean.
        record = {"step": step, "loss": all_reduce_mean(loss_sum.item()), "lr": lr, "grad_norm": grad_norm.item(),
                  "tokens_per_s": tokens_per_step / step_time, "step_time_s": step_time,
                  "tokens": step * tokens_per_step, "elapsed_s": time.perf_counter() - t_start}
        if held is not None:
            record.update(gather_held_bytes(held, info.world_size, info.device))
        if cfg.eval_interval and (step % cfg.eval_interval == 0 or step == cfg.max_steps):
            record["val_loss"] = evaluate(zero or model, val, cfg, info.device)
        if info.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        records.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if (cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0) or step == cfg.max_steps:
            save(out, step, model, optimizer, batches, meta, info, cfg, mesh, zero)
        if os.environ.get(KILL_AFTER_STEP) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
    tracer.__exit__(None, None, None)
    bar.close()
    if records:
        last = records[-1]
        print0(f"done: step {last['step']} loss {last['loss']:.4f} "
               f"{sum(r['tokens_per_s'] for r in records) / len(records):.0f} tokens/s -> {out}")
    cleanup()
    return records


MODEL_FLAGS = {"n_layer": int, "n_head": int, "n_embd": int, "block_size": int, "dropout": float}
TRAINING_FLAGS = {"max_steps": int, "lr_decay_steps": int, "batch_size": int, "grad_accum": int, "lr": float,
                  "min_lr": float, "warmup_steps": int, "weight_decay": float, "grad_clip": float,
                  "eval_interval": int, "eval_iters": int, "checkpoint_interval": int, "keep_checkpoints": int,
                  "seed": int, "data": str, "tokenizer_vocab": int, "corpus_max_bytes": int, "ddp_bucket_mb": float,
                  "trace_steps": int}


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model-shape flags every GPT trainer takes (``--n-layer`` ...), defaults from the profile."""
    model = parser.add_argument_group("model (defaults from the profile)")
    for name, kind in MODEL_FLAGS.items():
        model.add_argument("--" + name.replace("_", "-"), type=kind)


def add_training_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> argparse._ArgumentGroup:
    """The training flags (``--max-steps`` ...: :data:`TRAINING_FLAGS` but ``skip``), defaults from the profile.
    Returns the argument group, for a trainer's own flags."""
    train = parser.add_argument_group("training (defaults from the profile)")
    for name, kind in TRAINING_FLAGS.items():
        if name not in skip:
            train.add_argument("--" + name.replace("_", "-"), type=kind)
    return train


def model_config_from_args(base: GPTConfig, args: argparse.Namespace) -> GPTConfig:
    """The profile's model with the shape flags given on the command line."""
    values = vars(args)
    return override(base, **{name: values[name] for name in MODEL_FLAGS})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m labs_lib.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", help="ci | cpu | gpu (default: $LABS_PROFILE, else gpu with CUDA, else cpu)")
    p.add_argument("--out", required=True, help="run folder: metrics, checkpoints, tokenizer")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_args(p)
    train = add_training_args(p)
    train.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model")
    train.add_argument("--ddp-overlap", action=argparse.BooleanOptionalAction,
                       help="--no-ddp-overlap: all-reduce gradients after backward instead of during it")
    train.add_argument("--dtype", choices=("fp32", "bf16", "fp16"))
    memory = p.add_argument_group("memory saving (labs_lib.memory)")
    memory.add_argument("--activation-checkpointing", choices=CHECKPOINT_MODES,
                        help="recompute in backward: full blocks, or selective (all but the matmuls); default none")
    memory.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3),
                        help="ZeRO by hand instead of DDP: 1 optimizer state, 2 + gradients, 3 + parameters sharded "
                             "over the ranks (data parallel only; default 0)")
    layout = p.add_argument_group("3D parallelism (default: data parallel over every rank)")
    layout.add_argument("--dp", type=int, help="data-parallel replicas (default: world size / (tp * pp))")
    layout.add_argument("--tp", type=int, help="tensor-parallel ranks per layer (1)")
    layout.add_argument("--pp", type=int, help="pipeline stages (1)")
    layout.add_argument("--micro-batches", type=int, help="pipeline micro-batches per batch (1)")
    layout.add_argument("--pp-schedule", "--schedule", choices=SCHEDULES, help="pipeline schedule (1f1b)")
    layout.add_argument("--pp-chunks", type=int, help="model chunks per pipeline rank, interleaved-1f1b (1)")
    layout.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction,
                        help="split the activations between TP regions along the sequence (needs --tp)")
    return p


def configs_from_args(args: argparse.Namespace) -> tuple[GPTConfig, TrainConfig, ParallelConfig]:
    profile = get_profile(args.profile)
    values = vars(args)
    model_cfg = model_config_from_args(profile.model, args)
    train_names = [f for f in TrainConfig.__dataclass_fields__ if f in values]
    train_cfg = override(profile.train, **{k: values[k] for k in train_names})
    if args.tokenizer_vocab is not None:  # the embedding table follows the tokenizer, padded to 64
        model_cfg = override(model_cfg, vocab_size=-(-args.tokenizer_vocab // 64) * 64)
    parallel = override(profile.parallel, **{k: values[k] for k in ParallelConfig.__dataclass_fields__})
    return model_cfg, train_cfg, parallel


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        model_cfg, train_cfg, parallel = configs_from_args(args)
        world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        check_layout(model_cfg, train_cfg, parallel, world_size, device_type)
    except ValueError as e:
        raise SystemExit(f"invalid configuration: {e}") from None
    train(model_cfg, train_cfg, args.out, resume=args.resume, progress=not args.no_progress, parallel=parallel)


if __name__ == "__main__":
    from labs_lib.dist import exit_process

    main()
    exit_process()  # not the interpreter's teardown: leftover gloo threads can abort it

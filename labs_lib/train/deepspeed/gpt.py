"""Train the workshop GPT with DeepSpeed (ZeRO 0/1/2/3, ZeRO-Offload): the production side of lab 03's ZeRO by hand.

    python -m labs_lib.train.deepspeed.gpt --profile ci --out build/runs/ds --ds-config zero2.json
    torchrun --standalone --nproc-per-node=2 -m labs_lib.train.deepspeed.gpt --profile ci --out build/runs/z3 \
        --ds-config configs/deepspeed/zero3.json --max-steps 20
    TRAIN_MODULE=labs_lib.train.deepspeed.gpt sbatch slurm/train_gpt.sbatch --ds-config configs/deepspeed/zero2.json
    python -m labs_lib.train.deepspeed.gpt ... --bf16 --grad-accum 2 --activation-checkpointing --flops-profile --resume
    torchrun --standalone --nproc-per-node=4 -m labs_lib.train.deepspeed.gpt --profile ci --out build/runs/ds_moe \
        --n-experts 8 --ep 4 --moe-noise rsample [--moe-residual]     # DeepSpeed's MoE (labs_lib.train.deepspeed.moe)

Same model (labs_lib.models.gpt), same data (each rank reads its slice of the global batch), same learning-rate
schedule (labs_lib.train.optim.lr_at), same loop (labs_lib.train.loop.run_loop) and same metrics.jsonl as
``python -m labs_lib.train``: with fp32, dropout 0 and the same global batch, every ZeRO stage logs the losses of
the DDP run. What differs is who holds what: each record has ``mem_rank<r>`` = bytes rank r holds of parameters,
gradients (at the accumulation boundary), fp32 master weights and Adam moments (``optimizer``), read from the
engine's own tensors (labs_lib.measure.memory.deepspeed_held_bytes). ZeRO-1 splits the optimizer state over the
ranks, ZeRO-2 the gradients too, ZeRO-3 the parameters too.

The configs in configs/deepspeed/ leave the micro-batch (``--batch-size``), accumulation (``--grad-accum``) and
learning rate (the profile's; the schedule sets it every step) to the run (labs_lib.train.deepspeed.config). Their
optimizer is ``python -m labs_lib.train``'s: AdamW, betas (0.9, 0.95), weight decay 0.1 on matrices only (the
trainer passes labs_lib.train.optim.param_groups), clipping 1.0. ``torch_adam: true`` keeps torch's AdamW (DeepSpeed
would JIT-build its FusedAdam); the offload config leaves it out, so ZeRO-Offload gets DeepSpeedCPUAdam. DeepSpeed
joins the process group labs_lib.core.dist made (gloo on CPU, NCCL on GPU). Outputs in ``--out``: metrics.jsonl,
config.json (with the resolved DeepSpeed config), tokenizer.json, checkpoints/ (DeepSpeed's save_checkpoint, one
``step_NNNNNN`` folder per checkpoint with our meta.json once complete, and DeepSpeed's ``latest``),
flops_profile.txt (``--flops-profile``).
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
from pathlib import Path

import torch

from labs_lib.core import checkpoint
from labs_lib.core.config import GPTConfig, TrainConfig, get_profile, override, parse_job_args, validate
from labs_lib.core.dist import DistInfo, all_reduce_mean, cleanup, print0
from labs_lib.core.runs import truncate_metrics, write_json
from labs_lib.data.text import TokenBatches, eval_batches, prepare_data
from labs_lib.measure.memory import deepspeed_held_bytes, gather_per_rank, per_rank_fields
from labs_lib.models.gpt import GPT
from labs_lib.train.cli import (
    add_model_args,
    add_run_args,
    add_training_args,
    device_type,
    model_config_from_args,
    world_size_from_env,
)
from labs_lib.train.deepspeed.config import check_ds_config, load_ds_config, resolve_ds_config, zero_stage
from labs_lib.train.deepspeed.moe import apply_deepspeed_moe, check_deepspeed_moe, moe_param_groups
from labs_lib.train.deepspeed.setup import start as start_deepspeed
from labs_lib.train.loop import Loop, run_loop
from labs_lib.train.optim import lr_at, param_groups
from labs_lib.train.steps import evaluate

PROG = "python -m labs_lib.train.deepspeed.gpt"
FLOPS_PROFILE_STEP = 2  # profile the third step: the first two pay for allocation and the first collectives


# --------------------------------------------------------------------------------------------------- the command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p)
    p.add_argument("--ds-config", default="zero2.json", help="DeepSpeed JSON config: a path, or a name in "
                                                             "configs/deepspeed/ (zero2.json)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 weights and activations (DeepSpeed's bf16 section)")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute each transformer block in backward (deepspeed.checkpointing)")
    p.add_argument("--flops-profile", action=argparse.BooleanOptionalAction, default=False,
                   help="DeepSpeed's flops profiler on one step after warm-up -> flops_profile.txt")
    p.add_argument("--ep", type=int, default=1, help="with --n-experts: DeepSpeed MoE's expert-parallel size (1)")
    p.add_argument("--moe-residual", action=argparse.BooleanOptionalAction, default=False,
                   help="with --n-experts: residual MoE (a dense MLP beside the experts)")
    add_model_args(p)
    # The DeepSpeed config sets weight decay and clipping; DeepSpeed does the gradient reduction and no tracing.
    add_training_args(p, skip=("weight_decay", "grad_clip", "tokenizer_vocab", "ddp_bucket_mb", "trace_steps"))
    return p


def configs_from_args(args: argparse.Namespace) -> tuple[GPTConfig, TrainConfig, dict]:
    profile = get_profile(args.profile)
    values = vars(args)
    own = ("activation_checkpointing",)  # a switch here (DeepSpeed's full recompute), a mode in TrainConfig
    train_cfg = override(profile.train, **{k: values[k] for k in TrainConfig.__dataclass_fields__
                                           if k in values and k not in own},
                         dtype="bf16" if args.bf16 else "fp32", compile=False,
                         activation_checkpointing="full" if args.activation_checkpointing else "none")
    ds = load_ds_config(args.ds_config)
    # The JSON is the truth where it gives a value (for the loop and config.json too); "auto": the flags' or profile's
    from_json = {"weight_decay": ds.get("optimizer", {}).get("params", {}).get("weight_decay", "auto"),
                 "grad_clip": ds.get("gradient_clipping", "auto"),
                 "batch_size": ds.get("train_micro_batch_size_per_gpu", "auto"),
                 "grad_accum": ds.get("gradient_accumulation_steps", "auto"),
                 "dtype": "bf16" if ds.get("bf16", {}).get("enabled") is True else "auto"}  # --bf16 turns it on too
    flags = {"batch_size": args.batch_size, "grad_accum": args.grad_accum}
    for key, value in from_json.items():
        if value != "auto" and flags.get(key) is not None and flags[key] != value:
            raise ValueError(f"the DeepSpeed config says {key}={value!r} but the command line says {flags[key]!r}: "
                             "give it in one place (\"auto\" in the JSON leaves it to the command line)")
    train_cfg = override(train_cfg, **{k: v for k, v in from_json.items() if v != "auto"})
    return model_config_from_args(profile.model, args), train_cfg, ds


def resolved_ds_config(ds: dict, cfg: TrainConfig, world_size: int, flops_profile_file: str | None = None) -> dict:
    """The DeepSpeed config with this run's values in every "auto"."""
    return resolve_ds_config(ds, world_size, micro_batch=cfg.batch_size, grad_accum=cfg.grad_accum,
                             grad_clip=cfg.grad_clip, lr=cfg.lr, betas=[cfg.beta1, cfg.beta2],
                             weight_decay=cfg.weight_decay, total_steps=cfg.max_steps,
                             bf16=True if cfg.dtype == "bf16" else None, flops_profile_file=flops_profile_file,
                             profile_step=FLOPS_PROFILE_STEP)


def check_args(argv: list[str], world_size: int) -> int:
    """The pre-launch check (labs_lib.jobs.launch and slurm/train_gpt.sbatch call it): parse and validate what the
    ranks will see; ValueError naming the fix. Returns the number of steps the run logs."""
    args = parse_job_args(build_parser(), argv)
    model_cfg, train_cfg, ds = configs_from_args(args)
    check_ds_config(ds, device_type())
    if "scheduler" in ds:
        raise ValueError("this trainer sets the learning rate every step (labs_lib.train.optim.lr_at, as python -m "
                         "labs_lib.train does): remove the \"scheduler\" section from the DeepSpeed config")
    validate(model_cfg, train_cfg, world_size=world_size, device_type=device_type())
    check_deepspeed_moe(model_cfg, args.ep, world_size, zero_stage(ds), args.moe_residual)
    resolved_ds_config(ds, train_cfg, world_size, "flops_profile.txt" if args.flops_profile else None)
    return train_cfg.max_steps


# --------------------------------------------------------------------------------------------------------- training
def _checkpoint_blocks(model: GPT) -> None:
    """Activation checkpointing: keep only each block's input, recompute its inside during backward."""
    import deepspeed

    deepspeed.checkpointing.configure(None)  # no model parallelism: plain recomputation
    for block in model.blocks:
        block.forward = functools.partial(deepspeed.checkpointing.checkpoint, block.forward)


def _train_step(engine, stage: int, batches: TokenBatches, cfg: TrainConfig, info: DistInfo) -> tuple:
    """One optimizer step of ``grad_accum`` micro-batches; this rank's (loss, grad norm, held bytes)."""
    grad_norm = None
    loss_sum = torch.zeros((), device=info.device)
    for micro in range(cfg.grad_accum):
        x, y = (t.to(info.device, non_blocking=True) for t in next(batches))
        loss = engine(x, y)[1]
        engine.backward(loss)  # scales by 1/grad_accum; reduces (ZeRO-2/3: reduce-scatters) at the boundary
        if micro == cfg.grad_accum - 1:
            held = deepspeed_held_bytes(engine, grads=True)  # the gradients as the optimizer step will see them
            if stage == 0:  # ZeRO-0 clips without keeping the norm: take it from the reduced gradients
                grad_norm = torch.linalg.vector_norm(torch.stack([
                    torch.linalg.vector_norm(p.grad.float()) for p in engine.module.parameters()
                    if p.grad is not None])).item()
        engine.step()  # a no-op before the boundary; then clip, step, zero the gradients
        loss_sum += loss.detach().float() / cfg.grad_accum
    after = deepspeed_held_bytes(engine)  # Adam's moments exist from the first step on
    held.update(master=after["master"], optimizer=after["optimizer"])
    if stage > 0:
        grad_norm = engine.get_global_grad_norm()
    return loss_sum, grad_norm, held


def _step_fields(result: tuple, info: DistInfo) -> dict:
    """The record's loss (averaged over the ranks), grad norm and ``mem_rank<r>``, once the step is timed."""
    loss_sum, grad_norm, held = result
    return {"loss": all_reduce_mean(loss_sum.item()), "grad_norm": float(grad_norm) if grad_norm is not None else None,
            **per_rank_fields(gather_per_rank(held, info.world_size, info.device))}


def _resume(engine, ckpt_dir: Path, batches: TokenBatches) -> int:
    """Load the newest complete checkpoint (the one with our meta.json); returns its step (0: none)."""
    latest = checkpoint.latest_checkpoint(ckpt_dir)
    if latest is None:
        print0(f"--resume: no checkpoint in {ckpt_dir}, starting from step 0")
        return 0
    engine.load_checkpoint(str(ckpt_dir), tag=latest.name)
    meta = checkpoint.load_meta(latest)
    batches.load_state_dict(meta["data"])
    print0(f"resumed from {latest} (step {meta['step']})")
    return meta["step"]


def _save(engine, ckpt_dir: Path, step: int, batches: TokenBatches, keep: int, is_main: bool) -> None:
    # Every rank writes its own ZeRO shards; save_checkpoint ends in a barrier, so once it returns all are on disk
    # and meta.json marks the folder complete (labs_lib.core.checkpoint's rule), which makes it prunable.
    tag = checkpoint.step_dir_name(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag)
    if is_main:
        write_json(ckpt_dir / tag / "meta.json", {"step": step, "data": batches.state_dict()})
        checkpoint.prune(ckpt_dir, keep)


def train(model_cfg: GPTConfig, cfg: TrainConfig, ds_config: dict, out: str | Path, resume: bool = False,
          progress: bool = True, activation_checkpointing: bool = False, flops_profile: bool = False,
          ep: int = 1, moe_residual: bool = False) -> list[dict]:
    """Run (or resume) DeepSpeed training in this process, as one rank of whatever launched it. Returns the metrics.
    An MoE GPT (``model_cfg.n_experts``) gets DeepSpeed's MoE layers over ``ep`` ranks
    (labs_lib.train.deepspeed.moe)."""
    deepspeed, info = start_deepspeed()
    out = Path(out)
    ds = resolved_ds_config(ds_config, cfg, info.world_size, str(out / "flops_profile.txt") if flops_profile else None)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg.data, cfg.tokenizer_vocab, cfg.corpus_max_bytes, cfg.val_fraction,
                        progress=progress and info.is_main)
    if info.is_main:
        shutil.copyfile(data.tokenizer_path, out / "tokenizer.json")
        write_json(out / "config.json", {"model": model_cfg.to_dict(), "train": cfg.to_dict(), "deepspeed": ds,
                                         "world_size": info.world_size, "data_dir": str(data.dir),
                                         "activation_checkpointing": activation_checkpointing})

    torch.manual_seed(cfg.seed)  # same initial weights on every rank (ZeRO-3 then keeps each rank's slice)
    model = GPT(model_cfg)
    if model_cfg.n_experts:
        apply_deepspeed_moe(model, ep, moe_residual)
    model = model.to(info.device)
    if activation_checkpointing:
        _checkpoint_blocks(model)
    groups = param_groups(model, ds["optimizer"]["params"]["weight_decay"])
    if model_cfg.n_experts:
        groups = moe_param_groups(groups)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds)
    batches = TokenBatches(data.train_path, cfg.batch_size, model_cfg.block_size, info.rank, info.world_size,
                           seed=cfg.seed)
    val = eval_batches(data.val_path, cfg.batch_size, model_cfg.block_size, cfg.eval_iters, info.rank,
                       info.world_size)
    torch.manual_seed(cfg.seed + 1 + info.rank)  # dropout masks differ between ranks

    ckpt_dir = out / "checkpoints"
    start = _resume(engine, ckpt_dir, batches) if resume else 0
    if info.is_main:
        truncate_metrics(out, start)  # a resumed run logs the later steps again
    loop = Loop(out=out, max_steps=cfg.max_steps, start=start, is_main=info.is_main, progress=progress,
                samples_per_step=cfg.batch_size * model_cfg.block_size * cfg.grad_accum * info.world_size,
                eval_every=cfg.eval_interval, checkpoint_every=cfg.checkpoint_interval,
                desc=f"deepspeed zero-{zero_stage(ds)}", device=info.device)
    records = run_loop(
        lambda step: _train_step(engine, zero_stage(ds), batches, cfg, info), loop,
        optimizer=engine.optimizer, lr_of=lambda step: lr_at(step, cfg),  # our schedule, no DeepSpeed scheduler
        evaluate=(lambda step: {"val_loss": evaluate(engine, val, "fp32", info.device)}) if cfg.eval_interval
        else None,
        save=lambda step: _save(engine, ckpt_dir, step, batches, cfg.keep_checkpoints, info.is_main),
        record_fields=lambda result: _step_fields(result, info))
    cleanup()  # a barrier, then destroy the group: no rank exits while another still talks
    return records


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:  # every bad setting fails here, before DeepSpeed starts or builds anything
        check_args(argv, world_size_from_env())
        model_cfg, train_cfg, ds = configs_from_args(args)
    except ValueError as e:
        raise SystemExit(f"invalid configuration: {e}") from None
    train(model_cfg, train_cfg, ds, args.out, resume=args.resume, progress=not args.no_progress,
          activation_checkpointing=args.activation_checkpointing, flops_profile=args.flops_profile, ep=args.ep,
          moe_residual=args.moe_residual)


if __name__ == "__main__":
    from labs_lib.core.dist import exit_process

    main()
    exit_process()  # not the interpreter's teardown: leftover gloo threads can abort it

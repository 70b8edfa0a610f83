"""Train the workshop GPT with DeepSpeed (ZeRO 0/1/2/3, ZeRO-Offload): the production side of lab 03's ZeRO by hand.

    python -m labs_lib.train.deepspeed.gpt --profile ci --out build/runs/ds --ds-config configs/deepspeed/zero2.json
    torchrun --standalone --nproc-per-node=2 -m labs_lib.train.deepspeed.gpt --profile ci --out build/runs/z3 \
        --ds-config configs/deepspeed/zero3.json --max-steps 20
    TRAIN_MODULE=labs_lib.train.deepspeed.gpt sbatch slurm/train_gpt.sbatch --ds-config configs/deepspeed/zero2.json
    python -m labs_lib.train.deepspeed.gpt ... --bf16 --grad-accum 2 --activation-checkpointing --flops-profile --resume

Same model (labs_lib.models.gpt), same data (each rank reads its slice of the global batch), same learning-rate
schedule (labs_lib.train.gpt.lr_at) and same metrics.jsonl as ``python -m labs_lib.train``: with fp32, dropout 0 and the
same global batch, every ZeRO stage logs the losses of the DDP run. What differs is who holds what: each record has
``mem_rank<r>`` = bytes rank r holds of parameters, gradients (at the accumulation boundary), fp32 master weights and
Adam moments (``optimizer``), read from the engine's own tensors. ZeRO-1 splits the optimizer state over the ranks,
ZeRO-2 the gradients too, ZeRO-3 the parameters too.

The JSON configs in configs/deepspeed/ are plain DeepSpeed configs with ``"auto"`` where the run decides: micro-batch
(``--batch-size``), accumulation (``--grad-accum``), learning rate (the profile's; the schedule sets it every step).
Their optimizer is labs_lib.train.gpt's: AdamW, betas (0.9, 0.95), weight decay 0.1 on matrices only (the trainer passes
the two parameter groups), gradient clipping 1.0. ``torch_adam: true`` keeps torch's AdamW (DeepSpeed would JIT-build
its FusedAdam); the offload config leaves it out, so ZeRO-Offload gets DeepSpeedCPUAdam. DeepSpeed joins the process
group labs_lib.core.dist made (gloo on CPU, NCCL on GPU): ``deepspeed.init_distributed`` wraps an initialised torch group
instead of making its own. Outputs in ``--out``: metrics.jsonl, config.json (with the resolved DeepSpeed config),
tokenizer.json, checkpoints/ (DeepSpeed's save_checkpoint: one folder per step and a ``latest`` file),
flops_profile.txt (``--flops-profile``).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from labs_lib.core.config import GPTConfig, TrainConfig, get_profile, override, validate
from labs_lib.data.text import TokenBatches, eval_batches, prepare_data
from labs_lib.train.deepspeed.setup import start as start_deepspeed
from labs_lib.core.dist import all_reduce_mean, cleanup, print0
from labs_lib.models.gpt import GPT
from labs_lib.train.gpt import add_model_args, add_training_args, evaluate, lr_at, model_config_from_args, read_metrics

__all__ = ["load_ds_config", "resolve_ds_config", "check_ds_config", "check_training_config", "train",
           "read_metrics", "held_bytes", "deepspeed_bytes_per_rank"]

STAGES = (0, 1, 2, 3)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "deepspeed"


# ---------------------------------------------------------------------------------------------------- the config
def load_ds_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists() and (CONFIG_DIR / path.name).exists():  # "zero2.json" works from any folder
        path = CONFIG_DIR / path.name
    if not path.exists():
        raise ValueError(f"no DeepSpeed config {path}: choose one of "
                         f"{', '.join(sorted(p.name for p in CONFIG_DIR.glob('*.json')))} in {CONFIG_DIR}")
    return json.loads(path.read_text())


def resolve_ds_config(ds: dict, cfg: TrainConfig, world_size: int, bf16: bool = False,
                      flops_profile_file: str | None = None) -> dict:
    """A copy of ``ds`` with every "auto" filled from the run, ``--bf16`` applied, the global batch stated."""
    ds = copy.deepcopy(ds)
    auto = {"train_micro_batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": cfg.grad_accum,
            "gradient_clipping": cfg.grad_clip}
    for key, value in auto.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world_size
    params = ds.setdefault("optimizer", {"type": "AdamW"}).setdefault("params", {})
    for key, value in {"lr": cfg.lr, "betas": [cfg.beta1, cfg.beta2], "weight_decay": cfg.weight_decay}.items():
        if params.get(key, "auto") == "auto":
            params[key] = value
    if bf16:
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": True}
    if flops_profile_file:  # one profiled step, after a warm-up step
        ds["flops_profiler"] = {"enabled": True, "profile_step": min(2, cfg.max_steps), "module_depth": -1,
                                "top_modules": 3, "detailed": True, "output_file": flops_profile_file}
    return require_filled(ds)


def require_filled(ds: dict) -> dict:
    """The DeepSpeed config, once no "auto" value is left in it (DeepSpeed would reject it later, less clearly)."""
    left = [k for k, v in _walk(ds) if v == "auto"]
    if left:
        raise ValueError(f"DeepSpeed config keys {left} are 'auto' but this trainer does not fill them: give values")
    return ds


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield prefix + k, v


def zero_stage(ds: dict) -> int:
    return ds.get("zero_optimization", {}).get("stage", 0)


def check_ds_config(ds: dict, device_type: str = "cpu") -> None:
    """Raise ValueError naming the fix for DeepSpeed settings this workshop cannot run. Call before spawning."""
    stage = zero_stage(ds)
    if stage not in STAGES:
        raise ValueError(f"zero_optimization.stage={stage!r} does not exist: use 0, 1, 2 or 3 "
                         f"(configs/deepspeed/zero{{0,1,2,3}}.json)")
    if ds.get("fp16", {}).get("enabled") and device_type != "cuda":
        raise ValueError("fp16 needs a CUDA GPU (DeepSpeed's CPU accelerator has no fp16 loss scaling): remove the "
                         "\"fp16\" section from the DeepSpeed config and pass --bf16 (or train in fp32)")
    if ds.get("fp16", {}).get("enabled") and ds.get("bf16", {}).get("enabled"):
        raise ValueError("fp16 and bf16 are both enabled in the DeepSpeed config: keep one")
    zero = ds.get("zero_optimization", {})
    offload = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    if offload and stage == 0:
        raise ValueError("offload_optimizer needs ZeRO stage 1, 2 or 3: set zero_optimization.stage (e.g. 2)")
    if offload and ds.get("optimizer", {}).get("params", {}).get("torch_adam"):
        raise ValueError("ZeRO-Offload steps the optimizer with DeepSpeedCPUAdam: remove \"torch_adam\" from "
                         "optimizer.params (see configs/deepspeed/zero2_offload.json)")
    if zero.get("offload_optimizer", {}).get("pin_memory") and device_type != "cuda":
        raise ValueError("offload_optimizer.pin_memory needs CUDA: set it to false on CPU")


# --------------------------------------------------------------------------------------------------- the command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m labs_lib.train.deepspeed.gpt", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", help="ci | cpu | gpu (default: $LABS_PROFILE, else gpu with CUDA, else cpu)")
    p.add_argument("--out", required=True, help="run folder: metrics, checkpoints, tokenizer")
    p.add_argument("--ds-config", default="configs/deepspeed/zero2.json", help="DeepSpeed JSON config (zero2.json)")
    p.add_argument("--bf16", action="store_true", help="bf16 weights and activations (DeepSpeed's bf16 section)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each transformer block in backward (deepspeed.checkpointing)")
    p.add_argument("--flops-profile", action="store_true",
                   help="DeepSpeed's flops profiler on one step after warm-up -> flops_profile.txt")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_args(p)
    # The DeepSpeed config sets weight decay and clipping; DeepSpeed does the gradient reduction and no tracing.
    add_training_args(p, skip=("weight_decay", "grad_clip", "tokenizer_vocab", "ddp_bucket_mb", "trace_steps"))
    return p


def configs_from_args(args: argparse.Namespace) -> tuple[GPTConfig, TrainConfig, dict]:
    profile = get_profile(args.profile)
    values = vars(args)
    model_cfg = model_config_from_args(profile.model, args)
    own = ("activation_checkpointing",)  # a switch here (DeepSpeed's full recompute), a mode in TrainConfig
    train_cfg = override(profile.train, **{k: values[k] for k in TrainConfig.__dataclass_fields__
                                           if k in values and k not in own},
                         dtype="bf16" if args.bf16 else "fp32", compile=False,
                         activation_checkpointing="full" if args.activation_checkpointing else "none")
    ds = load_ds_config(args.ds_config)
    # The JSON is the optimizer's truth: clipping and weight decay come from it (for evaluation and config.json too).
    opt = ds.get("optimizer", {}).get("params", {})
    train_cfg = override(train_cfg, weight_decay=None if opt.get("weight_decay", "auto") == "auto"
                         else opt["weight_decay"],
                         grad_clip=None if ds.get("gradient_clipping", "auto") == "auto" else ds["gradient_clipping"])
    return model_cfg, train_cfg, ds


def check_training_config(args: list[str], world_size: int) -> tuple[GPTConfig, TrainConfig]:
    """Parse and validate what the ranks will see (slurm/train_gpt.sbatch calls this before srun); ValueError
    naming the fix. Returns the (model, train) configs."""
    parsed = build_parser().parse_args(args)
    model_cfg, train_cfg, ds = configs_from_args(parsed)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    check_ds_config(ds, device_type)
    validate(model_cfg, train_cfg, world_size=world_size, device_type=device_type)
    resolve_ds_config(ds, train_cfg, world_size, parsed.bf16)
    return model_cfg, train_cfg


# --------------------------------------------------------------------------------------------------------- training
def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """labs_lib.train.gpt.make_optimizer's split: weight decay on matrices only, tied weights once."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def _checkpoint_blocks(model: GPT) -> None:
    """Activation checkpointing: keep only each block's input, recompute its inside during backward."""
    import deepspeed

    deepspeed.checkpointing.configure(None)  # no model parallelism: plain recomputation
    for block in model.blocks:
        block.forward = functools.partial(deepspeed.checkpointing.checkpoint, block.forward)


def _prune(ckpt_dir: Path, keep: int) -> None:
    tags = sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def train(model_cfg: GPTConfig, cfg: TrainConfig, ds_config: dict, out: str | Path, resume: bool = False,
          progress: bool = True, activation_checkpointing: bool = False, flops_profile: bool = False) -> list[dict]:
    """Run (or resume) DeepSpeed training in this process, as one rank of whatever launched it. Returns the metrics."""
    deepspeed, info = start_deepspeed()
    world_size = dist.get_world_size()
    out = Path(out)
    ds = resolve_ds_config(ds_config, cfg, world_size, cfg.dtype == "bf16",
                           str(out / "flops_profile.txt") if flops_profile else None)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg.data, cfg.tokenizer_vocab, cfg.corpus_max_bytes, cfg.val_fraction,
                        progress=progress and info.is_main)
    meta = {"model": model_cfg.to_dict(), "train": cfg.to_dict(), "deepspeed": ds, "world_size": world_size,
            "activation_checkpointing": activation_checkpointing, "data_dir": str(data.dir)}
    if info.is_main:
        shutil.copyfile(data.tokenizer_path, out / "tokenizer.json")
        (out / "config.json").write_text(json.dumps(meta, indent=1))

    torch.manual_seed(cfg.seed)  # same initial weights on every rank (ZeRO-3 then keeps each rank's slice)
    model = GPT(model_cfg).to(info.device)
    if activation_checkpointing:
        _checkpoint_blocks(model)
    groups = optimizer_groups(model, ds["optimizer"]["params"].get("weight_decay", cfg.weight_decay))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds)
    rank = dist.get_rank()
    batches = TokenBatches(data.train_path, cfg.batch_size, model_cfg.block_size, rank, world_size, seed=cfg.seed)
    val = eval_batches(data.val_path, cfg.batch_size, model_cfg.block_size, cfg.eval_iters, rank, world_size)
    torch.manual_seed(cfg.seed + 1 + rank)  # dropout masks differ between ranks

    start, ckpt_dir = 0, out / "checkpoints"
    if resume:
        path, client = engine.load_checkpoint(str(ckpt_dir))
        if path is None:
            print0(f"--resume: no checkpoint in {ckpt_dir}, starting from step 0")
        else:
            start = client["step"]
            batches.load_state_dict(client["data"])
            print0(f"resumed from {path} (step {start})")
    metrics_path = out / "metrics.jsonl"
    if info.is_main:
        kept = [r for r in read_metrics(out) if r["step"] <= start] if resume else []
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    tokens_per_step = cfg.batch_size * model_cfg.block_size * cfg.grad_accum * world_size
    bar = tqdm(total=cfg.max_steps, initial=start, desc=f"deepspeed zero-{zero_stage(ds)}", unit="step",
               mininterval=1.0, disable=not (progress and info.is_main))
    records, t_start = [], time.perf_counter()
    for step in range(start + 1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in engine.optimizer.param_groups:  # our schedule, not DeepSpeed's scheduler section
            group["lr"] = lr
        loss_sum = torch.zeros((), device=info.device)
        for micro in range(cfg.grad_accum):
            x, y = (t.to(info.device, non_blocking=True) for t in next(batches))
            loss = engine(x, y)[1]
            engine.backward(loss)  # scales by 1/grad_accum; reduces (ZeRO-2/3: reduce-scatters) at the boundary
            if micro == cfg.grad_accum - 1:
                held = held_bytes(engine, grads=True)  # the gradients as the optimizer step will see them
                if zero_stage(ds) == 0:  # ZeRO-0 clips without keeping the norm: take it from the reduced grads
                    grad_norm = torch.linalg.vector_norm(torch.stack([
                        torch.linalg.vector_norm(p.grad.float()) for p in engine.module.parameters()
                        if p.grad is not None])).item()
            engine.step()  # a no-op before the boundary; then clip, step, zero the gradients
            loss_sum += loss.detach().float() / cfg.grad_accum
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        step_time = time.perf_counter() - t0

        after = held_bytes(engine)  # Adam's moments exist from the first step on
        held.update(master=after["master"], optimizer=after["optimizer"])
        if zero_stage(ds) > 0:
            grad_norm = engine.get_global_grad_norm()
        record = {"step": step, "loss": all_reduce_mean(loss_sum.item()), "lr": lr,
                  "grad_norm": float(grad_norm) if grad_norm is not None else None,
                  "tokens_per_s": tokens_per_step / step_time, "step_time_s": step_time,
                  "tokens": step * tokens_per_step, "elapsed_s": time.perf_counter() - t_start,
                  **_gather_held(held, world_size)}
        if cfg.eval_interval and (step % cfg.eval_interval == 0 or step == cfg.max_steps):
            record["val_loss"] = evaluate(engine, val, override(cfg, dtype="fp32"), info.device)
        if info.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        records.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if (cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0) or step == cfg.max_steps:
            # Every rank writes its own ZeRO shards; DeepSpeed updates checkpoints/latest once all are written.
            engine.save_checkpoint(str(ckpt_dir), tag=f"step_{step:06d}",
                                   client_state={"step": step, "data": batches.state_dict()})
            if info.is_main:
                _prune(ckpt_dir, cfg.keep_checkpoints)
    bar.close()
    if records:
        last = records[-1]
        print0(f"done: step {last['step']} loss {last['loss']:.4f} "
               f"{sum(r['tokens_per_s'] for r in records) / len(records):.0f} tokens/s -> {out}")
    cleanup()  # a barrier, then destroy the group: no rank exits while another still talks
    return records


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:  # every bad setting fails here, before DeepSpeed starts or builds anything
        world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
        check_training_config(argv if argv is not None else sys.argv[1:], world_size)
        model_cfg, train_cfg, ds = configs_from_args(args)
    except ValueError as e:
        raise SystemExit(f"invalid configuration: {e}") from None
    train(model_cfg, train_cfg, ds, args.out, resume=args.resume, progress=not args.no_progress,
          activation_checkpointing=args.activation_checkpointing, flops_profile=args.flops_profile)


if __name__ == "__main__":
    from labs_lib.core.dist import exit_process

    main()
    exit_process()  # not the interpreter's teardown: leftover gloo threads can abort it

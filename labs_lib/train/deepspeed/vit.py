"""Train lab 06's vision transformer on the digits with DeepSpeed: ZeRO + bf16, metrics, the flops profiler's report.

    python -m labs_lib.train.deepspeed.vit --out build/runs/vit                               # one process
    torchrun --standalone --nproc-per-node=2 -m labs_lib.train.deepspeed.vit --out build/runs/vit --zero-stage 2 --bf16
    sbatch slurm/train_vit.sbatch --flops-profile                                          # 2 nodes x 1 rank

The DeepSpeed config is configs/deepspeed/vit_zero2_bf16.json, a plain DeepSpeed config with ``"auto"`` where the run
decides (labs_lib.train.deepspeed.config): the micro-batch per rank and the learning rate (the profile's, or
``--batch-size`` / ``--lr``) and the WarmupCosineLR schedule's length (``--epochs`` × steps per epoch, 10 % warm-up);
DeepSpeed's scheduler sets the learning rate. ``--zero-stage`` and ``--bf16`` / ``--no-bf16`` override the file.
DeepSpeed joins the process group labs_lib.core.dist made (gloo on CPU, NCCL on GPU).

Each rank trains on its slice of every global batch (labs_lib.data.digits.ShardedLoader) and evaluates its slice of
the held-out set; the counts are summed over the ranks. The steps run through labs_lib.train.loop.run_loop, one
record per epoch. Written into ``--out`` by rank 0:

    run.json            model config, parameter count, FLOPs per image (formula), world size, the resolved
                        DeepSpeed config, and what each rank holds (bytes of weights, fp32 master, Adam moments)
    metrics.jsonl       one record per epoch: step, loss (the epoch's mean), lr, images_per_s, step_time_s, images,
                        elapsed_s, grad_norm, epoch, test_loss, test_accuracy
    predictions.json    the final model's prediction and confidence for every test image
    flops_profile.txt   (--flops-profile) the DeepSpeed flops profiler's report of one training step
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from labs_lib.core.config import ZERO_STAGES, parse_job_args
from labs_lib.core.dist import DistInfo, all_reduce_mean, cleanup, print0
from labs_lib.core.runs import truncate_metrics, write_json
from labs_lib.data.digits import DigitsData, ShardedLoader, load_digits_split
from labs_lib.measure.memory import deepspeed_held_bytes, gather_per_rank
from labs_lib.models.vit import ViT, ViTConfig, vit_flops_per_image, vit_profile
from labs_lib.train.cli import add_run_args, device_type, world_size_from_env
from labs_lib.train.deepspeed.config import CONFIG_DIR, check_ds_config, load_ds_config, resolve_ds_config, zero_stage
from labs_lib.train.loop import Loop, run_loop
from labs_lib.train.optim import param_groups

DEFAULT_CONFIG = CONFIG_DIR / "vit_zero2_bf16.json"
WARMUP_FRACTION = 0.1
NO_DECAY = ("cls_token", "pos_emb")  # learned tables, not weights: no weight decay (nor on biases and norms)


# ---------------------------------------------------------------------------------------------- settings and config
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m labs_lib.train.deepspeed.vit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p, resume=False)
    p.add_argument("--ds-config", default=DEFAULT_CONFIG.name, help="DeepSpeed JSON config: a path, or a name in "
                                                                    "configs/deepspeed/ (vit_zero2_bf16.json)")
    p.add_argument("--zero-stage", type=int, choices=ZERO_STAGES, help="override zero_optimization.stage")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 weights and activations (default: the config's bf16.enabled)")
    p.add_argument("--epochs", type=int, help="passes over the 1,437 training images (default: the profile's)")
    p.add_argument("--batch-size", type=int, help="images per rank per step (default: the profile's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the profile's)")
    p.add_argument("--patch-size", type=int, help="patch side in pixels, a divisor of 8 (default: the profile's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flops-profile", action=argparse.BooleanOptionalAction, default=False,
                   help="DeepSpeed flops profiler on one step (the config's profile_step + 1) -> flops_profile.txt")
    return p


def settings_from_args(args: argparse.Namespace) -> dict:
    """The run's settings: the profile's ViT sizes with the command line's overrides, and the DeepSpeed config as
    read, with ``--zero-stage`` and ``--bf16`` applied."""
    prof = vit_profile(args.profile)
    model = prof["model"]
    if args.patch_size:
        model = ViTConfig(**{**model.to_dict(), "patch_size": args.patch_size})  # checks it tiles the image
    ds = load_ds_config(args.ds_config)
    if args.zero_stage is not None:
        ds.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    if args.bf16 is not None:
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": args.bf16}
    return dict(profile=prof["name"], model=model, epochs=args.epochs or prof["epochs"],
                batch_size=args.batch_size or prof["batch_size"], lr=args.lr or prof["lr"], seed=args.seed,
                ds_config=ds, flops_profile=args.flops_profile)


def resolved_ds_config(settings: dict, steps_per_epoch: int, world_size: int,
                       flops_profile_file: str | None = None) -> dict:
    """The DeepSpeed config with this run's values in every "auto"."""
    total = steps_per_epoch * settings["epochs"]
    return resolve_ds_config(settings["ds_config"], world_size, micro_batch=settings["batch_size"],
                             lr=settings["lr"], total_steps=total, warmup_steps=max(1, round(WARMUP_FRACTION * total)),
                             flops_profile_file=flops_profile_file)


def steps_per_epoch(data: DigitsData, batch_size: int, world_size: int) -> int:
    """Optimizer steps per epoch: the loader's full global batches (ValueError when there is not one)."""
    return len(ShardedLoader(data.x_train, data.y_train, batch_size, world_size=world_size))


def check_args(argv: list[str], world_size: int) -> int:
    """The pre-launch check (labs_lib.jobs.launch and slurm/train_gpt.sbatch call it): parse and validate what the
    ranks will see; ValueError naming the fix. Returns the number of optimizer steps (the records' ``step``)."""
    s = settings_from_args(parse_job_args(build_parser(), argv))
    check_ds_config(s["ds_config"], device_type())
    steps = steps_per_epoch(load_digits_split(), s["batch_size"], world_size)
    resolved_ds_config(s, steps, world_size, "flops_profile.txt" if s["flops_profile"] else None)
    return steps * s["epochs"]


# --------------------------------------------------------------------------------------------------------- training
def _epochs(data: DigitsData, settings: dict, rank: int, world_size: int):
    """This rank's batches, epoch after epoch (a new shuffle each)."""
    for epoch in range(settings["epochs"]):
        yield from ShardedLoader(data.x_train, data.y_train, settings["batch_size"], rank, world_size, epoch,
                                 seed=settings["seed"])


def _profiler_off(engine) -> None:
    """After the profiled step: the profiler also switched on DeepSpeed's wall-clock timers (its report's backward
    and step latencies come from them), which would print three lines every step from then on. Switch all off."""
    from deepspeed.utils.timer import NoopTimer

    engine._config.flops_profiler_config.enabled = False
    engine._config.wall_clock_breakdown = False
    if hasattr(engine.optimizer, "timers"):  # the ZeRO optimizer logs its own step timers
        engine.optimizer.timers = NoopTimer()


def _train_step(engine, batch, step: int, dtype: torch.dtype, device: torch.device, profile_step: int | None) -> tuple:
    x, y = batch
    loss = F.cross_entropy(engine(x.to(device, dtype)).float(), y.to(device))
    engine.backward(loss)  # ZeRO-2: gradients are reduce-scattered during backward
    engine.step()  # clip, AdamW on this rank's shard, all-gather of the new weights, the scheduler's lr
    if profile_step is not None and step > profile_step:
        _profiler_off(engine)
    grad_norm = engine.get_global_grad_norm()
    return loss.detach(), None if grad_norm is None else float(grad_norm)


@torch.no_grad()
def _evaluate(model: ViT, data: DigitsData, info: DistInfo, dtype: torch.dtype) -> tuple[float, float, torch.Tensor]:
    """(test loss, test accuracy) over all ranks' slices, and this rank's rows (index, confidence, prediction)."""
    model.eval()
    idx = torch.arange(len(data.x_test))[info.rank::info.world_size]
    logits = model(data.x_test[idx].to(info.device, dtype)).float()
    labels = data.y_test[idx].to(info.device)
    totals = torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                          (logits.argmax(-1) == labels).sum().double(),
                          torch.tensor(len(idx), dtype=torch.float64, device=info.device)])
    if info.distributed:
        dist.all_reduce(totals)
    model.train()
    probs = logits.softmax(-1)
    rows = torch.stack([idx.to(info.device).float(), probs.max(-1).values, probs.argmax(-1).float()], 1)
    return (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item(), rows


def _gather_rows(rows: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Every rank's rows on every rank, also when ranks hold different numbers of rows (padded with index -1)."""
    if not info.distributed:
        return rows.cpu()
    n = torch.tensor(len(rows), device=info.device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    padded = torch.full((int(n), rows.size(1)), -1.0, device=info.device)
    padded[:len(rows)] = rows
    everyone = [torch.empty_like(padded) for _ in range(info.world_size)]
    dist.all_gather(everyone, padded)
    everything = torch.cat(everyone).cpu()
    return everything[everything[:, 0] >= 0]


def _predictions(rows: torch.Tensor, data: DigitsData) -> dict:
    rows = rows[rows[:, 0].argsort()]
    index = [int(i) for i in rows[:, 0]]
    return {"index": index, "label": [int(data.y_test[i]) for i in index],
            "prediction": [int(p) for p in rows[:, 2]], "confidence": rows[:, 1].tolist()}


def train(settings: dict, out: str | Path, progress: bool = True) -> list[dict]:
    """Train in this process, as one rank of whatever launched it (torchrun, srun, or alone). Returns the metrics."""
    from labs_lib.train.deepspeed.setup import start

    deepspeed, info = start()
    out = Path(out).resolve()
    data = load_digits_split()
    steps = steps_per_epoch(data, settings["batch_size"], info.world_size)
    ds = resolved_ds_config(settings, steps, info.world_size,
                            str(out / "flops_profile.txt") if settings["flops_profile"] else None)
    dtype = torch.bfloat16 if ds.get("bf16", {}).get("enabled", False) else torch.float32
    profiler = ds.get("flops_profiler", {})

    torch.manual_seed(settings["seed"])  # the same initial weights on every rank
    model = ViT(settings["model"]).to(info.device)
    groups = param_groups(model, ds["optimizer"]["params"].get("weight_decay", 0.0), no_decay=NO_DECAY)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        truncate_metrics(out, 0)  # no earlier run's records read as this one's
    dtype_name = str(dtype).split(".")[-1]
    run = {"model": settings["model"].to_dict(), "n_params": model.num_params(),
           "flops_per_image_fwd": vit_flops_per_image(settings["model"]), "profile": settings["profile"],
           "epochs": settings["epochs"], "steps_per_epoch": steps, "world_size": info.world_size,
           "zero_stage": zero_stage(ds), "dtype": dtype_name, "global_batch": ds["train_batch_size"],
           "device": str(info.device), "deepspeed": ds, "deepspeed_version": deepspeed.__version__,
           "n_train": len(data.x_train), "n_test": len(data.x_test)}
    print0(f"ViT {model.num_params():,} parameters, {info.world_size} rank(s), ZeRO-{zero_stage(ds)}, {dtype_name}, "
           f"global batch {ds['train_batch_size']}, {steps} steps/epoch x {settings['epochs']} epochs")

    batches, last_eval = _epochs(data, settings, info.rank, info.world_size), {}

    def evaluate(step: int) -> dict:
        loss, accuracy, last_eval["rows"] = _evaluate(engine.module, data, info, dtype)
        print0(f"epoch {step // steps:3d}  step {step:5d}  test loss {loss:.4f}  test accuracy {accuracy:.2%}")
        return {"epoch": step // steps, "test_loss": loss, "test_accuracy": accuracy}

    # One record per epoch: the loop averages the loss and the step time over the epoch's steps.
    loop = Loop(out=out, max_steps=steps * settings["epochs"], samples_per_step=ds["train_batch_size"],
                unit="images", log_every=steps, eval_every=steps, is_main=info.is_main, progress=progress,
                desc=f"vit zero-{zero_stage(ds)}", device=info.device)
    profile_step = profiler["profile_step"] if profiler.get("enabled") else None
    records = run_loop(lambda step: _train_step(engine, next(batches), step, dtype, info.device, profile_step),
                       loop, optimizer=engine.optimizer, evaluate=evaluate,  # lr: DeepSpeed's scheduler's
                       record_fields=lambda result: {"loss": all_reduce_mean(result[0]), "grad_norm": result[1]})

    rows = _gather_rows(last_eval["rows"], info)
    run["held_bytes"] = gather_per_rank(deepspeed_held_bytes(engine), info.world_size, info.device)
    if info.is_main:
        write_json(out / "run.json", run)
        write_json(out / "predictions.json", _predictions(rows, data), indent=None)
    cleanup()
    return records


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:  # every bad setting fails here, before DeepSpeed starts
        check_args(argv, world_size_from_env())
    except ValueError as e:
        raise SystemExit(f"invalid configuration: {e}") from None
    train(settings_from_args(args), args.out, progress=not args.no_progress)


if __name__ == "__main__":
    from labs_lib.core.dist import exit_process

    main()
    exit_process()  # not the interpreter's teardown: leftover gloo threads can abort it

"""Train lab 06's vision transformer on the digits with DeepSpeed: ZeRO + bf16, metrics, the flops profiler's report.

    python -m labs_lib.train.deepspeed.vit --out build/runs/vit                               # one process
    torchrun --standalone --nproc-per-node=2 -m labs_lib.train.deepspeed.vit --out build/runs/vit --zero-stage 2 --bf16
    sbatch slurm/train_vit.sbatch --flops-profile                                          # 2 nodes x 1 rank

The DeepSpeed config is configs/deepspeed/vit_zero2_bf16.json, a plain DeepSpeed config with ``"auto"`` where the run
decides: the micro-batch per rank and the learning rate (the profile's, or ``--batch-size`` / ``--lr``) and the
WarmupCosineLR schedule's length (``--epochs`` × steps per epoch, 10 % warm-up). ``--zero-stage`` and ``--bf16`` /
``--no-bf16`` override the file. DeepSpeed joins the process group labs_lib.core.dist made (gloo on CPU, NCCL on GPU).

Each rank trains on its slice of every global batch (labs_lib.models.vit.ShardedLoader) and evaluates its slice of the
held-out set; the counts are summed over the ranks. Written into ``--out`` by rank 0:

    run.json            model config, parameter count, FLOPs per image (formula), world size, the resolved
                        DeepSpeed config, and what each rank holds (bytes of weights, fp32 master, Adam moments)
    metrics.jsonl       one record per epoch: epoch, step, loss, test_loss, test_accuracy, images_per_s, lr, time_s
    predictions.json    the final model's prediction and confidence for every test image
    flops_profile.txt   (--flops-profile) the DeepSpeed flops profiler's report of one training step
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from labs_lib.train.deepspeed.gpt import require_filled
from labs_lib.core.paths import PROJECT_ROOT
from labs_lib.models.vit import ShardedLoader, ViT, ViTConfig, load_digits_split, vit_flops_per_image, vit_profile

__all__ = ["DEFAULT_CONFIG", "build_parser", "settings_from_args", "resolve_ds_config", "check_args", "train",
           "train_args", "torchrun", "read_metrics", "read_run", "read_predictions", "flops_profile_summary",
           "flops_by_part"]

DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "deepspeed" / "vit_zero2_bf16.json"
WARMUP_FRACTION = 0.1


# ---------------------------------------------------------------------------------------------- settings and config
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m labs_lib.train.deepspeed.vit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run folder: run.json, metrics.jsonl, predictions.json, flops profile")
    p.add_argument("--profile", help="ci | cpu | gpu (default: $LABS_PROFILE, else gpu with CUDA, else cpu)")
    p.add_argument("--ds-config", default=str(DEFAULT_CONFIG), help="DeepSpeed JSON config (vit_zero2_bf16.json)")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), help="override zero_optimization.stage")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 weights and activations (default: the config's bf16.enabled)")
    p.add_argument("--epochs", type=int, help="passes over the 1,437 training images (default: the profile's)")
    p.add_argument("--batch-size", type=int, help="images per rank per step (default: the profile's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the profile's)")
    p.add_argument("--patch-size", type=int, help="patch side in pixels, a divisor of 8 (default: the profile's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flops-profile", action="store_true",
                   help="DeepSpeed flops profiler on one step (the 3rd) -> flops_profile.txt")
    return p


def settings_from_args(args: argparse.Namespace) -> dict:
    """The run's settings: the profile's ViT sizes with the command line's overrides, and the DeepSpeed config."""
    prof = vit_profile(args.profile)
    model = prof["model"]
    if args.patch_size:
        model = ViTConfig(**{**model.to_dict(), "patch_size": args.patch_size})  # checks it tiles the image
    path = Path(args.ds_config)
    if not path.exists() and (DEFAULT_CONFIG.parent / path.name).exists():  # "vit_zero2_bf16.json" from anywhere
        path = DEFAULT_CONFIG.parent / path.name
    if not path.exists():
        raise ValueError(f"no DeepSpeed config {args.ds_config}: see {DEFAULT_CONFIG.parent}")
    ds = json.loads(path.read_text())
    if args.zero_stage is not None:
        ds.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    if args.bf16 is not None:
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": args.bf16}
    return dict(profile=prof["name"], model=model, epochs=args.epochs or prof["epochs"],
                batch_size=args.batch_size or prof["batch_size"], lr=args.lr or prof["lr"], seed=args.seed,
                ds_config=ds, ds_config_path=str(path), flops_profile=args.flops_profile)


def steps_per_epoch(n_train: int, batch_size: int, world_size: int) -> int:
    return n_train // (batch_size * world_size)


def resolve_ds_config(ds: dict, batch_size: int, lr: float, total_steps: int, world_size: int,
                      flops_profile_file: str | None = None) -> dict:
    """A copy of ``ds`` with every "auto" filled, the global batch stated and (optionally) the profiler on."""
    ds = copy.deepcopy(ds)
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = batch_size
    accumulation = ds.get("gradient_accumulation_steps", 1)
    ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * accumulation * world_size
    params = ds.setdefault("optimizer", {"type": "AdamW"}).setdefault("params", {})
    if params.get("lr", "auto") == "auto":
        params["lr"] = lr
    sched = ds.get("scheduler", {}).get("params", {})
    if sched.get("total_num_steps") == "auto":
        sched["total_num_steps"] = total_steps
    if sched.get("warmup_num_steps") == "auto":
        sched["warmup_num_steps"] = max(1, round(WARMUP_FRACTION * total_steps))
    if flops_profile_file:
        ds["flops_profiler"] = {**ds.get("flops_profiler", {}), "enabled": True, "output_file": flops_profile_file}
        ds["flops_profiler"].setdefault("profile_step", 3)
    return require_filled(ds)


def check_args(argv: list[str], world_size: int, n_train: int = 1437) -> dict:
    """Parse and check what the ranks will see (slurm/train_vit.sbatch calls this before srun): ValueError naming the
    fix. Returns the settings (the DeepSpeed config as read, with --zero-stage / --bf16 applied)."""
    s = settings_from_args(build_parser().parse_args(argv))
    ds = s["ds_config"]
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage={stage!r} does not exist: use 0, 1, 2 or 3 (--zero-stage)")
    if ds.get("fp16", {}).get("enabled") and not torch.cuda.is_available():
        raise ValueError("fp16 needs a CUDA GPU (DeepSpeed's CPU accelerator has no fp16 loss scaling): use --bf16")
    if ds.get("fp16", {}).get("enabled") and ds.get("bf16", {}).get("enabled"):
        raise ValueError("fp16 and bf16 are both enabled in the DeepSpeed config: keep one")
    steps = steps_per_epoch(n_train, s["batch_size"], world_size)
    if steps < 1:
        raise ValueError(f"{n_train} training images do not make one step of {s['batch_size']} images on each of "
                         f"{world_size} ranks: lower --batch-size")
    resolved = resolve_ds_config(ds, s["batch_size"], s["lr"], steps * s["epochs"], world_size,
                                 "flops_profile.txt" if s["flops_profile"] else None)
    profile_step = resolved.get("flops_profiler", {}).get("profile_step", 1)
    if s["flops_profile"] and profile_step > steps * s["epochs"]:
        raise ValueError(f"the flops profiler's profile_step={profile_step} comes after the last of the "
                         f"{steps * s['epochs']} steps: train longer (--epochs)")
    return s


# --------------------------------------------------------------------------------------------------------- training
def _param_groups(model: ViT, weight_decay: float) -> list[dict]:
    """Weight decay on the matrices only (not on biases, norms, the class token or the position embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and name not in ("cls_token", "pos_emb") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def _evaluate(model: ViT, x: torch.Tensor, y: torch.Tensor, rank: int, world_size: int, dtype: torch.dtype,
              device: torch.device) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """(test loss, test accuracy) over all ranks' slices; this rank's (indices, logits) too."""
    model.eval()
    idx = torch.arange(len(x))[rank::world_size]
    logits = model(x[idx].to(device, dtype)).float()
    loss_sum = F.cross_entropy(logits, y[idx].to(device), reduction="sum")
    correct = (logits.argmax(-1) == y[idx].to(device)).sum()
    totals = torch.stack([loss_sum, correct.float(), torch.tensor(float(len(idx)), device=device)]).double()
    if world_size > 1:
        dist.all_reduce(totals)
    model.train()
    return (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item(), idx, logits.cpu()


def _held_bytes(engine) -> dict[str, int]:
    """What this rank holds: ``params`` (the model's weights), ``master`` (fp32 copies the ZeRO optimizer steps),
    ``optimizer`` (Adam's two moments), read from the tensors (views of one flat buffer counted once)."""
    def storage_bytes(tensors, skip=()):
        seen, total = set(skip), 0
        for t in tensors:
            if torch.is_tensor(t) and t.numel() > 1 and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
        return total, seen

    params, seen = storage_bytes(getattr(p, "ds_tensor", p) for p in engine.module.parameters())
    zero_opt = engine.optimizer
    inner = getattr(zero_opt, "optimizer", zero_opt)  # ZeRO wraps torch's AdamW
    master, _ = storage_bytes((p for g in inner.param_groups for p in g["params"]), skip=seen)
    moments, _ = storage_bytes(t for state in inner.state.values() for t in state.values())
    return {"params": params, "master": master, "optimizer": moments}


def _profiler_off(engine) -> None:
    """After the profiled step: the profiler also switched on DeepSpeed's wall-clock timers (its report's backward
    and step latencies come from them), which would print three lines every step from then on. Switch all off."""
    from deepspeed.utils.timer import NoopTimer

    engine._config.flops_profiler_config.enabled = False
    engine._config.wall_clock_breakdown = False
    if hasattr(engine.optimizer, "timers"):  # the ZeRO optimizer logs its own step timers
        engine.optimizer.timers = NoopTimer()


def _gather(values: dict[str, int], world_size: int) -> list[dict[str, int]]:
    keys = sorted(values)
    mine = torch.tensor([values[k] for k in keys], dtype=torch.int64)
    if world_size == 1:
        return [values]
    everyone = [torch.zeros_like(mine) for _ in range(world_size)]
    dist.all_gather(everyone, mine)
    return [dict(zip(keys, t.tolist())) for t in everyone]


def train(settings: dict, out: str | Path) -> list[dict]:
    """Train in this process, as one rank of whatever launched it (torchrun, srun, or alone). Returns the metrics."""
    from labs_lib.train.deepspeed.setup import start
    from labs_lib.core.dist import all_reduce_mean, cleanup, print0

    deepspeed, info = start()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    out = Path(out).resolve()
    data = load_digits_split()
    steps = steps_per_epoch(len(data.x_train), settings["batch_size"], world_size)
    ds = resolve_ds_config(settings["ds_config"], settings["batch_size"], settings["lr"], steps * settings["epochs"],
                           world_size, str(out / "flops_profile.txt") if settings["flops_profile"] else None)
    dtype = torch.bfloat16 if ds.get("bf16", {}).get("enabled", False) else torch.float32
    stage, profiler = ds.get("zero_optimization", {}).get("stage", 0), ds.get("flops_profiler", {})

    torch.manual_seed(settings["seed"])  # the same initial weights on every rank
    model = ViT(settings["model"]).to(info.device)
    groups = _param_groups(model, ds["optimizer"]["params"].get("weight_decay", 0.0))
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=groups, config=ds)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text("")
    run = {"model": settings["model"].to_dict(), "n_params": model.num_params(),
           "flops_per_image_fwd": vit_flops_per_image(settings["model"]), "profile": settings["profile"],
           "epochs": settings["epochs"], "steps_per_epoch": steps, "world_size": world_size,
           "zero_stage": stage, "dtype": str(dtype).split(".")[-1],
           "global_batch": ds["train_batch_size"], "device": str(info.device), "deepspeed": ds,
           "deepspeed_version": deepspeed.__version__, "n_train": len(data.x_train), "n_test": len(data.x_test)}
    print0(f"ViT {model.num_params():,} parameters, {world_size} rank(s), ZeRO-{stage}, "
           f"{str(dtype).split('.')[-1]}, global batch {ds['train_batch_size']}, {steps} steps/epoch x "
           f"{settings['epochs']} epochs")

    records, step, t_start = [], 0, time.perf_counter()
    for epoch in range(settings["epochs"]):
        loader = ShardedLoader(data.x_train, data.y_train, settings["batch_size"], rank, world_size, epoch,
                               seed=settings["seed"])
        t0, loss_sum = time.perf_counter(), torch.zeros((), dtype=torch.float64)
        for x, y in loader:
            logits = engine(x.to(info.device, dtype))
            loss = F.cross_entropy(logits.float(), y.to(info.device))
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().double().cpu()
            step += 1
            if profiler.get("enabled") and step > profiler["profile_step"]:
                _profiler_off(engine)
        train_s = time.perf_counter() - t0
        train_loss = all_reduce_mean(loss_sum / len(loader))
        train_s = all_reduce_mean(train_s)
        test_loss, test_acc, idx, logits = _evaluate(engine.module, data.x_test, data.y_test, rank, world_size,
                                                     dtype, info.device)
        record = {"epoch": epoch + 1, "step": step, "loss": train_loss, "test_loss": test_loss,
                  "test_accuracy": test_acc, "images_per_s": len(loader) * ds["train_batch_size"] / train_s,
                  "lr": scheduler.get_last_lr()[0] if scheduler else ds["optimizer"]["params"]["lr"],
                  "time_s": time.perf_counter() - t_start}
        records.append(record)
        if info.is_main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        print0(f"epoch {epoch + 1:3d}  step {step:5d}  loss {train_loss:.4f}  test loss {test_loss:.4f}  "
               f"test accuracy {test_acc:.2%}  {record['images_per_s']:,.0f} images/s")

    # Every rank's predictions for its slice of the test set, gathered on rank 0.
    probs = logits.softmax(-1)
    mine = torch.cat([idx[:, None].float(), probs.max(-1).values[:, None], probs.argmax(-1)[:, None].float()], 1)
    parts = [mine]
    if world_size > 1:
        parts = [torch.zeros(len(range(r, len(data.x_test), world_size)), 3) for r in range(world_size)]
        _gather_rows(parts, mine)
    run["held_bytes"] = _gather(_held_bytes(engine), world_size)  # after training: Adam's moments exist now
    if info.is_main:
        (out / "run.json").write_text(json.dumps(run, indent=1))
        rows = sorted(torch.cat(parts).tolist())
        preds = {"index": [int(r[0]) for r in rows], "label": [int(data.y_test[int(r[0])]) for r in rows],
                 "prediction": [int(r[2]) for r in rows], "confidence": [r[1] for r in rows]}
        (out / "predictions.json").write_text(json.dumps(preds))
    print0(f"done: final test accuracy {records[-1]['test_accuracy']:.2%}; metrics in {out / 'metrics.jsonl'}")
    cleanup()
    return records


def _gather_rows(parts: list[torch.Tensor], mine: torch.Tensor) -> None:
    """all_gather of every rank's rows into ``parts``, also when ranks hold different numbers of rows (padded)."""
    n = max(len(p) for p in parts)
    padded = torch.zeros(n, mine.size(1))
    padded[:len(mine)] = mine
    everyone = [torch.zeros_like(padded) for _ in parts]
    dist.all_gather(everyone, padded)
    for p, e in zip(parts, everyone):
        p.copy_(e[:len(p)])


# ------------------------------------------------------------------------------------------ reading a run back
def read_metrics(out: str | Path) -> list[dict]:
    """The per-epoch records of a run (empty before its first epoch ends)."""
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_run(out: str | Path) -> dict:
    return json.loads((Path(out) / "run.json").read_text())


def read_predictions(out: str | Path) -> dict:
    return json.loads((Path(out) / "predictions.json").read_text())


_PREFIX = {"": 1, "n": 1e-9, "u": 1e-6, "m": 1e-3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
_STATS = re.compile(r"([\d.]+) ?([KMGTP]?) = [\d.]+% Params, ([\d.]+) ?([KMGTP]?)MACs = [\d.]+% MACs, "
                    r"([\d.]+) ?([numKMGTP]?)s = [\d.]+% latency")


def _number(text: str) -> float:
    """'3.5 M' / '16.08 MMACs' / '4.09 ms' / '512' → a float in base units."""
    m = re.match(r"\s*([\d.]+)\s*([numKMGTP]?)", text)
    return float(m.group(1)) * _PREFIX[m.group(2)]


def flops_profile_summary(path: str | Path) -> dict:
    """The headline numbers of a DeepSpeed flops profiler report: ``params``, ``fwd_macs``, ``fwd_flops`` (per GPU,
    one micro-batch), ``batch_size``, ``fwd_latency_s``, ``bwd_latency_s``, ``step_latency_s``, ``iter_latency_s``,
    ``profile_step``, and ``modules``: ``{dotted name: {"params", "macs", "latency_s"}}`` for every module of the
    detailed tree (the model itself is ``""``; ``"blocks.0.attn.qkv"`` ...)."""
    text = Path(path).read_text()
    out: dict = {}
    for key, label in (("params", "params per GPU"), ("fwd_macs", "fwd MACs per GPU"),
                       ("fwd_flops", "fwd flops per GPU"), ("batch_size", "batch size per GPU"),
                       ("fwd_latency_s", "fwd latency"), ("bwd_latency_s", "bwd latency"),
                       ("step_latency_s", "step latency"), ("iter_latency_s", "iter latency")):
        m = re.search(rf"^{re.escape(label)}:\s*(.+)$", text, re.M)
        if m:
            out[key] = _number(m.group(1))
    m = re.search(r"Profile Summary at step (\d+)", text)
    out["profile_step"] = int(m.group(1)) if m else None
    modules, stack = {}, []  # stack of (indent, name) of the open containers
    lines = text[text.find("\nViT(") + 1:].splitlines() if "\nViT(" in text else []
    for i, line in enumerate(lines):
        head = re.match(r"^(\s*)(?:\(([\w.-]+)\): )?(?:\d+ x )?\w+\(", line)
        if not head:
            continue
        indent, name = len(head.group(1)), head.group(2) or ""
        while stack and stack[-1][0] >= indent:
            stack.pop()
        full = ".".join([n for _, n in stack if n] + ([name] if name else []))
        stats = _STATS.search(line) or (_STATS.search(lines[i + 1]) if i + 1 < len(lines) else None)
        if stats:
            params, pp, macs, mp, lat, lp = stats.groups()
            modules[full] = {"params": float(params) * _PREFIX[pp], "macs": float(macs) * _PREFIX[mp],
                             "latency_s": float(lat) * _PREFIX[lp]}
        if not line.rstrip().endswith(")") or not _STATS.search(line):  # a container: its children follow
            stack.append((indent, name))
    out["modules"] = modules
    return out


def flops_by_part(summary: dict) -> dict[str, float]:
    """Forward FLOPs (2 × the profiler's MACs) of one micro-batch by kind of work, summed over the blocks: the patch
    embedding, qkv projection, attention itself (q kᵀ and the weighted sum of v: the attention module's MACs that
    are not in its two Linear layers), output projection, the MLP's two Linear layers, and the classifier head."""
    m = summary["modules"]
    blocks = sorted({name.split(".")[1] for name in m if name.startswith("blocks.")}, key=int)
    parts = {"patch embedding": 2 * m["patch_embed"]["macs"], "qkv": 0.0, "attention q·kᵀ, ·v": 0.0,
             "attention proj": 0.0, "MLP fc": 0.0, "MLP proj": 0.0}
    for b in blocks:
        attn, qkv, proj = (m[f"blocks.{b}.attn{s}"]["macs"] for s in ("", ".qkv", ".proj"))
        parts["qkv"] += 2 * qkv
        parts["attention q·kᵀ, ·v"] += 2 * (attn - qkv - proj)
        parts["attention proj"] += 2 * proj
        parts["MLP fc"] += 2 * m[f"blocks.{b}.mlp.fc"]["macs"]
        parts["MLP proj"] += 2 * m[f"blocks.{b}.mlp.proj"]["macs"]
    parts["head"] = 2 * m["head"]["macs"]
    return parts


# ------------------------------------------------------------------------------------- launching from a notebook
def train_args(out: str | Path, **settings) -> list[str]:
    """Command-line arguments for the given settings (``epochs=5`` → ``--epochs 5``, ``bf16=False`` → ``--no-bf16``,
    ``flops_profile=True`` → ``--flops-profile``)."""
    args = ["--out", str(out)]
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            if value or name == "bf16":
                args.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            args += [flag, str(value)]
    return args


def torchrun(out: str | Path, nproc: int = 2, progress: bool = True, **settings) -> list[dict]:
    """Run the training with ``nproc`` local processes under torchrun (what the notebook does without Slurm), a
    progress bar per epoch; returns the metrics. Raises LaunchError with the log's tail if it fails."""
    from tqdm.auto import tqdm

    from labs_lib.jobs.launch import run_child

    out = Path(out).resolve()
    args = train_args(out, **settings)
    s = check_args(args, nproc)  # a bad setting fails here, before any process starts
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "labs_lib.train.deepspeed.vit", *args]
    bar = tqdm(total=s["epochs"], desc=f"torchrun x{nproc}", unit="epoch", disable=not progress)

    def show_epoch():
        records = read_metrics(out)
        if records:
            bar.n = records[-1]["epoch"]
            bar.set_postfix(test_accuracy=f"{records[-1]['test_accuracy']:.1%}")
            bar.refresh()

    try:
        run_child(cmd, out / "train.log", show_epoch)
    finally:
        bar.close()
    return read_metrics(out)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    try:
        settings = check_args(sys.argv[1:] if argv is None else argv, world_size)
    except ValueError as e:
        raise SystemExit(f"invalid configuration: {e}") from None
    train(settings, args.out)


if __name__ == "__main__":
    from labs_lib.core.dist import exit_process

    main()
    exit_process()  # not the interpreter's teardown: leftover gloo threads can abort it

"""The trainers' command lines: one table of model and training flags, one parser per trainer, one pre-launch check.

Every job module (``python -m labs_lib.train``, ``labs_lib.train.deepspeed.gpt``, ``labs_lib.train.deepspeed.vit``,
``labs_lib.train.pipeline_job``) takes ``--out`` and ``--no-progress`` (:func:`add_run_args`) and has a
``check_args(argv, world_size)`` that validates what its ranks will see before any of them starts.
"""

from __future__ import annotations

import argparse
import os

import torch

from labs_lib.core import checkpoint
from labs_lib.core.config import (
    CHECKPOINT_MODES,
    ZERO_STAGES,
    GPTConfig,
    ParallelConfig,
    TrainConfig,
    get_profile,
    override,
    padded_vocab,
    parse_job_args,
)
from labs_lib.data.text import corpus_files
from labs_lib.parallel.mesh import check_layout
from labs_lib.parallel.pipeline import SCHEDULES

GPT_TRAINER = "Train the workshop GPT: one process, several with torchrun, or many nodes through Slurm."

MODEL_FLAGS = {"n_layer": int, "n_head": int, "n_embd": int, "block_size": int, "dropout": float,
               "n_experts": int, "moe_every": int, "moe_top_k": int, "moe_capacity_factor": float,
               "moe_noise": str, "moe_aux_coef": float, "moe_z_coef": float}
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


def add_run_args(parser: argparse.ArgumentParser, resume: bool = True) -> None:
    """The flags every job module takes: ``--out``, ``--no-progress``, ``--profile`` (and ``--resume``)."""
    parser.add_argument("--profile", help="ci | cpu | gpu (default: $LABS_PROFILE, else gpu with CUDA, else cpu)")
    parser.add_argument("--out", required=True, help="run folder: metrics.jsonl, config.json, results")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    if resume:
        parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")


def world_size_from_env() -> int:
    """The ranks this job has, as torchrun or srun say (1 for a plain process)."""
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m labs_lib.train``."""
    p = argparse.ArgumentParser(prog="python -m labs_lib.train", description=GPT_TRAINER,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p)
    add_model_args(p)
    train = add_training_args(p)
    train.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model")
    train.add_argument("--ddp-overlap", action=argparse.BooleanOptionalAction,
                       help="--no-ddp-overlap: all-reduce gradients after backward instead of during it")
    train.add_argument("--dtype", choices=("fp32", "bf16", "fp16"))
    train.add_argument("--init-from", metavar="RUN",
                       help="fine-tune: start from this run's (or step folder's) weights and tokenizer; the model "
                            "keeps its shape")
    memory = p.add_argument_group("memory saving (labs_lib.parallel.recompute)")
    memory.add_argument("--activation-checkpointing", choices=CHECKPOINT_MODES,
                        help="recompute in backward: full blocks, or selective (all but the matmuls); default none")
    memory.add_argument("--zero-stage", type=int, choices=ZERO_STAGES,
                        help="ZeRO by hand instead of DDP: 1 optimizer state, 2 + gradients, 3 + parameters sharded "
                             "over the ranks (data parallel only; default 0)")
    memory.add_argument("--measure-activations", action=argparse.BooleanOptionalAction, default=False,
                        help="record act_rank<r>: the peak bytes each rank keeps for backward in a step (metered "
                             "saved tensors; costs Python per saved tensor, and pipeline barriers)")
    layout = p.add_argument_group("3D parallelism (default: data parallel over every rank)")
    layout.add_argument("--dp", type=int, help="data-parallel replicas (default: world size / (tp * pp))")
    layout.add_argument("--tp", type=int, help="tensor-parallel ranks per layer (1)")
    layout.add_argument("--pp", type=int, help="pipeline stages (1)")
    layout.add_argument("--micro-batches", type=int, help="pipeline micro-batches per batch (1)")
    layout.add_argument("--pp-schedule", "--schedule", choices=SCHEDULES, help="pipeline schedule (1f1b)")
    layout.add_argument("--pp-chunks", type=int, help="model chunks per pipeline rank, interleaved-1f1b (1)")
    layout.add_argument("--ep", type=int, help="expert-parallel ranks: each MoE layer's experts over ep data-parallel "
                                               "ranks (1)")
    layout.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction,
                        help="split the activations between TP regions along the sequence (needs --tp)")
    return p


def configs_from_args(args: argparse.Namespace) -> tuple[GPTConfig, TrainConfig, ParallelConfig]:
    profile = get_profile(args.profile)
    values = vars(args)
    model_cfg = model_config_from_args(profile.model, args)
    train_names = [f for f in TrainConfig.__dataclass_fields__ if f in values]
    train_cfg = override(profile.train, **{k: values[k] for k in train_names})
    if args.tokenizer_vocab is not None:  # the embedding table follows the tokenizer, padded
        model_cfg = override(model_cfg, vocab_size=padded_vocab(args.tokenizer_vocab))
    if getattr(args, "init_from", None):
        model_cfg = base_model_config(args)
    parallel = override(profile.parallel, **{k: values[k] for k in ParallelConfig.__dataclass_fields__})
    return model_cfg, train_cfg, parallel


def base_model_config(args: argparse.Namespace) -> GPTConfig:
    """The model of ``--init-from``'s run, with ``--dropout`` if given; ValueError naming a flag that would change its
    shape (a fine-tune keeps the base's shape and tokenizer)."""
    try:
        ckpt, run = checkpoint.resolve_run(args.init_from)
    except FileNotFoundError as e:
        raise ValueError(f"--init-from: {e}") from None
    if not (run / "tokenizer.json").exists():
        raise ValueError(f"--init-from {run}: its tokenizer.json is missing (a fine-tune reuses the base's tokenizer)")
    base = GPTConfig(**checkpoint.load_meta(ckpt)["model"])
    values = vars(args)
    changed = [f"--{name.replace('_', '-')} {values[name]} (the base has {getattr(base, name)})"
               for name in MODEL_FLAGS if name != "dropout" and values.get(name) is not None
               and values[name] != getattr(base, name)]
    if args.tokenizer_vocab is not None:
        changed.append(f"--tokenizer-vocab {args.tokenizer_vocab} (the base's tokenizer is reused)")
    if changed:
        raise ValueError(f"--init-from {run} keeps the base model's shape and tokenizer: drop " + ", ".join(changed))
    return override(base, dropout=values["dropout"])


def check_trainer_args(args: argparse.Namespace, world_size: int) -> tuple[GPTConfig, TrainConfig, ParallelConfig]:
    """The configs of ``python -m labs_lib.train``'s parsed ``args``, validated for ``world_size`` ranks (the DP x
    TP x PP layout included); ValueError naming the fix."""
    model_cfg, train_cfg, parallel = configs_from_args(args)
    check_layout(model_cfg, train_cfg, parallel, world_size, device_type())
    try:
        corpus_files(train_cfg.data)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"--data: {e}") from None
    if args.measure_activations and train_cfg.compile:
        raise ValueError("--measure-activations meters eager autograd's saved tensors: drop --compile to measure")
    return model_cfg, train_cfg, parallel


def check_args(argv: list[str], world_size: int) -> int:
    """The pre-launch check of ``python -m labs_lib.train`` (labs_lib.jobs.launch and slurm/train_gpt.sbatch call
    it): parse and validate exactly what the ranks will see (:func:`check_trainer_args`). Returns the number of
    steps the run will log."""
    return check_trainer_args(parse_job_args(build_parser(), argv), world_size)[1].max_steps

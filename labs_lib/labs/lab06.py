"""Lab 06: train the ViT with DeepSpeed as a job on 2 nodes x 1 rank, and read back what the job wrote.

    records = train_vit(out, flops_profile=True)     # Slurm (slurm/train_vit.sbatch), else torchrun; per-epoch records
    run = read_run(out)                              # run.json: model, sizes, resolved DeepSpeed config, held bytes
    preds = read_predictions(out)                    # predictions.json: every test image's prediction and confidence
    check_patches(n, t); check_optimizer_gb(zero2, ddp); check_vit_flops(answer)   the exercises' checks
"""

from __future__ import annotations

from pathlib import Path

from labs_lib.core.runs import read_json
from labs_lib.estimates.memory import GB, MIXED_ADAM, zero_bytes_per_rank
from labs_lib.jobs.launch import launch, settings_args
from labs_lib.labs.checks import check
from labs_lib.models.vit import ViTConfig, vit_flops_per_image

MODULE = "labs_lib.train.deepspeed.vit"


def train_vit(out: str | Path, nodes: int = 2, nproc_per_node: int = 1, profile: str | None = None,
              progress: bool = True, **settings) -> list[dict]:
    """Run ``python -m labs_lib.train.deepspeed.vit`` on ``nodes`` x ``nproc_per_node`` ranks; returns its metrics
    (one record per epoch). Settings are the trainer's flags as keywords (``epochs=5``, ``zero_stage=3``,
    ``bf16=False``, ``flops_profile=True``)."""
    return launch(MODULE, settings_args(profile, **settings), out, nodes, nproc_per_node, profile=profile,
                  progress=progress, desc="vit", script="train_vit.sbatch")


def read_run(out: str | Path) -> dict:
    return read_json(Path(out) / "run.json")


def read_predictions(out: str | Path) -> dict:
    return read_json(Path(out) / "predictions.json")


# ------------------------------------------------------------------------------------------------ exercise checks

def check_patches(n_patches, seq_len, patch_size: int = 2) -> bool:
    vit = ViTConfig(patch_size=patch_size)
    ok = check(f"patches for P={patch_size}", n_patches, vit.n_patches,
               hint="an 8x8 image cut into P x P squares", more="(8 / P) ** 2 patches")
    return check(f"sequence length for P={patch_size}", seq_len, vit.seq_len,
                 hint="what else does the transformer see besides the patches?",
                 more="the patches plus one class token") and ok


def check_optimizer_gb(zero2, ddp, params: float = 1.5e9, ranks: int = 16) -> bool:
    state = zero_bytes_per_rank(int(params), ranks, 2, MIXED_ADAM)["optimizer"] / GB
    ok = check("ZeRO-2 optimizer state per GPU (GB)", zero2, state, rtol=0.01,
               hint="fp32 master weights and Adam's two moments, split over the ranks",
               more="(4 + 4 + 4) bytes x N / R, in GB")
    return check("plain data parallel optimizer state per GPU (GB)", ddp, state * ranks, rtol=0.01,
                 hint="without ZeRO every rank keeps all of it", more="12 bytes x N, in GB") and ok


def check_vit_flops(answer) -> bool:
    vit = ViTConfig(patch_size=2, n_embd=64, n_layer=2, n_head=4)
    return check("forward FLOPs per image, P=2, d=64, L=2", answer, vit_flops_per_image(vit),
                 hint="put N patches, P, C = 1, d, L and T = N + 1 into the formula above",
                 more="N = 16 patches of P*P = 4 pixels, T = 17 positions")

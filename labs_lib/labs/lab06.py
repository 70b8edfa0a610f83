"""Lab 06: train the ViT with DeepSpeed as a job on 2 nodes x 1 rank, and read back what the job wrote.

    records = train_vit(out, flops_profile=True)     # Slurm (slurm/train_vit.sbatch), else torchrun; per-epoch records
    run = read_run(out)                              # run.json: model, sizes, resolved DeepSpeed config, held bytes
    preds = read_predictions(out)                    # predictions.json: every test image's prediction and confidence
"""

from __future__ import annotations

from pathlib import Path

from labs_lib.core.runs import read_json
from labs_lib.jobs.launch import launch, settings_args

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

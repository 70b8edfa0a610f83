"""Lab 01 (notebooks/01_data_parallel_gpt.ipynb): the exercises' checks (its jobs are labs_lib.jobs.launch.train_gpt).

    check_training_state_gb(gb)            exercise 1: GPT-2 small's training state in GB
    check_tokens_per_step(n, run)          exercise 2: the tokens one optimizer step of ``run`` consumed (its config)
"""

from __future__ import annotations

from pathlib import Path

from labs_lib.core.config import GPTConfig
from labs_lib.core.runs import read_json
from labs_lib.estimates.memory import GB, MIXED_ADAM, param_count, zero_bytes_per_rank
from labs_lib.labs.checks import check

__all__ = ["check_training_state_gb", "check_tokens_per_step"]


def check_training_state_gb(answer) -> bool:
    expected = sum(zero_bytes_per_rank(param_count(GPTConfig.preset("gpt2-small")), 1, 0, MIXED_ADAM).values()) / GB
    return check("GPT-2 small training state (GB)", answer, expected, rtol=0.01,
                 hint="parameters x bytes each parameter costs in mixed-precision Adam training, in GB (1e9 bytes)",
                 more="bytes per parameter = 2 (weights) + 2 (gradients) + 12 (fp32 master, m, v) = 16")


def check_tokens_per_step(answer, run: str | Path) -> bool:
    """The tokens one optimizer step of ``run`` consumed, from its config.json."""
    config = read_json(Path(run) / "config.json")
    train = config["train"]
    expected = train["batch_size"] * train["grad_accum"] * config["world_size"] * config["model"]["block_size"]
    return check("tokens per optimizer step", answer, expected,
                 hint="every rank takes its own micro-batches of full-length sequences each step",
                 more="b x cfg.grad_accum x (2 nodes x 2 processes) x profile.model.block_size")

"""Shared helpers: launching real training processes (one, or several through torchrun)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("LABS_BUILD_DIR", str(REPO / "build"))


def train_cmd(out: Path, nproc: int = 1, profile: str = "ci", **settings) -> list[str]:
    from labs_lib.jobs.launch import settings_args

    args = ["--out", str(out), "--no-progress", *settings_args(profile, settings.pop("resume", False), **settings)]
    if nproc == 1:
        return [sys.executable, "-m", "labs_lib.train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "labs_lib.train", *args]


def run_train(out: Path, nproc: int = 1, env: dict | None = None, check: bool = True, **settings):
    """Run labs_lib.train.gpt to completion in a child process; returns the CompletedProcess."""
    result = subprocess.run(train_cmd(out, nproc, **settings), capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, **(env or {})))
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="session")
def ci_data():
    """The ci profile's corpus and tokenizer, prepared once per session (cached under build/cache)."""
    from labs_lib.core.config import get_profile
    from labs_lib.data.text import prepare_data

    cfg = get_profile("ci").train
    return prepare_data(cfg.data, cfg.tokenizer_vocab, cfg.corpus_max_bytes, cfg.val_fraction, progress=False)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A small GPT trained for 120 steps on the ci corpus (one process, ~10 s): the inference tests' checkpoint.

    Context 128 (room for a prompt and new tokens); its run folder holds checkpoints/ and tokenizer.json."""
    out = tmp_path_factory.mktemp("inference") / "run"
    run_train(out, block_size=128, max_steps=120, eval_interval=60, checkpoint_interval=120,
              env={"OMP_NUM_THREADS": "1"})
    return out

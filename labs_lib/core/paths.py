"""Where the project keeps what it builds: caches, runs, the local cluster's state."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # labs_lib/core/paths.py → the checkout


def build_dir() -> Path:
    """``LABS_BUILD_DIR``, else ``build/`` in the project checkout (else ~/.cache/labs_lib when installed)."""
    if "LABS_BUILD_DIR" in os.environ:
        return Path(os.environ["LABS_BUILD_DIR"])
    if (PROJECT_ROOT / "pyproject.toml").exists():
        return PROJECT_ROOT / "build"
    return Path.home() / ".cache" / "labs_lib"


def cache_dir() -> Path:
    """Token shards and tokenizers, shared by every run that uses the same corpus and vocabulary."""
    return Path(os.environ.get("LABS_CACHE_DIR", build_dir() / "cache"))


def runs_dir() -> Path:
    """Default home of training runs started from the notebooks."""
    return Path(os.environ.get("LABS_RUNS_DIR", build_dir() / "runs"))

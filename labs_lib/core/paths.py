"""Where the project keeps what it builds: caches, runs, the local cluster's state."""

from __future__ import annotations

import json
import os
import re
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


def lab_notebooks(notebooks: Path = PROJECT_ROOT / "notebooks") -> list[tuple[str, str, Path]]:
    """("00", "Welcome ...", path), ...: each lab notebook's number, title (its first heading, without "Lab NN —"
    and any subtitle after a colon) and path, in order."""
    labs = []
    for path in sorted(notebooks.glob("[0-9][0-9]_*.ipynb")):
        source = json.loads(path.read_text())["cells"][0]["source"]
        first = ("".join(source) if isinstance(source, list) else source).splitlines()[0]
        title = re.sub(r"^#\s*Lab\s*\d+\s*[—-]\s*", "", first).split(":")[0].strip()
        labs.append((path.name[:2], title, path))
    return labs

"""What every benchmark script shares: the machine description and the results format.

A result file ``benchmarks/results/<name>.json`` is ``{"name", "machine", "rows": [ {column: value} ], ...}``;
``run_all.py`` turns all of them into ``benchmarks/results/README.md``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def machine_label(info: dict) -> str:
    device = info.get("gpu") or f"{info['cpu']}, {info['cores']} cores"
    return f"{device}; torch {info['torch']}; {info['date']}"


def save_results(name: str, rows: list[dict], **extra) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"name": name, "machine": machine_info(), "rows": rows, **extra}, indent=1))
    print(f"saved {path}")
    return path

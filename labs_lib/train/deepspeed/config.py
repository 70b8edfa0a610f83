"""DeepSpeed JSON configs: loading one, filling its ``"auto"`` values from the run, refusing what cannot run here.

    ds = load_ds_config("zero2.json")               # a path, or a name in configs/deepspeed/
    check_ds_config(ds, device_type="cpu")          # ValueError naming the fix, before any process starts
    ds = resolve_ds_config(ds, world_size=2, micro_batch=8, grad_accum=1, lr=1e-3, ...)

The configs in configs/deepspeed/ are plain DeepSpeed configs with ``"auto"`` where the run decides: the
micro-batch, the accumulation, the clipping, the optimizer's lr / betas / weight decay, WarmupCosineLR's total and
warm-up steps, bf16, the flops profiler's ``profile_step``. A value the trainer does not give stays ``"auto"`` and
:func:`require_filled` names it (DeepSpeed would reject it later, less clearly).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from labs_lib.core.config import ZERO_STAGES
from labs_lib.core.paths import PROJECT_ROOT

CONFIG_DIR = PROJECT_ROOT / "configs" / "deepspeed"
# The profiler's report of lab 06: every module of the tree, in detail
PROFILER_DEFAULTS = {"module_depth": -1, "top_modules": 3, "detailed": True}


def load_ds_config(path: str | Path) -> dict:
    """The DeepSpeed config at ``path``, or the one of that name in configs/deepspeed/ (``"zero2.json"`` works from
    any folder)."""
    path = Path(path)
    if not path.exists() and (CONFIG_DIR / path.name).exists():
        path = CONFIG_DIR / path.name
    if not path.exists():
        raise ValueError(f"no DeepSpeed config {path}: choose one of "
                         f"{', '.join(sorted(p.name for p in CONFIG_DIR.glob('*.json')))} in {CONFIG_DIR}")
    return json.loads(path.read_text())


def _fill(section: dict, key: str, value) -> None:
    """``section[key] = value`` where the config leaves it to the run (missing or "auto"), when the run knows it."""
    if value is not None and section.get(key, "auto") == "auto":
        section[key] = value


def resolve_ds_config(ds: dict, world_size: int, *, micro_batch: int, grad_accum: int | None = None,
                      grad_clip: float | None = None, lr: float | None = None, betas: list[float] | None = None,
                      weight_decay: float | None = None, total_steps: int | None = None,
                      warmup_steps: int | None = None, bf16: bool | None = None,
                      flops_profile_file: str | None = None, profile_step: int | None = None) -> dict:
    """A copy of ``ds`` with every "auto" filled from the run's values (``None``: the run does not decide it), the
    global batch stated, ``bf16`` (when not None) applied, and with ``flops_profile_file`` the flops profiler on,
    writing there. Raises ValueError for an "auto" left, or a profiled step the run never reaches."""
    ds = copy.deepcopy(ds)
    _fill(ds, "train_micro_batch_size_per_gpu", micro_batch)
    _fill(ds, "gradient_accumulation_steps", grad_accum)
    _fill(ds, "gradient_clipping", grad_clip)
    params = ds.setdefault("optimizer", {"type": "AdamW"}).setdefault("params", {})
    for key, value in (("lr", lr), ("betas", betas), ("weight_decay", weight_decay)):
        _fill(params, key, value)
    schedule = ds.get("scheduler", {}).get("params", {})
    _fill(schedule, "total_num_steps", total_steps)
    _fill(schedule, "warmup_num_steps", warmup_steps)
    if bf16 is not None:
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16}
    elif ds.get("bf16", {}).get("enabled") == "auto":
        ds["bf16"]["enabled"] = False  # the run asked for nothing: fp32
    if flops_profile_file:
        ds["flops_profiler"] = {**PROFILER_DEFAULTS, **ds.get("flops_profiler", {}), "enabled": True,
                                "output_file": flops_profile_file}
        _fill(ds["flops_profiler"], "profile_step", profile_step)
        ds["flops_profiler"].setdefault("profile_step", 1)  # DeepSpeed's default
    require_filled({k: v for k, v in ds.items() if k != "train_batch_size"})  # stated next, from the others
    accumulation = ds.get("gradient_accumulation_steps", 1)
    ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * accumulation * world_size
    _check_profile_step(ds, total_steps)
    return ds


def _check_profile_step(ds: dict, total_steps: int | None) -> None:
    # DeepSpeed profiles the step after ``profile_step`` completed ones: the run has to get there
    profiler = ds.get("flops_profiler", {})
    if profiler.get("enabled") and total_steps is not None and profiler.get("profile_step", 1) >= total_steps:
        raise ValueError(f"the flops profiler's profile_step={profiler.get('profile_step', 1)} profiles a step after "
                         f"the last of the {total_steps} steps: train longer")


def require_filled(ds: dict) -> dict:
    """The DeepSpeed config, once no "auto" value is left in it."""
    left = [k for k, v in _walk(ds) if v == "auto"]
    if left:
        raise ValueError(f"DeepSpeed config keys {left} are 'auto' but this trainer does not fill them: give values")
    return ds


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield prefix + k, v


def zero_stage(ds: dict) -> int:
    return ds.get("zero_optimization", {}).get("stage", 0)


def check_ds_config(ds: dict, device_type: str = "cpu") -> None:
    """Raise ValueError naming the fix for DeepSpeed settings this workshop cannot run. Call before spawning."""
    stage = zero_stage(ds)
    if stage not in ZERO_STAGES:
        raise ValueError(f"zero_optimization.stage={stage!r} does not exist: use 0, 1, 2 or 3 "
                         f"(configs/deepspeed/zero{{0,1,2,3}}.json, or --zero-stage)")
    fp16, bf16 = ds.get("fp16", {}).get("enabled"), ds.get("bf16", {}).get("enabled")
    if fp16 and device_type != "cuda":
        raise ValueError("fp16 needs a CUDA GPU (DeepSpeed's CPU accelerator has no fp16 loss scaling): remove the "
                         "\"fp16\" section from the DeepSpeed config and pass --bf16 (or train in fp32)")
    if fp16 and bf16 is True:
        raise ValueError("fp16 and bf16 are both enabled in the DeepSpeed config: keep one")
    offload_optimizer = ds.get("zero_optimization", {}).get("offload_optimizer", {})
    offload = offload_optimizer.get("device", "none") not in ("none", None)
    if offload and stage == 0:
        raise ValueError("offload_optimizer needs ZeRO stage 1, 2 or 3: set zero_optimization.stage (e.g. 2)")
    if offload and ds.get("optimizer", {}).get("params", {}).get("torch_adam"):
        raise ValueError("ZeRO-Offload steps the optimizer with DeepSpeedCPUAdam: remove \"torch_adam\" from "
                         "optimizer.params (see configs/deepspeed/zero2_offload.json)")
    if offload_optimizer.get("pin_memory") and device_type != "cuda":
        raise ValueError("offload_optimizer.pin_memory needs CUDA: set it to false on CPU")

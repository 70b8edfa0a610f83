"""Checkpoints that survive a kill at any moment and load without unpickling code.

Layout of a run's ``checkpoints/`` folder::

    step_000020/            one complete checkpoint
        model.safetensors   weights (tied weights stored once, their aliases in meta.json)
        optimizer.safetensors + the optimizer's scalar state in meta.json
        rng_rank0.safetensors, rng_rank1.safetensors, ...   every rank's RNG state
        optimizer_pp0_tp1.safetensors + .json ...   tensor/pipeline-parallel runs: each shard's optimizer state
        meta.json           step, configs, data position, anything JSON
    latest                  the name of the newest complete checkpoint

A checkpoint is written into ``step_N.tmp`` and renamed into place only once every file is on disk, then
``latest`` is replaced atomically (``os.replace``). A kill mid-write leaves the previous checkpoint as "latest".
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def dedupe_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop entries that share storage with an earlier one (tied weights); return them as alias -> name."""
    unique, aliases, seen = {}, {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.device.type != "meta" and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = t
    return unique, aliases


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}/{key}"] = value
            else:
                scalars[f"{pid}/{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        pid, key = flat.split("/", 1)
        state.setdefault(int(pid), {})[key] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_state() -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def begin(ckpt_dir: Path, step: int) -> Path:
    """The temporary folder a checkpoint is written into (every rank may call this)."""
    tmp = Path(ckpt_dir) / (step_dir_name(step) + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp


def write_rank_state(tmp: Path, rank: int, extra: dict[str, torch.Tensor] | None = None) -> None:
    """This rank's RNG state, plus ``extra`` tensors (e.g. the tensor-parallel dropout generator's state)."""
    _save_tensors({**rng_state(), **(extra or {})}, tmp / f"rng_rank{rank}.safetensors")


def write_optimizer_shard(tmp: Path, name: str, optimizer_state: dict) -> None:
    """The optimizer state of one model shard (``name``: its place in the tensor/pipeline layout). Kept per shard
    rather than gathered: resuming needs the same tp and pp, while the weights stay single-device."""
    tensors, meta = _flatten_optimizer(optimizer_state)
    _save_tensors(tensors, tmp / f"optimizer_{name}.safetensors")
    with open(tmp / f"optimizer_{name}.json", "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())


def write_main_state(tmp: Path, model_state: dict[str, torch.Tensor], optimizer_state: dict | None,
                     meta: dict) -> None:
    """Weights, optimizer and metadata: written once (by rank 0) for replicated training."""
    unique, aliases = dedupe_shared(model_state)
    _save_tensors(unique, tmp / "model.safetensors")
    meta = dict(meta, tied_aliases=aliases)
    if optimizer_state is not None:
        opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
        _save_tensors(opt_tensors, tmp / "optimizer.safetensors")
        meta["optimizer"] = opt_meta
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def commit(tmp: Path, keep: int) -> Path:
    """Rename the finished folder into place, point ``latest`` at it, and drop all but the newest ``keep``."""
    ckpt_dir = tmp.parent
    final = ckpt_dir / tmp.name.removesuffix(".tmp")
    if final.exists():  # a re-run of the same step after a resume: replace it
        shutil.rmtree(final)
    _fsync_dir(tmp)
    os.rename(tmp, final)
    pointer = ckpt_dir / "latest.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, ckpt_dir / "latest")
    _fsync_dir(ckpt_dir)
    prune(ckpt_dir, keep)
    return final


def prune(ckpt_dir: Path, keep: int) -> None:
    """Drop all but the newest ``keep`` complete checkpoints (ours, or DeepSpeed's ``step_NNNNNN`` tag folders)."""
    for old in complete_checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (``.tmp`` leftovers of a killed write are ignored)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if _STEP_DIR.match(p.name) and (p / "meta.json").exists()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint: the one ``latest`` names, else the highest complete step folder."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / "latest"
    if pointer.exists():
        named = ckpt_dir / pointer.read_text().strip()
        if (named / "meta.json").exists():
            return named
    complete = complete_checkpoints(ckpt_dir)
    return complete[-1] if complete else None


def resolve_run(path: str | Path) -> tuple[Path, Path]:
    """(checkpoint folder, run folder) for a run folder or a step folder; a clear error if there is none."""
    path = Path(path)
    if (path / "meta.json").exists() and path.parent.name == "checkpoints":
        return path, path.parent.parent
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a run folder (e.g. build/runs/<name>) or one of its "
                                "checkpoints/step_N folders")
    latest = latest_checkpoint(path / "checkpoints")
    if latest is None:
        raise FileNotFoundError(f"no checkpoint in {path}: train first (python -m labs_lib.train --out {path}) "
                                "or pass a run folder that has checkpoints/")
    return latest, path


def load_meta(path: Path) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())


def load_model_state(path: Path) -> dict[str, torch.Tensor]:
    """Weights of a checkpoint with tied aliases restored, ready for ``load_state_dict``."""
    path = Path(path)
    state = load_file(str(path / "model.safetensors"))
    for alias, name in load_meta(path).get("tied_aliases", {}).items():
        state[alias] = state[name]
    return state


def load_optimizer_state(path: Path) -> dict:
    path = Path(path)
    return _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), load_meta(path)["optimizer"])


def load_optimizer_shard(path: Path, name: str) -> dict:
    path = Path(path)
    meta = json.loads((path / f"optimizer_{name}.json").read_text())
    return _unflatten_optimizer(load_file(str(path / f"optimizer_{name}.safetensors")), meta)


def load_rank_state(path: Path, rank: int) -> dict[str, torch.Tensor] | None:
    """Restore this rank's RNG state (missing when the world size changed: then keep the fresh seed). Returns what
    the file holds, extras included, or None."""
    file = Path(path) / f"rng_rank{rank}.safetensors"
    if not file.exists():
        return None
    states = load_file(str(file))
    set_rng_state(states)
    return states

"""Lab 06: train the ViT with DeepSpeed as a job on 2 nodes x 1 rank, and read back what the job wrote.

    records = train_vit(out, flops_profile=True)     # Slurm (slurm/train_vit.sbatch), else torchrun; per-epoch records
    run = read_run(out)                              # run.json: model, sizes, resolved DeepSpeed config, held bytes
    preds = read_predictions(out)                    # predictions.json: every test image's prediction and confidence
    check_patches(n, t)                 exercise 1: patches and positions for P = 2
    check_patchify(fn)                  exercise 2: the learner's patchify through the model's own patch embedding
    check_optimizer_gb(zero2, ddp)      exercise 3: ZeRO-2's optimizer state per GPU, and plain data parallel's
    check_vit_flops(answer)             exercise 4: forward FLOPs per image by formula
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from labs_lib.core.runs import read_json
from labs_lib.data.digits import load_digits_split
from labs_lib.estimates.memory import GB, MIXED_ADAM, zero_bytes_per_rank
from labs_lib.jobs.launch import launch, settings_args
from labs_lib.labs.checks import check
from labs_lib.models.vit import ViT, ViTConfig, vit_flops_per_image

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


PATCHIFY = "patchify"
_PATCHIFY_MORE = ("B, C, H, W = images.shape; P = patch_size; images.reshape(B, C, H // P, P, W // P, P): split rows "
                  "and columns into (which patch, which pixel); .permute(0, 2, 4, 1, 3, 5) puts the patch grid first "
                  "and each patch's C x P x P pixels last; .reshape(B, (H // P) * (W // P), C * P * P)")


def _first_block_tokens(model: ViT, images: torch.Tensor) -> torch.Tensor:
    """The patch tokens the ViT feeds its first block (class token and position embeddings taken off again)."""
    seen = []
    handle = model.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(images)
    handle.remove()
    return seen[0][:, 1:] - model.pos_emb[:, 1:]


def _patchify_problem(patches, tokens: torch.Tensor, model: ViT, images: torch.Tensor) -> str:
    """What is wrong with the learner's patches ('' if nothing), through the model's patch-embedding weights."""
    c = model.config
    want = (images.size(0), c.n_patches, c.in_chans * c.patch_size ** 2)
    if not isinstance(patches, torch.Tensor) or tuple(patches.shape) != want:
        shape = tuple(patches.shape) if isinstance(patches, torch.Tensor) else type(patches).__name__
        return (f"P={c.patch_size}: the patches must be (batch, (8 / P)**2 patches, C * P * P) = {want}, got {shape}")
    conv = model.patch_embed

    def embed(p: torch.Tensor) -> torch.Tensor:  # the Conv2d as the linear map of a flattened patch that it is
        return F.linear(p.float(), conv.weight.flatten(1), conv.bias)

    with torch.no_grad():
        if torch.allclose(embed(patches), tokens, atol=1e-5):
            return ""
        g, p = c.image_size // c.patch_size, c.patch_size
        by_columns = embed(patches).unflatten(1, (g, g)).transpose(1, 2).flatten(1, 2)
        pixels_by_columns = embed(patches.unflatten(-1, (c.in_chans, p, p)).transpose(-1, -2).flatten(-3))
    if torch.allclose(by_columns, tokens, atol=1e-5):
        return (f"P={c.patch_size}: the right patches in the wrong order (column by column): take them row by "
                "row, left to right, as the model's position embeddings expect")
    if torch.allclose(pixels_by_columns, tokens, atol=1e-5):
        return (f"P={c.patch_size}: each patch's pixels are flattened column by column: flatten them row by row, "
                "the order of the patch-embedding Conv2d's weight")
    return (f"P={c.patch_size}: the model's patch-embedding weights applied to your patches do not give the tokens "
            "the ViT computes: every patch must hold exactly its P x P square's pixels")


def check_patchify(fn, patch_sizes: tuple[int, ...] = (4, 2), n_images: int = 16) -> bool:
    """Exercise 2: ``fn(images, patch_size)``, (B, C, 8, 8) -> (B, n_patches, C·P·P), on held-out digits: the
    model's own patch-embedding weights applied to the learner's patches must give the patch tokens the ViT feeds
    its first block, for every patch size in ``patch_sizes``."""
    hint = "cut every image into P x P squares, take them row by row and flatten each one"
    if fn is None or fn is Ellipsis:
        return check(PATCHIFY, None, True, hint=hint, more=_PATCHIFY_MORE)
    images = load_digits_split().x_test[:n_images]
    for p in patch_sizes:
        torch.manual_seed(0)
        model = ViT(ViTConfig(patch_size=p)).eval()
        patches = fn(images.clone(), p)
        if patches is None or patches is Ellipsis:
            return check(PATCHIFY, None, True, hint=hint, more=_PATCHIFY_MORE)
        problem = _patchify_problem(patches, _first_block_tokens(model, images), model, images)
        if problem:
            return check(PATCHIFY, False, True, hint=problem, more=_PATCHIFY_MORE)
    return check(PATCHIFY, True, True, hint=hint, more=_PATCHIFY_MORE)


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

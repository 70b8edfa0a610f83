"""A small vision transformer (ViT) for 8×8 images: the model of lab 06 (its data: labs_lib.data.digits).

    model = ViT(ViTConfig(patch_size=4))                    # 4 patches + a class token = 5 positions
    logits = model(images)                                  # (N, 1, 8, 8) -> (N, 10)
    vit_param_count(cfg), vit_flops_per_image(cfg)          # the formulas the flops profiler is checked against

The module tree, which the DeepSpeed flops profiler prints module by module::

    patch_embed (Conv2d, kernel = stride = patch), cls_token, pos_emb,
    blocks[i].{ln_1, attn.{qkv, proj}, ln_2, mlp.{fc, act, proj}}, ln_f, head

Attention is bidirectional (every patch sees every patch): ``scaled_dot_product_attention`` without a mask, which
DeepSpeed's flops profiler counts (q kᵀ and the weighted sum of v) like any matmul.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

N_CLASSES = 10
IMAGE_SIZE = 8


@dataclass
class ViTConfig:
    image_size: int = IMAGE_SIZE
    patch_size: int = 4
    in_chans: int = 1
    n_classes: int = N_CLASSES
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} does not tile an image of {self.image_size} pixels: "
                             f"use a divisor of {self.image_size}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def seq_len(self) -> int:
        """Positions the transformer sees: the patches plus the class token."""
        return self.n_patches + 1

    def to_dict(self) -> dict:
        return asdict(self)


# Model size per run profile (LABS_PROFILE): ci trains in seconds on 2 CPU processes, gpu is a wider, deeper ViT.
VIT_PROFILES = {
    "ci": dict(model=ViTConfig(patch_size=4, n_embd=64, n_layer=2, n_head=4), epochs=12, batch_size=32, lr=3e-3),
    "cpu": dict(model=ViTConfig(patch_size=4, n_embd=128, n_layer=4, n_head=4), epochs=30, batch_size=32, lr=1e-3),
    "gpu": dict(model=ViTConfig(patch_size=2, n_embd=256, n_layer=6, n_head=8, dropout=0.1), epochs=100,
                batch_size=32, lr=5e-4),
}


def vit_profile(name: str | None = None) -> dict:
    """The ViT settings of a run profile (``LABS_PROFILE`` when ``name`` is None): model, epochs, batch_size, lr."""
    from labs_lib.core.config import default_profile_name

    name = name or default_profile_name()
    if name not in VIT_PROFILES:
        raise ValueError(f"unknown profile {name!r}: use one of {', '.join(VIT_PROFILES)}")
    p = VIT_PROFILES[name]
    return dict(p, model=ViTConfig(**p["model"].to_dict()), name=name)


class Attention(nn.Module):
    """Multi-head self-attention without a mask: softmax(q kᵀ / √d) v, per head."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        # (B, heads, T, head_dim); no mask: softmax(q kᵀ / √head_dim) v over all T positions
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.mlp_ratio * config.n_embd)
        self.act = nn.GELU()
        self.proj = nn.Linear(config.mlp_ratio * config.n_embd, config.n_embd)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ViT(nn.Module):
    """Images (B, C, H, W) → class logits (B, n_classes), from the class token's final state."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = nn.Conv2d(c.in_chans, c.n_embd, kernel_size=c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.n_embd))
        self.pos_emb = nn.Parameter(torch.zeros(1, c.seq_len, c.n_embd))
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.head = nn.Linear(c.n_embd, c.n_classes)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pos_emb, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.zeros_(self.head.weight)  # every class equally likely at the start

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 3:  # (B, H, W) grey images
            images = images.unsqueeze(1)
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, n_patches, n_embd), row by row
        cls = self.cls_token.expand(x.size(0), -1, -1)
        x = self.drop(torch.cat((cls, x), dim=1) + self.pos_emb)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x[:, 0]))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_image(self, backward: bool = False) -> int:
        """Matmul FLOPs (2 per multiply-add) of one image's forward pass; ×3 with ``backward`` (see
        :func:`vit_flops_per_image`)."""
        return vit_flops_per_image(self.config, backward)


def vit_param_count(c: ViTConfig) -> int:
    """Parameters, by formula: patch embedding, class token, positions, L blocks of 12d² + 13d, final norm, head."""
    d, L = c.n_embd, c.n_layer
    patch = c.in_chans * c.patch_size ** 2 * d + d
    block = (3 * d * d + 3 * d) + (d * d + d) + 2 * (c.mlp_ratio * d * d) + c.mlp_ratio * d + d + 2 * 2 * d
    return patch + d + c.seq_len * d + L * block + 2 * d + d * c.n_classes + c.n_classes


def vit_flops_per_image(c: ViTConfig, backward: bool = False) -> int:
    """Forward FLOPs of one image counting matmuls only (2 FLOPs per multiply-add), ×3 with the backward pass.

    patch embedding 2·N·P²C·d; per block on T = N + 1 positions: qkv 6Td², proj 2Td², MLP 4·mlp_ratio·Td² and
    attention 4T²d (scores q kᵀ and the weighted sum of v); the head 2·d·classes on the class token only.
    Norms, GELU, softmax and bias adds are left out: they are the small difference to a FLOP profiler's total.
    """
    d, T, N = c.n_embd, c.seq_len, c.n_patches
    patch = 2 * N * c.in_chans * c.patch_size ** 2 * d
    block = (6 + 2 + 4 * c.mlp_ratio) * T * d * d + 4 * T * T * d
    forward = patch + c.n_layer * block + 2 * d * c.n_classes
    return 3 * forward if backward else forward

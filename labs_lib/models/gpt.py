"""The workshop GPT: a single-device GPT-2, untouched by parallelism.

Parallelism is applied from outside (tensor parallel → activation checkpointing → compile → data parallel / ZeRO),
so the module tree stays plain and its names are what the wrappers look for::

    tok_emb, pos_emb, drop, blocks[i].{ln_1, attn.{qkv, proj}, ln_2, mlp.{fc, proj}}, ln_f, lm_head (tied to tok_emb)

Also here: parameter and FLOP counts (PaLM appendix B) and simple sampling. The MFU they feed is in
labs_lib.measure.flops, the Hugging Face GPT-2 import / export in labs_lib.models.hf::

    model = GPT(GPTConfig.preset("gpt2-small"))
    logits, loss = model(idx, targets)
    mfu(model.flops_per_token(), tokens_per_s, PEAK_FLOPS["H100"])   # labs_lib.measure.flops
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from labs_lib.core.config import GPTConfig
from labs_lib.models.moe import MoEMLP

__all__ = ["GPTConfig", "CausalSelfAttention", "MLP", "Block", "GPT"]

class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_drop = nn.Dropout(config.dropout)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of ``x`` (B, T, C), each (B, heads, T, head_dim). The number of heads comes from the tensor, not
        the config: a tensor-parallel or head-pruned qkv holds only its heads."""
        qkv = self.qkv(x)
        B, T, _ = qkv.shape  # T from qkv: a sequence-parallel qkv gathers the whole sequence from x's shard
        return tuple(t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.split_heads(x)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, -1)  # heads side by side again
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's gelu_new, as one fused kernel
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)); the MLP of an MoE block
    (``config.is_moe_block(layer)``) is a mixture of experts."""

    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MoEMLP(config.n_embd, config.n_experts, config.moe_top_k, config.moe_capacity_factor,
                          config.moe_noise, bias=config.bias) if config.is_moe_block(layer) else MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying: one matrix reads and writes tokens
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 initialisation. Works on the meta device too (the init functions are then no-ops)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
        # Each block adds two projections to the residual stream: scale them so its variance stays put with depth.
        for block in self.blocks:
            mlp_out = block.mlp.experts.proj if isinstance(block.mlp, MoEMLP) else block.mlp.proj.weight
            for weight in (block.attn.proj.weight, mlp_out):
                nn.init.normal_(weight, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))
            if isinstance(block.mlp, MoEMLP):
                nn.init.normal_(block.mlp.experts.fc, mean=0.0, std=0.02)
                for bias in (block.mlp.experts.fc_bias, block.mlp.experts.proj_bias):
                    if bias is not None:
                        nn.init.zeros_(bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """``idx`` (B, T) token ids → (logits (B, T, vocab), loss or None). An MoE GPT in training mode adds its
        routers' load-balancing and z losses to the loss (``moe_aux_coef``, ``moe_z_coef``), as Mixtral's does.

        ``targets`` are already shifted (``targets[:, t]`` is the token after ``idx[:, t]``); -100 is ignored."""
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than the model's block_size={self.config.block_size}: "
                             "crop the input to the last block_size tokens")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
            if self.training and self.config.n_experts:  # the routers' losses train them; evaluation is the LM's
                loss = loss + self.config.moe_aux_coef * self.moe_aux_loss() + self.config.moe_z_coef * sum(
                    m.z_loss for m in self.moe_layers())
        return logits, loss

    def moe_layers(self) -> list[nn.Module]:
        """The blocks' MoE MLPs: ours (MoEMLP) or any other with ``is_moe`` and an ``aux_loss`` (DeepSpeed's)."""
        return [b.mlp for b in self.blocks if getattr(b.mlp, "is_moe", False)]

    def moe_aux_loss(self) -> torch.Tensor:
        """The sum of the MoE layers' load-balancing losses of the last forward (0 for a dense GPT)."""
        return sum((m.aux_loss for m in self.moe_layers()), torch.zeros(()))

    def active_params(self, non_embedding: bool = True) -> int:
        """Parameters one token uses: all but the experts it is not routed to (top_k of each layer's experts)."""
        unused = sum((m.n_experts - m.top_k) * sum(p[0].numel() for p in m.experts.parameters())
                     for m in self.moe_layers() if isinstance(m, MoEMLP))
        return self.num_params(non_embedding) - unused

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, the tied token embedding / lm_head counted once.

        ``non_embedding=True`` leaves out the position embedding (nanoGPT's convention: the token embedding stays in,
        because as the lm_head it does real work)."""
        n = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        return n - self.pos_emb.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token, forward + backward: 6N + 12·L·h·s (PaLM, appendix B).

        6N: every parameter takes part in one multiply-add forward (2 FLOPs) and two backward (4 FLOPs); N leaves
        out the position embedding (a lookup, no matmul) and, in MoE layers, the experts a token is not routed to
        (:meth:`active_params`). 12·L·h·s: attention scores and weighted values, which have
        no parameters. s defaults to block_size."""
        s = seq_len or self.config.block_size
        return 6 * self.active_params() + 12 * self.config.n_layer * self.config.n_embd * s

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` (B, T). Temperature 0 is greedy.

        No KV cache: every step runs the whole (cropped) context again. Call ``model.eval()`` first (dropout)."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size:]
            logits = self(context)[0][:, -1, :]
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth_best = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth_best, float("-inf"))
                probs = F.softmax(logits.float(), dim=-1)
                next_token = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, next_token), dim=1)
        return idx

"""Memory saving for labs_lib.train, applied from outside the model: activation checkpointing and ZeRO by hand.

    model = apply_activation_checkpointing(GPT(cfg), "selective")   # after TP, before compile and DP/ZeRO
    zero = ZeroDataParallel(model, stage=2, cfg=train_cfg)          # then zero(x, y), zero.optimizer, ...

**Activation checkpointing** (``--activation-checkpointing``) wraps every transformer block's ``forward`` in
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``; the module tree and its parameter names stay as
they are (checkpoints and ZeRO-3's hooks on the blocks see the same model).

    none       autograd keeps every tensor each operation saves for backward
    full       each block keeps only its input; backward runs the block's forward again first (one extra forward)
    selective  each block keeps its input and the outputs of its four matmuls (qkv, attention projection, MLP fc,
               MLP projection); backward recomputes only what lies between them: the two LayerNorms, the attention
               core (SDPA), GELU and the residual adds. Cheap (elementwise or memory-bound) but large: the LayerNorm
               outputs, the attention output and GELU's 4h-wide output are not stored. The matmuls are never run
               twice (torch's selective activation checkpointing with :func:`selective_policy`).

``selective`` is Korthikanti et al.'s idea (recompute what is cheap to recompute but big to keep) adapted to SDPA:
their selective recomputation drops the s×s attention scores, which SDPA's fused kernel already never stores (its
backward recomputes them from q, k and the softmax's log-sum-exp), so what is left worth dropping here is the LayerNorm
and GELU outputs. The MLP projection's output is cached though backward never reads it: an op-level policy cannot tell
one matmul from another (torchtitan's op-level policy has the same cost). labs_lib.profiling.ActivationMeter counts
what each mode keeps (the inputs a checkpoint saves, and the outputs the selective policy caches).

**ZeRO by hand** (``--zero-stage``, plain data parallelism only) uses labs_lib.parallel.zero::

    0  torch DistributedDataParallel + AdamW (labs_lib.train's default path)
    1  DataParallel (all-reduce, no_sync for accumulation) + ShardedOptimizer: Adam's state split over the ranks
    2  ShardedOptimizer(shard_gradients=True): gradients reduce-scattered during every backward, 1/N kept
    3  FullyShardedModule: parameters too; AdamW on the flat shards. Weight decay goes on matrices only, as in
       labs_lib.train.make_optimizer, but a flat shard mixes matrices and biases, so the shards' AdamW has no weight
       decay and ``step`` first applies AdamW's decoupled decay (p -= lr·wd·p) through a 0/1 mask per element.

Gradient clipping uses the global norm over every rank's gradient shards (one all-reduce). Checkpoints: the weights
are gathered whole (ZeRO-3: an all-gather) and written once by rank 0, single-device as always; each rank writes
its own optimizer shard (``optimizer_zero_rank<r>.safetensors``, torch's format of the inner optimizer over that
rank's flat shards), so resuming needs the same ``--zero-stage`` and number of ranks.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from labs_lib.config import CHECKPOINT_MODES
from labs_lib.parallel.data_parallel import DataParallel
from labs_lib.parallel.zero import FullyShardedModule, ShardedOptimizer, held_bytes
from labs_lib.profiling import ActivationMeter

__all__ = ["CHECKPOINT_MODES", "ZERO_STAGES", "apply_activation_checkpointing", "selective_policy",
           "activation_bytes_formula", "ZeroDataParallel", "clip_sharded_grad_norm_", "gather_held_bytes",
           "check_zero_resume", "deepspeed_torchrun"]

ZERO_STAGES = (0, 1, 2, 3)

# The matmuls whose outputs selective checkpointing keeps (nn.Linear runs as addmm/mm at the aten level).
MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.baddbmm.default}


# ------------------------------------------------------------------------------------------- activation checkpointing
def selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep matmul outputs, recompute everything else. Kept outputs are reported to any open ActivationMeter."""
    if op in MATMULS:
        out = getattr(ctx, "op_output", None)
        if isinstance(out, torch.Tensor):
            ActivationMeter.record(out)
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed(forward, mode: str, *args, **kwargs):
    context_fn = (functools.partial(create_selective_checkpoint_contexts, selective_policy) if mode == "selective"
                  else None)
    extra = {"context_fn": context_fn} if context_fn is not None else {}
    return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)


def apply_activation_checkpointing(model: nn.Module, mode: str = "full") -> nn.Module:
    """Checkpoint every transformer block (labs_lib.model.Block) inside ``model``, in place; returns ``model``.

    ``mode``: "none" (leave it), "full" or "selective" (see the module docstring). Works on the GPT, on a tensor-
    parallel GPT and on pipeline stages (it looks for Block modules); apply it before compile and DP/ZeRO."""
    from labs_lib.model import Block

    if mode not in CHECKPOINT_MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} does not exist: choose one of "
                         f"{', '.join(CHECKPOINT_MODES)}")
    if mode == "none":
        return model
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        raise ValueError(f"no transformer Block in {type(model).__name__}: nothing to checkpoint")
    for block in blocks:
        if "forward" in vars(block):
            raise ValueError("activation checkpointing is already applied to this model: apply it once")
        block.forward = functools.partial(_checkpointed, block.forward, mode)  # the bound Block.forward
    return model


# ---------------------------------------------------------------------------------------------------------- ZeRO
def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """labs_lib.train.make_optimizer's groups: weight decay on matrices only, tied weights once."""
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


@torch.no_grad()
def clip_sharded_grad_norm_(grads: list[torch.Tensor], max_norm: float, group=None) -> torch.Tensor:
    """Clip gradients split over the ranks of ``group`` (each element on exactly one rank) to a global norm of
    ``max_norm``, as torch.nn.utils.clip_grad_norm_ does for whole gradients; returns the global norm."""
    local = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else None)
    for g in grads:
        local += g.float().pow(2).sum()
    dist.all_reduce(local, group=group)
    norm = local.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return norm


class _ShardAdamW(torch.optim.AdamW):
    """AdamW over ZeRO-3's flat shards; decoupled weight decay only where ``masks`` (one per shard) are 1."""

    def __init__(self, shards: list[nn.Parameter], masks: list[torch.Tensor], weight_decay: float, **kwargs):
        super().__init__([{"params": shards, "masked_weight_decay": weight_decay}], weight_decay=0.0, **kwargs)
        self.masks = masks

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            decay = group["lr"] * group["masked_weight_decay"]
            for p, mask in zip(group["params"], self.masks):
                if p.grad is not None and decay:
                    p.mul_(1.0 - decay * mask)  # AdamW's p.mul_(1 - lr·wd), for the matrices' elements
        return super().step(closure)


def _decay_mask(flat) -> torch.Tensor:
    """1 for this rank's shard elements that belong to a matrix of the flat parameter, else 0."""
    parts = [torch.ones(shape) if len(shape) >= 2 else torch.zeros(shape) for shape in flat.shapes]
    return flat.layout.shard_of(parts, like=flat.shard.detach())


class ZeroDataParallel:
    """ZeRO stage 1, 2 or 3 of ``model`` over ``process_group`` (default: the world), for labs_lib.train's loop.

    ``self(x, y)`` runs the forward, ``self.optimizer`` is the step, and per micro-batch::

        with zero.micro_batch(last):   # stage 1: no_sync but for the last one; 2/3: reduce-scatter each backward
            loss = zero(x, y)[1] / grad_accum
            loss.backward()
        grad_norm = zero.clip_grad_norm_(1.0); zero.optimizer.step(); zero.optimizer.zero_grad()

    ``forward_model``: what runs the forward for stages 1 and 2 (e.g. ``torch.compile(model)``); default ``model``.
    """

    def __init__(self, model: nn.Module, stage: int, lr: float, betas: tuple[float, float], weight_decay: float,
                 bucket_size_mb: float = 25.0, process_group=None, forward_model: nn.Module | None = None):
        if stage not in (1, 2, 3):
            raise ValueError(f"ZeroDataParallel takes stage 1, 2 or 3, got {stage} (stage 0 is plain DDP)")
        self.stage, self.module, self.process_group = stage, model, process_group
        adamw = {"lr": lr, "betas": betas}
        if stage == 1:
            self.model = DataParallel(forward_model or model, bucket_size_mb=bucket_size_mb,
                                      process_group=process_group)
            self.optimizer = ShardedOptimizer(param_groups(model, weight_decay), torch.optim.AdamW, process_group,
                                              bucket_size_mb=bucket_size_mb, **adamw)
        elif stage == 2:
            self.model = forward_model or model
            self.optimizer = ShardedOptimizer(param_groups(model, weight_decay), torch.optim.AdamW, process_group,
                                              shard_gradients=True, bucket_size_mb=bucket_size_mb, **adamw)
        else:
            self.model = FullyShardedModule(model, process_group=process_group)
            flats = list(self.model.flat_params)
            self.optimizer = _ShardAdamW([f.shard for f in flats], [_decay_mask(f) for f in flats], weight_decay,
                                         **adamw)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def train(self, mode: bool = True):
        self.model.train(mode)
        return self

    def eval(self):
        return self.train(False)

    @contextlib.contextmanager
    def micro_batch(self, last: bool):
        """Around one micro-batch's forward and backward: accumulate locally (stage 1) or reduce-scatter (2, 3)."""
        with self.model.no_sync() if self.stage == 1 and not last else contextlib.nullcontext():
            yield
        if self.stage == 1:
            if last:
                self.model.finish_gradient_synchronization()
        elif self.stage == 2:
            self.optimizer.finish_gradient_synchronization()  # the slices of successive backwards add up
        else:
            self.model.finish_gradient_synchronization()

    def grad_shards(self) -> list[torch.Tensor]:
        if self.stage == 2:
            return [b.grad_shard for b in self.optimizer.buckets if b.grad_shard is not None]
        return [f.shard.grad for f in self.model.flat_params if f.shard.grad is not None]

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip to a global gradient norm; returns it (the same on every rank)."""
        if self.stage == 1:  # every rank holds the whole averaged gradients
            return torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
        return clip_sharded_grad_norm_(self.grad_shards(), max_norm, self.process_group)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The single-device weights (ZeRO-3: all-gathered, a collective: call it on every rank)."""
        if self.stage == 3:
            return self.model.gather_full_params()
        return self.module.state_dict()  # views of the flat buffers, whole on every rank after each step

    def held_bytes(self) -> dict[str, int]:
        return held_bytes(self.model if self.stage == 3 else self.module, self.optimizer)

    def shard_name(self, rank: int) -> str:
        return f"zero_rank{rank}"


def gather_held_bytes(held: dict[str, int], world_size: int, device=None) -> dict[str, dict[str, int]]:
    """{"mem_rank<r>": held bytes of rank r} for every rank (an all-gather on ``device`` when world_size > 1)."""
    keys = sorted(held)
    if world_size == 1:
        return {"mem_rank0": held}
    mine = torch.tensor([held[k] for k in keys], dtype=torch.int64, device=device)
    everyone = [torch.zeros_like(mine) for _ in range(world_size)]
    dist.all_gather(everyone, mine)
    return {f"mem_rank{r}": dict(zip(keys, t.tolist())) for r, t in enumerate(everyone)}


def check_zero_resume(saved: dict, stage: int, world_size: int, path) -> None:
    """ZeRO's optimizer state is saved per rank: resuming needs the stage and the number of ranks it was written with
    (``saved``: the checkpoint's meta.json). Raises ValueError naming the flags to resume with."""
    was_stage = saved.get("train", {}).get("zero_stage", 0)
    was_world = saved.get("world_size")
    if was_stage != stage or (stage and was_world != world_size):
        how = f"--zero-stage {was_stage}" + (f" on {was_world} ranks" if was_stage else "")
        raise ValueError(f"{path} was written with --zero-stage {was_stage} on {was_world} rank(s), this run has "
                         f"--zero-stage {stage} on {world_size}: resume with {how} (its weights are single-device: "
                         "python -m labs_lib.generate reads them anyway)")


# ------------------------------------------------------------------------------------- activation memory, the formula
def activation_bytes_formula(cfg, micro_batch: int, seq_len: int | None = None, dtype: str = "fp32",
                             mode: str = "none") -> float:
    """Bytes one transformer block of labs_lib's GPT keeps for backward: Korthikanti et al.'s sbh(34 + 5as/h),
    redone for this model. s sequence, b micro-batch, h width, a heads; B = bytes of the compute dtype (4 fp32,
    2 bf16 autocast).

    Korthikanti (16-bit, dropout, attention scores stored), in units of sbh bytes: LayerNorm inputs 2+2, qkv input 2,
    Q and K 4, V 2, projection input 2, fc input 2, GELU input 8, MLP projection input 8, two dropout masks 1+1 = 34,
    plus 5as/h from the s×s scores: softmax output 2, its dropout mask 1, the dropout output 2 (per head).

    This model, ``mode="none"``, tensor by tensor (what labs_lib.profiling.ActivationMeter sees):

    - the residual stream x and x + attn(x) stay fp32 under autocast (the add of an fp32 and a bf16 tensor is fp32),
      kept by the two LayerNorms: 4 + 4
    - LayerNorm runs in fp32 under CPU autocast; the matmul keeps its bf16 cast of the output: B + B
    - q, k, v are views of the qkv matmul's one output, kept by SDPA: 3B; SDPA's output, kept by SDPA and by the
      projection (one storage): B; fc output (GELU's input) 4B; GELU output (projection input) 4B
    - dropout=0: no masks (dropout with p=0 is the identity and saves nothing)
    - SDPA stores no s×s scores: its backward recomputes them from q, k and the softmax's log-sum-exp, 4 bytes per
      row and head (4·a·s·b, fp32 always). So 5as/h becomes 4a/h: the attention core is already recomputed inside
      the fused kernel (FlashAttention's backward), which is what Korthikanti's selective recomputation does by hand
    - LayerNorm mean and 1/std: 2 LayerNorms × 2 × 4 bytes per row: 16·s·b
    - bf16 only: autocast's bf16 copies of the four weight matrices (12h² values, 2 bytes), kept for the input
      gradients: 24h², independent of the batch

    none:       sbh(8 + 14B + 4a/h) + 16sb (+ 24h² with bf16)    fp32: sbh(64 + ...), bf16: sbh(36 + ...)
    full:       4sbh: the block's input only, fp32 (Korthikanti's 2sbh is the 16-bit input)
    selective:  sbh(4 + 9B): the input plus the four matmul outputs (3 + 1 + 4 + 1 widths of h)
    """
    if mode not in CHECKPOINT_MODES:
        raise ValueError(f"mode {mode!r} does not exist: choose one of {', '.join(CHECKPOINT_MODES)}")
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype {dtype!r}: the formula covers fp32 and bf16 (autocast)")
    s, b, h, a = seq_len or cfg.block_size, micro_batch, cfg.n_embd, cfg.n_head
    B = 4 if dtype == "fp32" else 2
    sbh = s * b * h
    if mode == "full":
        return 4 * sbh
    if mode == "selective":
        return sbh * (4 + 9 * B)
    return sbh * (8 + 14 * B) + 4 * a * s * b + 16 * s * b + (24 * h * h if dtype == "bf16" else 0)


# ---------------------------------------------------------------------------------------- DeepSpeed from a notebook
def deepspeed_torchrun(out, nproc: int = 2, ds_config: str = "zero2.json", profile: str | None = None,
                       progress: bool = True, **settings) -> list[dict]:
    """Run ``labs_lib.ds_train`` on ``nproc`` local ranks with torchrun (never in the notebook's kernel); returns its
    metrics (with ``mem_rank<r>``). The settings are checked first, before any process starts. Settings as in
    ``labs_lib.ds_train`` (``max_steps=4``, ``bf16=True``, ``activation_checkpointing=True``...)."""
    import shutil
    import sys
    from pathlib import Path

    from tqdm.auto import tqdm

    from labs_lib import ds_train, launch

    out = Path(out)
    args = launch.train_args(out, profile, False, **settings) + ["--ds-config", str(ds_config)]
    _, train_cfg = ds_train.check_training_config(args, nproc)  # raises ValueError naming the fix
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "labs_lib.ds_train", *args]
    bar = tqdm(total=train_cfg.max_steps, desc=f"deepspeed x{nproc}", unit="step", disable=not progress)
    try:
        launch.run_child(cmd, out / "train.log", lambda: launch.show_steps(bar, ds_train.read_metrics(out)),
                         what="DeepSpeed training")
    finally:
        bar.close()
    return ds_train.read_metrics(out)


# ------------------------------------------------------------------------------------------ the lab's exercise check
def accumulation_matches_big_batch(fn, cfg=None, batch: int = 8, micro_batches: int = 4, atol: float = 1e-6):
    """Check a learner's ``fn(model, x, y, micro_batches)`` (gradient accumulation), in this process: it must leave in
    ``.grad`` the gradient of the mean loss over the whole batch, as one backward on the whole batch does.

    Returns None if ``fn`` is not written yet (returns None or ...), else True / False."""
    from labs_lib.config import GPTConfig
    from labs_lib.model import GPT

    cfg = cfg or GPTConfig(vocab_size=128, block_size=16, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(cfg)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), generator=torch.Generator().manual_seed(1))
    y = x.roll(-1, 1)
    model(x, y)[1].backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    if fn(model, x, y, micro_batches) in (None, Ellipsis):
        return None
    return all(p.grad is not None and torch.allclose(p.grad, reference[n], rtol=0, atol=atol)
               for n, p in model.named_parameters())

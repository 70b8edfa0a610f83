"""Settings for every lab: model, training and parallel layout, plus the run profiles.

Every invalid combination is caught by :func:`validate` *before* any process is spawned, and the error says
what to change. Run profiles size the labs for the machine at hand:

    ci   2-core CPU, seconds per job (what CI and the headless notebook runs use)
    cpu  a laptop, minutes per job
    gpu  a GPU cluster node (GPT-2 small scale, bf16)

The profile comes from ``LABS_PROFILE``; without it, ``gpu`` when CUDA is present, else ``cpu``.
"""

from __future__ import annotations

import argparse
import copy
import os
from dataclasses import asdict, dataclass, field, fields, replace

PROFILES = ("ci", "cpu", "gpu")
DTYPES = ("fp32", "bf16", "fp16")
CHECKPOINT_MODES = ("none", "full", "selective")  # activation checkpointing (labs_lib.parallel.recompute)
ZERO_STAGES = (0, 1, 2, 3)  # 0: plain data parallelism; 1, 2, 3: ZeRO (by hand, or DeepSpeed's)


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024  # longest sequence (context length)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    # Mixture of experts (labs_lib.models.moe): 0 experts is the dense GPT; else every moe_every-th block's MLP is
    # an MoE layer of n_experts experts, each token routed to moe_top_k of them. In training the loss adds
    # moe_aux_coef x the load-balancing losses (Switch's 0.01) and moe_z_coef x the router z-losses (ST-MoE's 0.001).
    n_experts: int = 0
    moe_every: int = 2
    moe_top_k: int = 1
    moe_capacity_factor: float | None = 1.25
    moe_noise: str = "none"
    moe_aux_coef: float = 0.01
    moe_z_coef: float = 0.001

    @classmethod
    def preset(cls, name: str) -> GPTConfig:
        """Published GPT-2 / GPT-3 shapes, e.g. ``GPTConfig.preset("gpt2-small")``."""
        if name not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {name!r}: choose one of {', '.join(MODEL_PRESETS)}")
        return cls(**MODEL_PRESETS[name])

    def is_moe_block(self, layer: int) -> bool:
        """Whether block ``layer`` (0-based) has an MoE MLP: every moe_every-th, counted from 1 (GShard, Switch)."""
        return self.n_experts > 0 and (layer + 1) % self.moe_every == 0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


# GPT-2 (Radford et al. 2019) and GPT-3 (Brown et al. 2020, table 2.1) shapes.
MODEL_PRESETS: dict[str, dict] = {
    "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    "gpt3-2.7b": dict(n_layer=32, n_head=32, n_embd=2560, block_size=2048),
    "gpt3-6.7b": dict(n_layer=32, n_head=32, n_embd=4096, block_size=2048),
    "gpt3-13b": dict(n_layer=40, n_head=40, n_embd=5120, block_size=2048),  # table 2.1 says 5140; 40 x 128 = 5120
    "gpt3-175b": dict(n_layer=96, n_head=96, n_embd=12288, block_size=2048),
}


@dataclass
class TrainConfig:
    batch_size: int = 8  # micro-batch per data-parallel rank
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 100  # where this run stops
    lr_decay_steps: int | None = None  # length of the cosine schedule; None: max_steps
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 50  # 0 disables periodic evaluation
    eval_iters: int = 4
    checkpoint_interval: int = 50  # 0: only at the end
    keep_checkpoints: int = 2
    dtype: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + GradScaler, CUDA only)
    seed: int = 1337
    data: str | None = None  # text file or folder; None: the Python standard library's sources
    tokenizer_vocab: int = 512  # BPE vocabulary trained on the corpus
    init_from: str | None = None  # a run (or step) folder: start from its weights and tokenizer (a fine-tune)
    corpus_max_bytes: int | None = None  # cap the corpus (the ci profile trains on a slice)
    val_fraction: float = 0.05
    ddp_bucket_mb: float = 25.0  # DDP gradient bucket size
    ddp_overlap: bool = True  # all-reduce buckets during backward (False: one all-reduce after backward)
    trace_steps: int = 0  # >0: torch.profiler trace of that many steps (after 1 skipped + 1 warm-up) into out/trace
    compile: bool = False  # torch.compile the model (GPU: fused kernels; the first steps pay for compilation)
    activation_checkpointing: str = "none"  # none | full | selective (labs_lib.parallel.recompute)
    zero_stage: int = 0  # 0: DDP; 1/2/3: ZeRO by hand (parallel.zero_data_parallel), data parallel only

    def schedule_steps(self) -> int:
        return self.lr_decay_steps or self.max_steps

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ParallelConfig:
    dp: int | None = None  # None: whatever is left of the world after tp and pp
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False  # split LayerNorm/dropout activations along the sequence (needs tp > 1)
    micro_batches: int = 1  # pipeline micro-batches per batch (pp > 1)
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved-1f1b
    pp_chunks: int = 1  # model chunks per pipeline rank (interleaved-1f1b: >= 2)
    ep: int = 1  # expert-parallel ranks: each MoE layer's experts spread over groups of ep data-parallel ranks

    def resolved(self, world_size: int) -> ParallelConfig:
        if self.dp is not None:
            return self
        return replace(self, dp=max(world_size // (self.tp * self.pp), 1))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Profile:
    name: str
    model: GPTConfig
    train: TrainConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def padded_vocab(n: int, multiple: int = 64) -> int:
    """The embedding table's size for a tokenizer of ``n`` tokens: padded to a multiple of 64 (faster matmuls, and
    divisible for tensor parallelism). The one padding rule of the project."""
    return -(-n // multiple) * multiple


def _profiles() -> dict[str, Profile]:
    ci_vocab, cpu_vocab, gpu_vocab = 512, 2048, 32768
    return {
        "ci": Profile(
            "ci",
            GPTConfig(vocab_size=padded_vocab(ci_vocab), block_size=64, n_layer=2, n_head=2, n_embd=64),
            TrainConfig(batch_size=8, max_steps=60, lr=3e-3, min_lr=3e-4, warmup_steps=5, eval_interval=20,
                        eval_iters=2, checkpoint_interval=20, tokenizer_vocab=ci_vocab,
                        corpus_max_bytes=1_000_000),
        ),
        "cpu": Profile(
            "cpu",
            GPTConfig(vocab_size=padded_vocab(cpu_vocab), block_size=128, n_layer=4, n_head=4, n_embd=128),
            TrainConfig(batch_size=16, max_steps=400, lr=1e-3, min_lr=1e-4, warmup_steps=20, eval_interval=100,
                        eval_iters=4, checkpoint_interval=100, tokenizer_vocab=cpu_vocab,
                        corpus_max_bytes=4_000_000),
        ),
        "gpu": Profile(
            "gpu",
            GPTConfig(vocab_size=padded_vocab(gpu_vocab), block_size=1024, n_layer=12, n_head=12, n_embd=768),
            TrainConfig(batch_size=16, grad_accum=2, max_steps=2000, lr=6e-4, min_lr=6e-5, warmup_steps=100,
                        eval_interval=250, eval_iters=10, checkpoint_interval=500, dtype="bf16",
                        tokenizer_vocab=gpu_vocab, compile=True),
        ),
    }


def default_profile_name() -> str:
    name = os.environ.get("LABS_PROFILE")
    if name:
        return name
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def get_profile(name: str | None = None) -> Profile:
    """The named profile (or ``LABS_PROFILE``'s, or the default for this machine), as a fresh copy."""
    name = name or default_profile_name()
    profiles = _profiles()
    if name not in profiles:
        raise ValueError(f"unknown profile {name!r}: set LABS_PROFILE (or --profile) to one of {', '.join(PROFILES)}")
    return copy.deepcopy(profiles[name])


def override(config, **changes):
    """``dataclasses.replace`` that ignores ``None`` values and names the valid fields on a typo."""
    names = {f.name for f in fields(config)}
    unknown = set(changes) - names
    if unknown:
        raise ValueError(f"unknown setting(s) {sorted(unknown)} for {type(config).__name__}: valid are {sorted(names)}")
    return replace(config, **{k: v for k, v in changes.items() if v is not None})


NOISE_POLICIES = ("none", "jitter", "rsample")  # router noise: none, Switch's input jitter, DeepSpeed's RSample


def check_moe(n_experts: int, top_k: int, capacity_factor: float | None, noise: str, ep: int = 1) -> None:
    """Every bad MoE setting, as a ValueError naming the fix (called before any process starts)."""
    if n_experts < 1:
        raise ValueError(f"n_experts must be >= 1, got {n_experts}")
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k must be between 1 and n_experts ({n_experts}), got {top_k}: lower top_k")
    if capacity_factor is not None and capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0 (or None for no drops), got {capacity_factor}")
    if noise not in NOISE_POLICIES:
        raise ValueError(f"noise must be one of {', '.join(NOISE_POLICIES)}, got {noise!r}")
    if ep < 1 or n_experts % ep:
        raise ValueError(f"{n_experts} experts cannot be spread over an expert-parallel size of {ep}: choose an "
                         f"expert-parallel size that divides {n_experts}")


def _check_model(model: GPTConfig, need) -> None:
    """The model's own settings (shape, dropout, mixture of experts), for :func:`validate`."""
    for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
        need(getattr(model, name) >= 1, f"model.{name} must be a positive integer, got {getattr(model, name)}")
    need(model.n_embd % model.n_head == 0,
         f"n_embd={model.n_embd} is not divisible by n_head={model.n_head}: choose n_embd as a multiple of "
         f"n_head (e.g. n_embd={model.n_head * max(model.n_embd // model.n_head, 1)})")
    need(0.0 <= model.dropout < 1.0, f"dropout must lie in [0, 1), got {model.dropout}")
    if model.n_experts:
        need(1 <= model.moe_every <= model.n_layer,
             f"moe_every={model.moe_every} must lie between 1 and n_layer={model.n_layer}, or no block is an MoE one")
        check_moe(model.n_experts, model.moe_top_k, model.moe_capacity_factor, model.moe_noise)
        need(model.moe_aux_coef >= 0 and model.moe_z_coef >= 0,
             f"moe_aux_coef and moe_z_coef must be >= 0, got {model.moe_aux_coef} and {model.moe_z_coef}")


def validate(model: GPTConfig, train: TrainConfig | None = None, parallel: ParallelConfig | None = None,
             world_size: int = 1, device_type: str = "cpu") -> None:
    """Raise ``ValueError`` naming the fix for the first invalid setting found. Call before spawning."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    _check_model(model, need)

    if train is not None:
        for name in ("batch_size", "grad_accum", "max_steps", "eval_iters", "keep_checkpoints", "tokenizer_vocab"):
            need(getattr(train, name) >= 1, f"train.{name} must be >= 1, got {getattr(train, name)}")
        for name in ("warmup_steps", "eval_interval", "checkpoint_interval", "grad_clip", "weight_decay",
                     "trace_steps"):
            need(getattr(train, name) >= 0, f"train.{name} must be >= 0, got {getattr(train, name)}")
        need(train.lr > 0, f"learning rate must be positive, got lr={train.lr}")
        need(0 <= train.min_lr <= train.lr, f"min_lr={train.min_lr} must lie between 0 and lr={train.lr}")
        need(train.warmup_steps <= train.schedule_steps(),
             f"warmup_steps={train.warmup_steps} is longer than the schedule ({train.schedule_steps()} steps): "
             "lower warmup_steps or raise max_steps / lr_decay_steps")
        need(train.dtype in DTYPES, f"dtype {train.dtype!r} is not supported: choose one of {', '.join(DTYPES)}")
        need(train.dtype != "fp16" or device_type == "cuda",
             "fp16 needs a CUDA GPU (loss scaling of fp16 on CPU is not supported): use --dtype bf16 or fp32")
        need(train.ddp_bucket_mb > 0, f"ddp_bucket_mb must be positive, got {train.ddp_bucket_mb}")
        need(train.trace_steps == 0 or train.max_steps >= train.trace_steps + 2,
             f"tracing {train.trace_steps} steps needs max_steps >= {train.trace_steps + 2} (1 skipped + 1 warm-up): "
             "raise max_steps or lower trace_steps")
        need(train.activation_checkpointing in CHECKPOINT_MODES,
             f"activation_checkpointing {train.activation_checkpointing!r} does not exist: choose one of "
             f"{', '.join(CHECKPOINT_MODES)}")
        need(train.zero_stage in ZERO_STAGES, f"zero_stage={train.zero_stage} does not exist: use 0, 1, 2 or 3")
        need(train.zero_stage == 0 or train.dtype != "fp16",
             "fp16 loss scaling is not supported with --zero-stage (the scaler cannot see the sharded gradients): "
             "use --dtype bf16")
        need(train.zero_stage != 3 or not train.compile,
             "--zero-stage 3 removes the parameters from the modules, which torch.compile does not follow: "
             "use --no-compile")
        need(0.0 < train.val_fraction < 0.5, f"val_fraction must lie in (0, 0.5), got {train.val_fraction}")
        need(train.tokenizer_vocab >= 257,
             f"tokenizer_vocab={train.tokenizer_vocab} is smaller than the 256 byte symbols + 1 special token: "
             "use at least 257")
        need(model.vocab_size >= train.tokenizer_vocab,
             f"model vocab_size={model.vocab_size} is smaller than the tokenizer's {train.tokenizer_vocab} tokens: "
             f"set vocab_size to at least {train.tokenizer_vocab} (padded: {padded_vocab(train.tokenizer_vocab)})")

    if parallel is not None:
        need(world_size >= 1, f"world size must be >= 1, got {world_size}")
        need(parallel.tp >= 1 and parallel.pp >= 1, f"tp and pp must be >= 1, got tp={parallel.tp} pp={parallel.pp}")
        p = parallel.resolved(world_size)
        need(p.dp * p.tp * p.pp == world_size,
             f"world size {world_size} != dp*tp*pp = {p.dp}*{p.tp}*{p.pp} = {p.dp * p.tp * p.pp}: launch "
             f"{p.dp * p.tp * p.pp} processes or change dp/tp/pp so that their product is {world_size}")
        need(model.n_head % p.tp == 0,
             f"n_head={model.n_head} is not divisible by tp={p.tp}: choose tp among the divisors of n_head")
        need(model.vocab_size % p.tp == 0,
             f"vocab_size={model.vocab_size} is not divisible by tp={p.tp}: pad the vocabulary to a multiple of "
             f"{p.tp} (e.g. {padded_vocab(model.vocab_size, 64 * p.tp)})")
        need(model.n_layer % p.pp == 0,
             f"n_layer={model.n_layer} is not divisible by pp={p.pp}: choose pp among the divisors of n_layer")
        need(not model.n_experts or p.tp * p.pp == 1,
             f"tensor and pipeline parallelism of MoE GPTs are not built (tp={p.tp} pp={p.pp}, {model.n_experts} "
             "experts): use tp=1 pp=1 (data parallel or ZeRO); expert parallelism (labs_lib.parallel.experts) "
             "spreads the experts over the ranks instead")
        if train is not None and train.zero_stage:
            need(p.tp * p.pp == 1,
                 f"--zero-stage {train.zero_stage} (ZeRO by hand) runs on plain data parallelism, but tp={p.tp} "
                 f"pp={p.pp}: drop --tp/--pp, or use --zero-stage 0 with tensor/pipeline parallelism")
            need(world_size > 1, f"--zero-stage {train.zero_stage} shards over the data-parallel ranks, and this "
                                 "run has one: launch 2 or more (torchrun --nproc-per-node=2), or use --zero-stage 0")


def parse_job_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args`` for a pre-launch check: a bad flag is a ValueError naming it, not a SystemExit."""
    try:
        return parser.parse_args(argv)
    except SystemExit as e:
        raise ValueError(f"bad arguments for {parser.prog}: {' '.join(argv)} (see {parser.prog} --help)") from e


def divisors(n: int) -> list[int]:
    """The divisors of ``n``, ascending: what the layout checks offer as sizes that would work."""
    return [d for d in range(1, n + 1) if n % d == 0]

"""The planner's nouns: a model (ModelSpec), a cluster (ClusterSpec), a plan (Plan) and what it costs (Estimate),
with the counts everything else is built on: parameters per TP / PP rank, bytes per parameter, FLOPs per token.

Parameters are counted on a one-layer meta GPT (labs_lib.models.gpt.GPT: tied embedding, biases) and split over
the tensor-parallel ranks by labs_lib.estimates.parallel.TENSOR_PARALLEL_SPLIT, Megatron's rule (token embedding by
vocabulary, qkv and fc by output, both projections by input; LayerNorms, the projections' biases and the position
embedding whole), which holds for both kinds of model. Bytes per parameter (weights, gradients, Adam): fp32
(4, 4, 8), bf16 / fp16 mixed precision (2, 2, 12) (ZeRO paper, section 3.1) for "megatron" models; labs_lib's
trainers keep fp32 parameters under autocast, so "labs" models take (4, 4, 8) at any precision (autocast's 16-bit
weight copies are activations, labs_lib.estimates.memory.activation_bytes_formula).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, replace

import torch

from labs_lib.core.config import DTYPES, GPTConfig
from labs_lib.estimates.parallel import TENSOR_PARALLEL_SPLIT

KINDS = ("megatron", "labs")
# Operators a layer dispatches per micro-batch, relative to no recompute: full recompute runs the forward's (about a
# third of forward + backward) again; selective only the attention core, one fused operator.
RECOMPUTE_OPS = {"none": 1.0, "selective": 1.0, "full": 4 / 3}
GB = 1e9
MIXED_PRECISION_BYTES, FP32_BYTES = (2, 2, 12), (4, 4, 8)  # weights, gradients, optimizer (ZeRO paper, 3.1)


@dataclass(frozen=True)
class ModelSpec:
    """A GPT shape. ``kind`` "megatron": Korthikanti's 16-bit activations (published models); "labs": labs_lib's
    own GPT (labs_lib.models.gpt.GPT: tied embeddings, biases, SDPA, fp32 residual), counted exactly."""

    name: str
    layers: int
    hidden: int
    heads: int
    vocab: int
    seq: int
    kind: str = "megatron"
    bias: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"model kind {self.kind!r} does not exist: choose one of {', '.join(KINDS)}")
        sizes = {"layers": self.layers, "hidden": self.hidden, "heads": self.heads, "vocab": self.vocab,
                 "seq": self.seq}
        bad = [f"{k}={v}" for k, v in sizes.items() if not isinstance(v, int) or v < 1]
        if bad:
            raise ValueError(f"model sizes must be positive integers, got {', '.join(bad)}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}: choose a hidden size "
                             f"that is a multiple of the heads (e.g. {self.heads * (self.hidden // self.heads + 1)})")

    def gpt_config(self, layers: int | None = None) -> GPTConfig:
        return GPTConfig(vocab_size=self.vocab, block_size=self.seq, n_layer=layers or self.layers,
                         n_head=self.heads, n_embd=self.hidden, bias=self.bias)

    def params(self) -> int:
        """Parameters, the tied embedding once (labs_lib's GPT.num_params for the same shape)."""
        return int(sum(split + whole for split, whole in parameter_parts(self).values())
                   + (self.layers - 1) * sum(parameter_parts(self)["blocks"]))

    def flops_per_token(self) -> float:
        """Training FLOPs per token, forward + backward, without recomputation (GPT.flops_per_token's rule)."""
        return model_flops_per_token(self.params() - self.seq * self.hidden, self.layers, self.hidden, self.seq)

    @classmethod
    def from_gpt_config(cls, cfg: GPTConfig, name: str = "custom") -> ModelSpec:
        return cls(name, layers=cfg.n_layer, hidden=cfg.n_embd, heads=cfg.n_head, vocab=cfg.vocab_size,
                   seq=cfg.block_size, kind="labs", bias=cfg.bias)


@dataclass(frozen=True)
class ClusterSpec:
    """Per GPU: memory, dense peak FLOP/s of the precision planned in, all-reduce bus bandwidth (B/s) within a node
    and across nodes. ``shared_cores``: a CPU cluster whose ranks all share that many cores; ``layer_overhead_s``:
    the fixed cost per layer and micro-batch (forward + backward) a CPU pays and a GPU hides (calibrated).
    ``collectives``: {"reduce_scatter" | "all_gather" | "send_recv": ((latency s, busbw) within a node, (...) across
    nodes)} where those differ from the all-reduce (gloo: measured); absent, they run at the all-reduce's (NCCL,
    nccl-tests). ``contended``: {collective: (latency s, busbw)} measured with ``contended_share`` ranks per core
    (a CPU cluster with more ranks than cores); ``optimizer_s_per_param``: the optimizer step's seconds per
    parameter a rank updates (calibrated on a CPU; a GPU's is negligible next to its step);
    ``recompute_overhead_s``: {"selective" | "full": the fixed cost per layer and micro-batch under that
    recomputation}, where measured (else the planner scales ``layer_overhead_s`` by the operators it repeats)."""

    name: str
    gpus: int
    gpus_per_node: int
    memory_bytes: float
    peak_flops: float
    intra_node_busbw: float
    inter_node_busbw: float
    latency_s: float = 5e-6
    compute_efficiency: float = 0.5
    shared_cores: int | None = None
    layer_overhead_s: float = 0.0
    optimizer_s_per_param: float = 0.0
    collectives: dict | None = None
    contended: dict | None = None
    contended_share: float = 0.0
    recompute_overhead_s: dict | None = None

    def layer_overhead(self, recompute: str) -> float:
        """Fixed seconds per layer and micro-batch under ``recompute`` (none | selective | full)."""
        if self.recompute_overhead_s and recompute in self.recompute_overhead_s:
            return self.recompute_overhead_s[recompute]
        return self.layer_overhead_s * RECOMPUTE_OPS[recompute]

    def with_gpus(self, n: int) -> ClusterSpec:
        return replace(self, gpus=n)

    def busbw(self, group_span: int) -> float:
        """The bus bandwidth of a group whose ranks lie within ``group_span`` consecutive ranks."""
        return self.intra_node_busbw if group_span <= self.gpus_per_node else self.inter_node_busbw

    def link(self, collective: str, group_span: int) -> tuple[float, float]:
        """(latency s, busbw B/s) of ``collective`` over a group within ``group_span`` consecutive ranks."""
        if self.collectives and collective in self.collectives:
            return self.collectives[collective][0 if group_span <= self.gpus_per_node else 1]
        return self.latency_s, self.busbw(group_span)


@dataclass(frozen=True)
class Plan:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero: int = 0
    micro_batch: int = 1
    global_batch: int = 1
    recompute: str = "none"  # none | selective | full
    sequence_parallel: bool = False
    precision: str = "bf16"  # fp32 | bf16 | fp16
    offload: bool = False  # ZeRO-Offload: the optimizer state (and fp32 master weights) on the host
    schedule: str = "1f1b"  # gpipe | 1f1b | interleaved-1f1b
    chunks: int = 1  # virtual stages per pipeline rank (interleaved-1f1b)

    @property
    def gradient_accumulation(self) -> int:
        """Micro-batches per optimizer step (per pipeline: the pipeline's micro-batches)."""
        return self.global_batch // (self.dp * self.micro_batch)


@dataclass
class Estimate:
    memory_bytes: dict  # params, grads, optimizer, activations, buffers, total: per GPU, the worst stage's
    worst_stage: int
    flops_per_step: float  # model FLOPs of one optimizer step, whole cluster
    hardware_flops_per_step: float  # including recomputation
    comm_bytes: dict  # per GPU per step, by collective
    comm_time_s: dict
    compute_time_s: float
    bubble_time_s: float
    step_time_s: float
    tokens_per_s: float
    mfu: float
    hfu: float
    train_days: float | None
    fits: bool
    reason: str  # "" when it fits

    def to_json(self) -> dict:
        return asdict(self)


def model_flops_per_token(params: float, layers: int, hidden: int, seq: int) -> float:
    """6N + 12·L·h·s (PaLM, appendix B): N the parameters in matmuls (not the position embedding), h the
    attention width (heads × head size)."""
    return 6 * params + 12 * layers * hidden * seq


def recompute_flops_per_token(model: ModelSpec, mode: str) -> float:
    """FLOPs per token that activation recomputation runs again: full, one more forward of the layers; selective,
    the attention core (QKᵀ and the weighted values, 4·L·h·s); none, nothing."""
    attention_forward = 4 * model.layers * model.hidden * model.seq
    if mode == "full":
        return 2 * model.layers * sum(parameter_parts(model)["blocks"]) + attention_forward
    return attention_forward if mode == "selective" else 0.0


def state_bytes_per_param(precision: str) -> tuple[int, int, int]:
    if precision not in DTYPES:
        raise ValueError(f"precision {precision!r} does not exist: choose one of {', '.join(DTYPES)}")
    return FP32_BYTES if precision == "fp32" else MIXED_PRECISION_BYTES


def state_bytes(model: ModelSpec, precision: str) -> tuple[int, int, int]:
    """Bytes per parameter (weights, gradients, optimizer) of ``model``'s trainer at ``precision``."""
    return FP32_BYTES if model.kind == "labs" else state_bytes_per_param(precision)


@functools.lru_cache(maxsize=128)
def parameter_parts(model: ModelSpec) -> dict[str, tuple[int, int]]:
    """(split over the TP ranks, whole on every rank) parameters of tok_emb, pos_emb, one block and ln_f, counted
    on a one-layer meta GPT with TENSOR_PARALLEL_SPLIT's rule."""
    from labs_lib.models.gpt import GPT

    with torch.device("meta"):
        gpt = GPT(model.gpt_config(layers=1))
    parts = {"tok_emb": [0, 0], "pos_emb": [0, 0], "blocks": [0, 0], "ln_f": [0, 0]}
    for name, p in gpt.named_parameters():  # lists the tied lm_head once, as tok_emb
        parts[name.split(".")[0]][0 if name.endswith(TENSOR_PARALLEL_SPLIT) else 1] += p.numel()
    return {k: (split, whole) for k, (split, whole) in parts.items()}


def stage_params(model: ModelSpec, tp: int, pp: int, stage: int) -> float:
    """Parameters one rank of pipeline stage ``stage`` holds after the TP split: L/p layers, the embeddings on the
    first stage, the final LayerNorm and (pp > 1) a copy of the tied embedding on the last (GPTStage's layout)."""
    parts = parameter_parts(model)

    def per_rank(part: str) -> float:
        split, whole = parts[part]
        return split / tp + whole

    held = model.layers / pp * per_rank("blocks")
    if stage == 0:
        held += per_rank("tok_emb") + per_rank("pos_emb")
    if stage == pp - 1:
        held += per_rank("ln_f") + (per_rank("tok_emb") if pp > 1 else 0)
    return held

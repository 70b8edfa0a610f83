"""Plan a GPT's training on any cluster: per-GPU memory, FLOPs, communication, step time, MFU, days, and whether it
fits (and what to change when it does not).

    model, cluster = model_preset("gpt3-175b"), cluster_preset("a100-80gb").with_gpus(1024)
    plan = Plan(dp=16, tp=8, pp=8, zero=1, micro_batch=1, global_batch=1536, recompute="selective",
                sequence_parallel=True)
    est = estimate(model, cluster, plan, tokens=300e9)     # est.fits, est.memory_bytes["total"], est.train_days

The formulas come from below (labs_lib.estimates): ZeRO states (memory.zero_bytes_per_rank), activations
(activations.py: Korthikanti et al. 2022 for Megatron-style models, labs_lib's own tensor-by-tensor count for its
GPT), tensor-parallel traffic (parallel.tensor_parallel_comm_per_layer) and the split of the parameters
(parallel.TENSOR_PARALLEL_SPLIT, Megatron's: the same rule for both kinds of model).

**Memory** per GPU is the worst pipeline rank's (the first holds the embeddings and the most micro-batches in
flight; the last the output layer, a copy of the tied embedding, and the logits):

- parameters after TP (1/t of the split matrices) and PP (L/p layers), then ZeRO over the dp group, at the bytes
  per parameter of specs.state_bytes (mixed precision 2 + 2 + 12). Offload moves the optimizer state to the host;
- activations: one layer's (labs_lib.estimates.activations) × the (layer, micro-batch) sets the schedule keeps;
- buffers: the last stage's fp32 logits (b·s·V/t, every micro-batch of them under GPipe), the tensors backward
  rebuilds for one layer under recomputation, and one DDP bucket (25 MB, or all the gradients if fewer).

**Time**: compute = hardware FLOPs per GPU / (peak · compute_efficiency), plus the calibrated fixed cost per layer and
micro-batch and the optimizer's per parameter the rank updates (CPU clusters); ranks that share ``shared_cores`` cores
share their compute. Bubble = (p−1)/(v·m) of the micro-batches' ideal time (Megatron's convention; (p−1)/(v·m+p−1)
of the pipelined part). Communication per collective = latency + ring bytes / busbw (nccl-tests' definition:
all-reduce moves 2(n−1)/n of the tensor, all-gather and reduce-scatter (n−1)/n, send/recv all of it; each with its
own latency and busbw where the cluster says so), over intra-node links when the group fits in a node (ranks laid
out TP, then DP, then PP, labs_lib.parallel.mesh); on shared cores, as measured with the cores oversubscribed
(``ClusterSpec.contended``). Step = compute + bubble + what does not overlap: gradient
all-reduces / reduce-scatters overlap the last micro-batch's backward except the last bucket; TP, PP and ZeRO
all-gathers do not overlap. The host's Adam under offload is not timed. MFU counts model FLOPs (6N + 12·L·h·s per token,
PaLM appendix B); HFU adds what recomputation repeats (full: one more forward of the layers; selective: the attention
core).
"""

from __future__ import annotations

import math
from dataclasses import replace

from labs_lib.core.config import CHECKPOINT_MODES, DTYPES, ZERO_STAGES, divisors
from labs_lib.estimates.activations import (
    labs_activation_bytes,
    labs_head_activation_bytes,
    layers_in_flight,
    megatron_activation_bytes,
)
from labs_lib.estimates.memory import zero_bytes_per_rank
from labs_lib.estimates.parallel import tensor_parallel_comm_per_layer
from labs_lib.parallel.pipeline import check_pipeline
from labs_lib.planner.specs import (
    GB,
    KINDS,
    ClusterSpec,
    Estimate,
    ModelSpec,
    Plan,
    model_flops_per_token,
    parameter_parts,
    recompute_flops_per_token,
    stage_params,
    state_bytes,
    state_bytes_per_param,
)

__all__ = ["KINDS", "GB", "ModelSpec", "ClusterSpec", "Plan", "Estimate", "check_plan", "estimate", "stage_memory",
           "memory_per_gpu", "stage_params", "model_flops_per_token", "model_states_bytes", "narayanan_train_days"]

SECONDS_PER_DAY = 86400
DDP_BUCKET_BYTES = 25 * 2**20  # torch DDP's (and labs_lib DataParallel's) bucket_cap_mb=25


def model_states_bytes(params: float, dp: int, zero: int, precision: str = "bf16", offload: bool = False) -> dict:
    """Per-GPU bytes of weights, gradients and Adam state for ``params`` parameters over ``dp`` ranks at ZeRO stage
    ``zero`` (the ZeRO paper's accounting), and their total."""
    states = zero_bytes_per_rank(params, dp, zero, state_bytes_per_param(precision))
    if offload:
        states["optimizer"] = 0.0
    return {**states, "total": sum(states.values())}


def narayanan_train_days(tokens: float, params: float, gpus: int, flops_per_gpu: float,
                         recompute: bool = True) -> float:
    """End-to-end training time 8·T·P / (n·X) (Narayanan et al. 2021, eq. 4; 6 instead of 8 without
    recomputation), in days."""
    return (8 if recompute else 6) * tokens * params / (gpus * flops_per_gpu) / SECONDS_PER_DAY


def check_plan(model: ModelSpec, cluster: ClusterSpec, plan: Plan) -> None:
    """Raise ValueError naming the fix for a plan that cannot run on ``cluster``."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    sizes = {"dp": plan.dp, "tp": plan.tp, "pp": plan.pp, "micro_batch": plan.micro_batch,
             "global_batch": plan.global_batch, "chunks": plan.chunks}
    bad = [f"{k}={v}" for k, v in sizes.items() if not isinstance(v, int) or v < 1]
    need(not bad, f"{', '.join(bad)}: these must be positive integers")
    need(model.heads % plan.tp == 0, f"tp={plan.tp} does not divide heads={model.heads}: choose tp among "
         f"{divisors(model.heads)}")
    layout = plan.dp * plan.tp * plan.pp
    need(layout == cluster.gpus, f"dp·tp·pp = {plan.dp}·{plan.tp}·{plan.pp} = {layout} but the cluster has "
         f"{cluster.gpus} GPUs: " + (f"set --dp {cluster.gpus // (plan.tp * plan.pp)}"
                                     if cluster.gpus % (plan.tp * plan.pp) == 0 else "choose tp·pp dividing --gpus"))
    need(model.kind != "labs" or model.vocab % plan.tp == 0, f"tp={plan.tp} does not divide the vocabulary "
         f"{model.vocab}: pad it (labs_lib.core.config.padded_vocab) to a multiple of {plan.tp}")
    need(plan.zero in ZERO_STAGES, f"--zero {plan.zero}: ZeRO stages are {', '.join(map(str, ZERO_STAGES))}")
    need(plan.zero <= 1 or plan.pp == 1, f"ZeRO stage {plan.zero} with pipeline parallelism (pp={plan.pp}) "
         "re-gathers or re-reduces every micro-batch: use --zero 1 with pp > 1 (Megatron and DeepSpeed do)")
    need(not plan.offload or plan.zero >= 1, "offload moves ZeRO's optimizer partitions to the host: use --zero 1, 2 "
         "or 3 with --offload")
    need(plan.recompute in CHECKPOINT_MODES, f"--recompute {plan.recompute}: choose one of "
         f"{', '.join(CHECKPOINT_MODES)}")
    need(plan.precision in DTYPES, f"--precision {plan.precision}: choose one of {', '.join(DTYPES)}")
    need(not plan.sequence_parallel or plan.tp > 1, "sequence parallelism splits along the tensor-parallel group: "
         "use it with --tp 2 or more")
    need(not plan.sequence_parallel or model.seq % plan.tp == 0, f"sequence parallelism splits seq={model.seq} "
         f"{plan.tp} ways: choose tp among {divisors(model.seq)} or a sequence divisible by tp")
    per_step = plan.dp * plan.micro_batch
    need(plan.global_batch % per_step == 0, f"global batch {plan.global_batch} is not divisible by dp·micro_batch "
         f"= {per_step}: use a multiple of it, e.g. --global-batch {per_step * max(1, plan.global_batch // per_step)}")
    m = plan.gradient_accumulation
    try:
        check_pipeline(model.layers, plan.pp, m, m, plan.schedule, plan.chunks)
    except ValueError as e:
        raise ValueError(f"{e} (here the micro-batches per step are --global-batch / (dp · --micro-batch) = "
                         f"{m})") from None


def _activation_bytes(model: ModelSpec, plan: Plan, recompute: str) -> float:
    cfg = model.gpt_config()
    if model.kind == "labs":
        return labs_activation_bytes(cfg, plan.micro_batch, None, plan.precision, plan.tp, plan.sequence_parallel,
                                     recompute)
    return megatron_activation_bytes(cfg, plan.micro_batch, None, plan.tp, plan.sequence_parallel, recompute,
                                     4 if plan.precision == "fp32" else 2)


def stage_memory(model: ModelSpec, plan: Plan, stage: int) -> dict[str, float]:
    """Bytes one GPU of pipeline stage ``stage`` needs at its peak, by kind, and their total."""
    m = plan.gradient_accumulation
    states = zero_bytes_per_rank(stage_params(model, plan.tp, plan.pp, stage), plan.dp, plan.zero,
                                 state_bytes(model, plan.precision))
    if plan.offload:
        states["optimizer"] = 0.0
    per_layer = _activation_bytes(model, plan, plan.recompute)
    activations = per_layer * layers_in_flight(model.layers, plan.pp, m, plan.schedule, plan.chunks, stage)
    buffers = _activation_bytes(model, plan, "none") - per_layer  # one layer rebuilt in backward
    if stage == plan.pp - 1:
        logits_held = m if plan.schedule == "gpipe" and plan.pp > 1 else 1
        if model.kind == "labs":  # measured: what the head keeps for backward, the logits' log-softmax included
            activations += logits_held * labs_head_activation_bytes(model.gpt_config(), plan.micro_batch, None,
                                                                    plan.precision, plan.tp, plan.sequence_parallel)
        else:
            buffers += 4 * plan.micro_batch * model.seq * model.vocab / plan.tp * logits_held
    if plan.dp > 1 and plan.zero == 0:
        buffers += min(DDP_BUCKET_BYTES, states["grads"])  # a bucket holds at most all the gradients
    memory = {**states, "activations": activations, "buffers": buffers}
    return {**memory, "total": sum(memory.values())}


def memory_per_gpu(model: ModelSpec, plan: Plan) -> tuple[dict[str, float], int]:
    """(the worst pipeline stage's memory, that stage): the first or the last holds the most."""
    stages = sorted({0, plan.pp - 1})
    memories = [stage_memory(model, plan, s) for s in stages]
    worst = max(range(len(stages)), key=lambda i: memories[i]["total"])
    return memories[worst], stages[worst]


def _core_share(cluster: ClusterSpec) -> float:
    """How many ranks take turns on each core: 1 on GPUs; on a CPU cluster of ``shared_cores``, gpus / cores."""
    return max(1.0, cluster.gpus / cluster.shared_cores) if cluster.shared_cores else 1.0


def _collective(cluster: ClusterSpec, span: int, ring_bytes: float, count: float, kind: str = "all_reduce") -> float:
    """Seconds of ``count`` ``kind`` collectives moving ``ring_bytes`` per rank in all, over a group within ``span``
    consecutive ranks. On shared cores a collective is CPU work too (gloo's copies, every hop waiting for its rank's
    turn on a core): between the link measured alone and the one measured with ``contended_share`` ranks per core,
    linear in the ranks per core (beyond it too); a cluster without that measurement scales the link's time by it."""
    latency, busbw = cluster.link(kind, span)
    alone = count * latency + ring_bytes / busbw
    share = _core_share(cluster)
    if share <= 1:
        return alone
    if not cluster.contended or kind not in cluster.contended:
        return share * alone
    contended_latency, contended_busbw = cluster.contended[kind]
    contended = count * contended_latency + ring_bytes / contended_busbw
    return alone + (share - 1) / (cluster.contended_share - 1) * (contended - alone)


def _gradient_traffic(model: ModelSpec, cluster: ClusterSpec, plan: Plan, backward_s: float):
    """Data-parallel traffic per GPU: {name: (bytes, seconds)} and the seconds that do not overlap backward."""
    d, m = plan.dp, plan.gradient_accumulation
    if d == 1:
        return {}, 0.0
    grad_bytes = state_bytes(model, plan.precision)[1]
    n = max(stage_params(model, plan.tp, plan.pp, stage) for stage in (0, plan.pp - 1))
    grads, span = n * grad_bytes, plan.tp * d
    # Stages 0 and 1 all-reduce once per step (no_sync in between); 2 and 3 reduce-scatter every backward.
    name, kind, factor, syncs = ("dp all-reduce", "all_reduce", 2 * (d - 1) / d, 1) if plan.zero <= 1 else \
        ("zero reduce-scatter", "reduce_scatter", (d - 1) / d, m)
    sync_s = _collective(cluster, span, factor * grads, math.ceil(grads / DDP_BUCKET_BYTES), kind)
    last_bucket_s = _collective(cluster, span, factor * min(grads, DDP_BUCKET_BYTES), 1, kind)
    traffic = {name: (syncs * factor * grads, syncs * sync_s)}
    exposed = syncs * max(last_bucket_s, sync_s - backward_s / m)
    if plan.zero >= 1:  # the updated shards gathered after the step; stage 3 gathers every forward and backward
        weights = n * (4 if plan.precision == "fp32" else 2)  # gathered in the compute dtype
        gathered = weights * (d - 1) / d * (2 * m if plan.zero == 3 else 1)
        # stage 3 gathers one unit (a block, or the embeddings and head) at a time; 1 and 2 one bucket at a time
        gathers = 2 * m * (model.layers / plan.pp + 1) if plan.zero == 3 else math.ceil(weights / DDP_BUCKET_BYTES)
        traffic["zero all-gather"] = (gathered, _collective(cluster, span, gathered, gathers, "all_gather"))
        exposed += traffic["zero all-gather"][1]
    return traffic, exposed


def _model_parallel_traffic(model: ModelSpec, cluster: ClusterSpec, plan: Plan) -> dict:
    """Tensor- and pipeline-parallel traffic per GPU: {name: (bytes, seconds)}, none of it overlapped."""
    t, m, traffic = plan.tp, plan.gradient_accumulation, {}
    act_bytes = 4 if plan.precision == "fp32" else 2
    layers = model.layers / plan.pp
    if t > 1:
        per_layer = tensor_parallel_comm_per_layer(model.gpt_config(), t, plan.micro_batch, model.seq, act_bytes,
                                                   plan.sequence_parallel)
        calls = sum(v for k, v in per_layer.items() if k.endswith(("forward", "backward")))
        # Recomputation repeats the forward's collectives (Megatron's selective recomputes no communication).
        again = plan.recompute == "full" or (plan.recompute == "selective" and model.kind == "labs")
        repeat = 1.5 if again else 1.0
        ends = 2 if plan.pp == 1 else 1  # the embedding's sum forward, the lm_head input's backward: 1 per end
        sent = m * (layers * repeat * per_layer["bytes sent per rank"]
                    + ends * 2 * (t - 1) / t * per_layer["tensor bytes"])
        count = m * (layers * repeat * calls + ends)
        if plan.sequence_parallel:  # as many all-gathers as reduce-scatters, forward and backward
            seconds = sum(_collective(cluster, t, sent / 2, count / 2, kind)
                          for kind in ("all_gather", "reduce_scatter"))
            traffic["sp all-gather + reduce-scatter"] = (sent, seconds)
        else:
            traffic["tp all-reduce"] = (sent, _collective(cluster, t, sent, count))
        # The vocab-parallel loss's max and sums (2 all-reduces of b·s numbers a micro-batch); per step the grad
        # norm's and, with sequence parallelism, the replicated weights' grads (LayerNorms, row biases, positions).
        replicated = (6 * layers + 2) * model.hidden + model.seq * model.hidden if plan.sequence_parallel else 0
        small = m * 3 * plan.micro_batch * model.seq * 4 + 4 + replicated * 4
        ring = 2 * (t - 1) / t * small
        calls = 2 * m + 1 + plan.sequence_parallel
        traffic["tp loss and norm all-reduces"] = (ring, _collective(cluster, t, ring, calls))
    if plan.pp > 1:
        v = plan.chunks if plan.schedule == "interleaved-1f1b" else 1
        shard = t if plan.sequence_parallel else 1
        sent = 2 * m * v * plan.micro_batch * model.seq / shard * model.hidden * act_bytes  # activation + its grad
        span = t * plan.dp * plan.pp
        traffic["pp send/recv"] = (sent, _collective(cluster, span, sent, 2 * m * v, "send_recv"))
        tied = parameter_parts(model)["tok_emb"][0] / t * state_bytes(model, plan.precision)[1]  # first + last: 2 ranks
        traffic["embedding all-reduce"] = (tied, _collective(cluster, span, tied, 1))
        traffic["pp grad-norm all-reduce"] = (4.0, _collective(cluster, span, 4.0, 1))
    return traffic


def estimate(model: ModelSpec, cluster: ClusterSpec, plan: Plan, tokens: float | None = None) -> Estimate:
    """Memory, FLOPs, communication, time and fit of ``plan`` for ``model`` on ``cluster`` (``tokens``: the token
    budget for train_days). Raises ValueError (check_plan) for a plan that cannot run."""
    check_plan(model, cluster, plan)
    m, gpus = plan.gradient_accumulation, cluster.gpus
    step_tokens = plan.global_batch * model.seq
    model_flops = step_tokens * model.flops_per_token()
    hardware_flops = model_flops + step_tokens * recompute_flops_per_token(model, plan.recompute)
    share = _core_share(cluster)
    micro_batches = share * (hardware_flops / gpus / (cluster.peak_flops * cluster.compute_efficiency)
                             + model.layers / plan.pp * m * cluster.layer_overhead(plan.recompute))
    updated = max(stage_params(model, plan.tp, plan.pp, s) for s in (0, plan.pp - 1)) / (plan.dp if plan.zero else 1)
    optimizer = 0.0 if plan.offload else share * updated * cluster.optimizer_s_per_param  # host Adam: not timed
    compute = micro_batches + optimizer
    v = plan.chunks if plan.schedule == "interleaved-1f1b" else 1
    bubble = (plan.pp - 1) / (v * m) * micro_batches
    backward = micro_batches * 2 / 3  # backward runs two of the three matmuls of every weight
    traffic, exposed = _gradient_traffic(model, cluster, plan, backward)
    model_parallel = _model_parallel_traffic(model, cluster, plan)
    traffic.update(model_parallel)
    exposed += sum(seconds for _, seconds in model_parallel.values())
    step = compute + bubble + exposed
    memory, worst = memory_per_gpu(model, plan)
    fits = memory["total"] <= cluster.memory_bytes
    return Estimate(
        memory_bytes=memory, worst_stage=worst, flops_per_step=model_flops, hardware_flops_per_step=hardware_flops,
        comm_bytes={k: b for k, (b, _) in traffic.items()}, comm_time_s={k: s for k, (_, s) in traffic.items()},
        compute_time_s=compute, bubble_time_s=bubble, step_time_s=step, tokens_per_s=step_tokens / step,
        mfu=model_flops / step / (gpus * cluster.peak_flops),
        hfu=hardware_flops / step / (gpus * cluster.peak_flops),
        train_days=tokens / (step_tokens / step) / SECONDS_PER_DAY if tokens else None,
        fits=fits, reason="" if fits else _why_not(model, cluster, plan, memory, worst))


def _why_not(model: ModelSpec, cluster: ClusterSpec, plan: Plan, memory: dict, stage: int) -> str:
    """"needs X GB per GPU > Y GB (...): try ..." with the single changes that would make the plan fit."""
    parts = ", ".join(f"{k} {memory[k] / GB:.1f}" for k in ("params", "grads", "optimizer", "activations",
                                                            "buffers"))
    fixes = [flag for flag, changed in _single_changes(model, plan)
             if _valid(model, cluster, changed) and memory_per_gpu(model, changed)[0]["total"] <= cluster.memory_bytes]
    advice = (f"try {' or '.join(fixes[:3])}" if fixes else
              "no single change of ZeRO, recomputation, micro-batch, tp or pp makes it fit: use more GPUs")
    return (f"needs {memory['total'] / GB:.1f} GB per GPU > {cluster.memory_bytes / GB:.1f} GB "
            f"(stage {stage}: {parts} GB): {advice}")


def _single_changes(model: ModelSpec, plan: Plan) -> list[tuple[str, Plan]]:
    """One-flag changes that lower memory, roughly cheapest in speed first."""
    changes = []
    if plan.recompute == "none":
        changes.append(("--recompute selective", replace(plan, recompute="selective")))
    if plan.tp > 1 and not plan.sequence_parallel:
        changes.append(("--sequence-parallel", replace(plan, sequence_parallel=True)))
    changes += [(f"--zero {z}", replace(plan, zero=z)) for z in range(plan.zero + 1, 4)]
    if plan.micro_batch > 1:
        changes.append((f"--micro-batch {plan.micro_batch // 2}", replace(plan, micro_batch=plan.micro_batch // 2)))
    if plan.dp % 2 == 0:
        changes.append((f"--tp {plan.tp * 2} --dp {plan.dp // 2}", replace(plan, tp=plan.tp * 2, dp=plan.dp // 2)))
        changes.append((f"--pp {plan.pp * 2} --dp {plan.dp // 2}", replace(plan, pp=plan.pp * 2, dp=plan.dp // 2)))
    if plan.recompute != "full":
        changes.append(("--recompute full", replace(plan, recompute="full")))
    if not plan.offload and plan.zero >= 1:
        changes.append(("--offload", replace(plan, offload=True)))
    return changes


def _valid(model: ModelSpec, cluster: ClusterSpec, plan: Plan) -> bool:
    try:
        check_plan(model, cluster, plan)
    except ValueError:
        return False
    return True

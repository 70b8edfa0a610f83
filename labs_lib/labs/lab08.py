"""Lab 08, mixture of experts: the exercises' routings and their checks, and the single-process measurements.

    gates, experts = reference_top_k_gating(logits, k)       # what exercise 1's top_k_gating must return
    check_top_k_gating(top_k_gating)                          # exercise 1: the learner's function, on fixed logits
    probs, first = balancing_exercise(); check_balancing_loss(answer)          # exercise 2
    choices, factor = drop_exercise(); check_dropped_tokens(answer)            # exercise 3
    dropped_fraction_curve(moe, x, factors)                  # tokens dropped against the capacity factor
    runs = train_dense_and_moe(out)                          # dense vs MoE GPT through Slurm, MoE with --ep 4
    load_matrix(runs["moe"]), parameter_rows(), trained_router_inputs(out / "moe")   # what the figures read
    all_to_all_share(out / "moe")                            # the profiler's all-to-all share of the step
    deepspeed_moe(out)                                       # DeepSpeed's MoE with the course's settings

The expected values are computed here from labs_lib.models.moe, out of the notebook's sight.
"""

from __future__ import annotations

from pathlib import Path

import torch

from labs_lib.core.config import GPTConfig, get_profile, override
from labs_lib.labs.checks import check
from labs_lib.models.moe import MoEMLP, assign, expert_capacity, load_balancing_loss

__all__ = ["reference_top_k_gating", "check_top_k_gating", "balancing_exercise", "check_balancing_loss",
           "drop_exercise", "check_dropped_tokens", "balanced_dropped_fraction", "dropped_fraction_curve", "MOE",
           "train_dense_and_moe", "load_matrix", "parameter_rows", "trained_router_inputs", "all_to_all_share",
           "deepspeed_moe"]

EXERCISE_EXPERTS = 4


def reference_top_k_gating(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts, each token's k largest; gates renormalised to sum to 1 when k > 1 (GShard), the raw
    probability when k = 1 (Switch). Returns (gates (tokens, k), experts (tokens, k)), largest first."""
    top, experts = logits.softmax(dim=-1).topk(k, dim=-1)
    return (top / top.sum(dim=-1, keepdim=True) if k > 1 else top), experts


def check_top_k_gating(fn) -> bool:
    """Exercise 1: ``fn(logits, k) -> (gates, experts)`` on fixed logits, for k = 1 and k = 2."""
    if fn is None or fn is Ellipsis:
        return check("top-k gating", None, None, hint="write top_k_gating(logits, k) and pass it here.")
    logits = torch.randn(16, EXERCISE_EXPERTS, generator=torch.Generator().manual_seed(8))
    if fn(logits.clone(), 1) in (None, Ellipsis):
        return check("top-k gating", None, None, hint="top_k_gating still returns ...: write its body.")
    for k in (1, 2):
        gates, experts = fn(logits.clone(), k)
        want_gates, want_experts = reference_top_k_gating(logits, k)
        if tuple(gates.shape) != (16, k) or not torch.equal(experts, want_experts):
            raise AssertionError(f"❌ top-k gating, k={k}: expected experts of shape (16, {k}), largest probability "
                                 "first (torch.topk on the softmax)")
        if not torch.allclose(gates, want_gates, atol=1e-6):
            hint = "renormalise the k gates to sum to 1" if k > 1 else "with k = 1 the gate is the probability itself"
            raise AssertionError(f"❌ top-k gating, k={k}: the gates are off: {hint}")
    print("✅ top-k gating: correct for k = 1 and k = 2")
    return True


def balancing_exercise() -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed routing of 8 tokens over 4 experts: (router probabilities (8, 4), each token's first choice (8,))."""
    g = torch.Generator().manual_seed(80)
    probs = torch.randn(8, EXERCISE_EXPERTS, generator=g).mul(1.5).softmax(dim=-1)
    return probs, probs.argmax(dim=-1)


def check_balancing_loss(answer) -> bool:
    """Exercise 2: Switch's load-balancing loss E · Σ f_e · P_e of :func:`balancing_exercise`'s routing."""
    probs, first = balancing_exercise()
    return check("load-balancing loss", answer, load_balancing_loss(probs, first).item(), rtol=1e-4,
                 hint="f_e: the fraction of tokens whose first choice is e; P_e: the mean probability of e.")


def balanced_dropped_fraction(capacity_factor: float) -> float:
    """The formula beside the measurement: a perfectly balanced router sends each expert k·T/E tokens, so a
    capacity of factor·k·T/E drops the share 1 − factor of them (nothing from factor 1 on)."""
    return max(0.0, 1.0 - capacity_factor)


def drop_exercise() -> tuple[list[int], float]:
    """12 tokens' top-1 experts (of 4) and a capacity factor: how many tokens does the layer drop?"""
    return [0, 1, 0, 0, 2, 0, 1, 0, 3, 0, 1, 1], 1.0


def check_dropped_tokens(answer) -> bool:
    """Exercise 3: tokens over capacity in :func:`drop_exercise` (C = ceil(k · tokens / experts · factor))."""
    choices, factor = drop_exercise()
    capacity = expert_capacity(len(choices), EXERCISE_EXPERTS, 1, factor)
    routing = assign(torch.tensor(choices).unsqueeze(1), torch.ones(len(choices), 1), EXERCISE_EXPERTS, capacity)
    return check("tokens dropped", answer, routing.dropped,
                 hint="count each expert's tokens; an expert keeps at most C of them.")


@torch.no_grad()
def dropped_fraction_curve(moe: MoEMLP, x: torch.Tensor, factors: list[float]) -> list[dict]:
    """The fraction of assignments ``moe`` drops on the tokens ``x`` at each capacity factor (routing unchanged)."""
    saved, training, rows = moe.capacity_factor, moe.training, []
    try:
        moe.eval()  # no router noise: the same routing at every factor
        for factor in factors:
            moe.capacity_factor = factor
            moe(x)
            rows.append({"capacity_factor": factor, "dropped_fraction": moe.last_routing.dropped_fraction})
    finally:
        moe.capacity_factor = saved
        moe.train(training)
    return rows


# ------------------------------------------------------------------------------------ the GPT with experts, trained
MOE = dict(n_experts=8, moe_top_k=1, moe_capacity_factor=1.25)  # top-1: the dense GPT's active FLOPs per token
RUN = dict(nodes=2, nproc_per_node=2, eval_interval=10, warmup_steps=2)  # the local cluster: 4 ranks, ep 4


def train_dense_and_moe(out: str | Path, steps: int = 40, profile: str | None = None) -> dict[str, list[dict]]:
    """The profile's GPT, dense and with 8 experts in every 2nd block (expert parallel over 4 ranks, the last 3
    steps profiled), the same steps and data through the one launcher (Slurm when it is up)."""
    from labs_lib.jobs.launch import train_gpt

    out = Path(out)
    common = dict(RUN, max_steps=steps, checkpoint_interval=steps, profile=profile)
    return {"dense": train_gpt(out / "dense", **common),
            "moe": train_gpt(out / "moe", ep=4, trace_steps=3, **MOE, **common)}


def load_matrix(records: list[dict], layer: int = 0) -> list[list[float]]:
    """Per step, the share of the MoE layer's tokens each expert got (rows: steps; a balanced router: 1/E each)."""
    return [[n / max(sum(r["moe_load"][layer]), 1) for n in r["moe_load"][layer]] for r in records]


def parameter_rows(profile: str | None = None) -> list[dict]:
    """Total parameters, those a token uses, and training FLOPs per token: dense vs the MoE GPT (meta device)."""
    import torch

    from labs_lib.models.gpt import GPT

    base = get_profile(profile).model
    rows = []
    for name, cfg in (("dense", base), ("moe (8 experts, top-1)", override(base, **MOE))):
        with torch.device("meta"):
            model = GPT(cfg)
        rows.append({"model": name, "params": model.num_params(), "active params": model.active_params(False),
                     "FLOPs per token": model.flops_per_token()})
    return rows


def trained_router_inputs(run: str | Path, tokens: int = 2048):
    """(the trained MoE layer, the hidden states that reach it) for validation tokens: the single-device GPT loaded
    from the run's checkpoint, its first MoE layer's input caught by a hook."""
    import torch

    from labs_lib.core import checkpoint
    from labs_lib.core.runs import read_json
    from labs_lib.data.text import eval_batches
    from labs_lib.models.gpt import GPT

    run = Path(run)
    cfg = GPTConfig(**read_json(run / "config.json")["model"])
    model = GPT(cfg)
    model.load_state_dict(checkpoint.load_model_state(checkpoint.latest_checkpoint(run / "checkpoints")))
    model.eval()
    moe = model.moe_layers()[0]
    caught = []
    handle = moe.register_forward_pre_hook(lambda module, args: caught.append(args[0].detach()))
    val = Path(read_json(run / "config.json")["data_dir"]) / "val.bin"
    batches = eval_batches(val, max(tokens // cfg.block_size, 1), cfg.block_size, 1, 0, 1)
    with torch.no_grad():
        model(batches[0][0])
    handle.remove()
    return moe, caught[0].reshape(-1, cfg.n_embd)


def all_to_all_share(run: str | Path, rank: int = 0) -> float:
    """The share of a profiled step rank ``rank`` spent in all-to-all (the run's --trace-steps trace)."""
    from labs_lib.measure.trace import collective_share, trace_files

    return collective_share(trace_files(Path(run) / "trace")[rank], ("alltoall", "all_to_all"))


def deepspeed_moe(out: str | Path, steps: int = 40, residual: bool = False, profile: str | None = None):
    """DeepSpeed's MoE layer with the course's settings: 8 experts, ep_size 4 (2 local experts per rank), top-1,
    RSample, ZeRO-2 with the expert parameters in optimizer groups of their own; returns its records."""
    from labs_lib.core.runs import read_metrics
    from labs_lib.jobs.launch import launch, settings_args

    run = Path(out) / ("deepspeed_moe_residual" if residual else "deepspeed_moe")
    settings = dict(MOE, moe_noise="rsample", ep=4, moe_residual=residual, max_steps=steps, warmup_steps=2,
                    eval_interval=10, checkpoint_interval=0, ds_config="zero2.json")
    launch("labs_lib.train.deepspeed.gpt", settings_args(profile, **settings), run, nodes=2, nproc_per_node=2,
           profile=profile, desc="deepspeed moe")
    return read_metrics(run)

"""Lab 04 (notebooks/04_tensor_parallelism.ipynb): reading back where a tensor-parallel job ran and what it held.

    job_start_line(run)        the first line of the job's log: where Slurm (or torchrun) placed it
    parallel_layout(run)       the data / tensor / pipeline layout the run trained with (config.json's "parallel")
    params_held(run, shard)    parameters a rank updated, counted from its optimizer state in the newest checkpoint
    check_row_parallel(fn); check_operator(answer); check_mlp_params(fn, n_embd)   the exercises' checks
"""

from __future__ import annotations

from pathlib import Path

import torch

from labs_lib.core import checkpoint
from labs_lib.core.runs import read_json
from labs_lib.jobs.launch import LOG
from labs_lib.jobs.process import read_log
from labs_lib.labs.checks import check, simulate_ranks


def job_start_line(run: str | Path) -> str:
    """The first line of ``run``'s job log (the job script's own: nodes, ranks, module)."""
    lines = read_log(Path(run) / LOG).splitlines()
    if not lines:
        raise ValueError(f"{Path(run) / LOG} is empty: has the job run?")
    return lines[0]


def parallel_layout(run: str | Path) -> dict:
    """The parallel layout the run resolved and trained with, as its config.json records it (dp, tp, pp, ...)."""
    return read_json(Path(run) / "config.json")["parallel"]


def params_held(run: str | Path, shard: str | None = None) -> int:
    """Parameters one rank updated: Adam's first moment has one number per parameter it updates. ``shard``: a
    tensor/pipeline-parallel rank's optimizer shard in the checkpoint (``"pp0_tp1"``: pipeline stage 0, tensor
    rank 1); None for a replicated run's one optimizer state."""
    latest = checkpoint.latest_checkpoint(Path(run) / "checkpoints")
    if latest is None:
        raise FileNotFoundError(f"no complete checkpoint in {Path(run) / 'checkpoints'}: has the run finished?")
    state = checkpoint.load_optimizer_shard(latest, shard) if shard else checkpoint.load_optimizer_state(latest)
    return sum(s["exp_avg"].numel() for s in state["state"].values())


# ------------------------------------------------------------------------------------------------ exercise checks

def check_row_parallel(fn) -> bool:
    """Exercise 1: ``fn(x_shard, weight_shard, bias, all_reduce)`` on 2 simulated ranks equals F.linear."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    x, weight, bias = torch.randn(4, 8), torch.randn(5, 8), torch.randn(5)
    full = F.linear(x, weight, bias)
    outs = simulate_ranks(lambda rank, all_reduce: fn(x.chunk(2, dim=1)[rank], weight.chunk(2, dim=1)[rank], bias,
                                                      all_reduce), 2)
    answer = None if any(o is None or o is Ellipsis for o in outs) else all(
        torch.allclose(o, full, atol=1e-5) for o in outs)
    return check("row-parallel forward on 2 ranks", answer, True,
                 hint="each rank holds a slice of the input features: its product is a partial sum",
                 more="F.linear(x_shard, weight_shard), all-reduce the partial product, then add the bias once")


def check_operator(answer) -> bool:
    return check("operator at the attention block's input", answer.lower() if isinstance(answer, str) else answer,
                 "f", hint="the input X is whole on every rank and feeds a column-parallel layer",
                 more="forward: nothing to do (identity); backward: each rank holds a partial gradient of X that "
                      "must be summed. Which operator is identity forward, all-reduce backward?")


def _mlp_params_per_rank(h: int, t: int) -> int:
    # fc's weight and bias split by output, proj's weight by input, its bias whole
    return (4 * h * h + 4 * h) // t + (4 * h * h) // t + h


def check_mlp_params(fn, n_embd: int) -> bool:
    """Exercise 3: ``fn(h, t)``, the MLP parameters one rank holds, for GPT-2 small's width and this lab's."""
    answer = fn(768, 4)
    ok = check("MLP parameters per rank (h=768, t=4)", answer, _mlp_params_per_rank(768, 4),
               hint="count each weight and bias of fc and proj, and which of them are split over the t ranks",
               more="fc: (4h·h + 4h)/t; proj: 4h·h/t for the weight, and its bias is not split")
    return ok and check(f"... and for this lab's model (h={n_embd}, t=2)", fn(n_embd, 2),
                        _mlp_params_per_rank(n_embd, 2))

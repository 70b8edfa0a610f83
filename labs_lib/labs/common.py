"""What several lab notebooks share: the header cell and the comparison of two runs' losses.

    print_setup(profile)               every lab's first cell: the profile, the model's shape, the training settings
    loss_gaps(records, reference)      step -> |loss - reference loss| (labs 01, 03, 04: "same batch, same losses")
    largest_loss_gap(records, reference)   the largest of them

The steady-state speed of a run is :func:`labs_lib.measure.throughput.steady_median` (one warm-up rule for all).
"""

from __future__ import annotations

from labs_lib.core.config import Profile
from labs_lib.estimates.memory import param_count


def print_setup(profile: Profile) -> None:
    """Print the run profile, the model's shape and parameter count, and the training settings the labs' jobs use."""
    model, train = profile.model, profile.train
    print(f"profile {profile.name!r} (LABS_PROFILE: ci, cpu or gpu)")
    print(f"model: {model.n_layer} layers, n_embd {model.n_embd}, {model.n_head} heads, context {model.block_size}, "
          f"vocabulary {model.vocab_size}: {param_count(model):,} parameters")
    print(f"training: micro-batch {train.batch_size} per rank x {train.grad_accum} accumulation step(s), "
          f"{train.max_steps} steps, {train.dtype}")


def loss_gaps(records: list[dict], reference: list[dict]) -> dict[int, float]:
    """|loss - reference loss| at every step both runs logged, by step (metrics.jsonl records)."""
    reference_loss = {r["step"]: r["loss"] for r in reference}
    gaps = {r["step"]: abs(r["loss"] - reference_loss[r["step"]]) for r in records if r["step"] in reference_loss}
    if not gaps:
        raise ValueError("the two runs have no logged step in common: did both of them train?")
    return gaps


def largest_loss_gap(records: list[dict], reference: list[dict]) -> float:
    """The largest |loss difference| between two runs over the steps both logged."""
    return max(loss_gaps(records, reference).values())

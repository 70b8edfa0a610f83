"""The matplotlib figures the notebooks show."""

from __future__ import annotations

import matplotlib.pyplot as plt


def plot_loss(runs: dict[str, list[dict]], title: str = "training loss", ax=None):
    """Loss per step for one or more runs (``{label: metrics records}``), validation loss as markers."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    for label, records in runs.items():
        line, = ax.plot([r["step"] for r in records], [r["loss"] for r in records], label=f"{label} train")
        evals = [r for r in records if "val_loss" in r]
        if evals:
            ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o--", color=line.get_color(),
                    label=f"{label} validation")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def plot_memory_table(rows: list[dict], ax=None):
    """Stacked bars of weights / gradients / Adam state / activations per model (log scale)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4))
    names = [r["model"] for r in rows]
    bottom = [0.0] * len(rows)
    for part in ("weights GB", "grads GB", "Adam GB", "activations GB"):
        values = [r[part] for r in rows]
        ax.bar(names, values, bottom=bottom, label=part.replace(" GB", ""))
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.axhline(80, color="k", ls="--", lw=1, label="one 80 GB GPU")
    ax.set(yscale="log", ylabel="GB (mixed-precision Adam, micro-batch 1)", title="memory to train")
    ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize=8)
    return ax


def plot_timeline(trace_paths: dict[int, str], step: int = 0, ax=None):
    """Gantt chart of one profiled step per rank: compute and communication intervals (from Chrome traces)."""
    from labs_lib.profiling import timeline

    if ax is None:
        _, ax = plt.subplots(figsize=(10, 1 + 0.8 * len(trace_paths)))
    for row, path in enumerate(path for _, path in sorted(trace_paths.items())):
        tl = timeline(path)
        _, start, end = tl["steps"][step]
        for kind, color, offset in (("compute", "tab:blue", 0.0), ("comm", "tab:orange", 0.4)):
            spans = [(max(s, start), min(e, end)) for s, e in tl[kind] if e > start and s < end]
            ax.broken_barh([((s - start) / 1e3, (e - s) / 1e3) for s, e in spans], (row + offset, 0.35),
                           color=color, label=kind if row == 0 else None)
    ax.set_yticks([r + 0.4 for r in range(len(trace_paths))], [f"rank {r}" for r in sorted(trace_paths)])
    ax.set(xlabel="time within the step (ms)", title="compute vs communication per rank")
    ax.legend(loc="upper right")
    return ax

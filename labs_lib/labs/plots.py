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
    from labs_lib.measure.trace import timeline

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


# ---------------------------------------------------------------------------------------------------- pipelines

_PIPELINE_COLORS = {"forward": ("tab:blue", "lightskyblue"), "backward": ("tab:green", "yellowgreen"),
                    "recv": "#f4a6a6", "send": "tab:purple", "idle": "0.8"}


def plot_pipeline_timeline(results: list[dict], title: str | None = None, ax=None):
    """Gantt chart of one pipeline step, one row per rank (``labs_lib.train.pipeline_job`` results).

    Forward and backward boxes carry their micro-batch number (a second model chunk of interleaved 1F1B in a lighter
    shade, its number primed); thin bars show waiting for a neighbour's message (recv), posting sends (and, at the
    end of the step, finishing them and summing the tied embedding's gradient), and the idle end of the step."""
    from matplotlib.patches import Patch

    if ax is None:
        _, ax = plt.subplots(figsize=(11, 0.9 + 0.7 * len(results)))
    span = max(e["end"] for r in results for e in r["timeline"]) * 1e3
    chunks = max(r.get("chunks", 1) for r in results)
    for r in results:
        row = -r["rank"]  # rank 0 on top
        for e in r["timeline"]:
            start, width = e["start"] * 1e3, (e["end"] - e["start"]) * 1e3
            if e["kind"] in ("forward", "backward"):
                color = _PIPELINE_COLORS[e["kind"]][min(e["chunk"], 1)]
                ax.broken_barh([(start, width)], (row - 0.4, 0.8), facecolors=color, edgecolor="white", lw=0.5)
                if width > span / 90:
                    ax.text(start + width / 2, row, f"{e['micro_batch']}" + "'" * e["chunk"], ha="center",
                            va="center", color="white", fontsize=7, fontweight="bold")
            else:
                ax.broken_barh([(start, max(width, span / 500))], (row - 0.12, 0.24),
                               facecolors=_PIPELINE_COLORS[e["kind"]])
    legend = [Patch(color=_PIPELINE_COLORS[k][c], label=k + (f" (chunk {c})" if chunks > 1 else ""))
              for k in ("forward", "backward") for c in range(min(chunks, 2))]
    legend += [Patch(color=_PIPELINE_COLORS["recv"], label="recv (waiting for a neighbour)"),
               Patch(color=_PIPELINE_COLORS["send"], label="send (end: + tied-embedding all-reduce)"),
               Patch(color=_PIPELINE_COLORS["idle"], label="idle (end of step)")]
    first = results[0]
    ax.set_yticks([-r["rank"] for r in results], [f"rank {r['rank']}" for r in results])
    ax.set(xlabel="time within the step (ms)", xlim=(0, span * 1.01),
           title=title or (f"{first['schedule']}: p={first['pp']}, m={first['micro_batches']}"
                           + (f", v={chunks}" if chunks > 1 else "") + f" — step {first['shown_step']}"))
    ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return ax


def plot_pipeline_timelines(*runs: list[dict]):
    """Several pipeline steps (e.g. GPipe and 1F1B) as Gantt charts stacked on one time axis."""
    fig, axes = plt.subplots(len(runs), 1, figsize=(12, sum(0.9 + 0.7 * len(r) for r in runs)), sharex=True,
                             squeeze=False)
    for ax, results in zip(axes[:, 0], runs):
        plot_pipeline_timeline(results, ax=ax)
    axes[0, 0].set_xlim(0, 1.01e3 * max(e["end"] for results in runs for r in results for e in r["timeline"]))
    fig.tight_layout()
    return axes[:, 0]


def plot_bubble(measured: dict[int, float], pp: int, chunks: int = 1, label: str | None = None, ax=None):
    """Measured bubble (idle share of the step) per number of micro-batches m, against (p−1)/(v·m+p−1)."""
    import numpy as np

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    ms = sorted(measured)
    grid = np.geomspace(min(ms), max(ms), 100)
    v = f"{chunks}·" if chunks > 1 else ""
    line, = ax.plot(grid, (pp - 1) / (chunks * grid + pp - 1), "-", lw=1,
                    label=f"formula (p−1)/({v}m+p−1), p={pp}")
    ax.plot(ms, [measured[m] for m in ms], "o", color=line.get_color(), label=label or "measured")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ms, [str(m) for m in ms])
    ax.set(xlabel="micro-batches per step m", ylim=(0, 1),
           ylabel="bubble = idle / total step time\n(GPipe convention)", title="pipeline bubble vs micro-batches")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def plot_pipeline_memory(in_flight: dict[str, dict[int, int]], activation_mb: dict[str, dict[int, float]], pp: int,
                         axes=None):
    """Peak in-flight micro-batches and peak activation memory of stage 0 per m, GPipe vs 1F1B, with the formulas.

    ``in_flight`` / ``activation_mb``: ``{schedule: {m: value}}`` for "gpipe" and "1f1b". Formulas: GPipe keeps all
    m micro-batches (the whole batch's activations, whatever m), 1F1B at most min(p, m) (a share min(p, m)/m of the
    batch's), anchored on GPipe's measured memory at the smallest m."""
    import numpy as np

    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(12, 4))
    formulas = {"gpipe": ("m", lambda m: m), "1f1b": ("min(p, m)", lambda m: np.minimum(pp, m))}
    batch = activation_mb["gpipe"][min(activation_mb["gpipe"])]  # GPipe keeps the whole batch's activations
    all_m = sorted({m for values in in_flight.values() for m in values})
    grid = np.array(all_m, dtype=float)
    for name, values in in_flight.items():
        text, f = formulas[name]
        ms = sorted(values)
        line, = axes[0].plot(grid, f(grid), "-", lw=1, label=f"{name} formula: {text}, p={pp}")
        axes[0].plot(ms, [values[m] for m in ms], "o", color=line.get_color(), label=f"{name} measured")
        mb = activation_mb[name]
        line, = axes[1].plot(grid, batch * f(grid) / grid, "-", lw=1, color=line.get_color(),
                             label=f"{name} formula: whole batch × {text}/m")
        axes[1].plot(sorted(mb), [mb[m] for m in sorted(mb)], "o", color=line.get_color(), label=f"{name} measured")
    for ax, ylabel in zip(axes, ("micro-batches kept for backward", "activation memory kept (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_m, [str(m) for m in all_m])
        ax.set(xlabel="micro-batches per step m (same global batch)", ylabel=ylabel, ylim=(0, None),
               title=f"stage 0, peak over the step: {ylabel.split(' kept')[0]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return axes


# ------------------------------------------------------------------------------------------------------ vision
def plot_digits(images, labels, predictions=None, confidences=None, cols: int = 10, title: str | None = None):
    """A grid of 8×8 grey digits with their labels; with ``predictions``, "pred (true)" and mistakes in red."""
    n = len(images)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.25 * cols, 1.6 * rows + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i].reshape(8, 8), cmap="gray_r", vmin=0, vmax=16)
        if predictions is None:
            ax.set_title(str(int(labels[i])), fontsize=10)
        else:
            right = int(predictions[i]) == int(labels[i])
            text = f"{int(predictions[i])}" + ("" if right else f" ({int(labels[i])})")
            if confidences is not None:
                text += f" {confidences[i]:.0%}"
            ax.set_title(text, fontsize=9, color="black" if right else "red")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return axes


def plot_patches(image, patch_size: int, ax=None):
    """One 8×8 digit cut into patch_size × patch_size patches, numbered in the order the ViT reads them."""
    if ax is None:
        _, ax = plt.subplots(figsize=(3.5, 3.5))
    ax.imshow(image.reshape(8, 8), cmap="gray_r", vmin=0, vmax=16)
    per_side = 8 // patch_size
    for k in range(1, per_side):
        ax.axhline(k * patch_size - 0.5, color="tab:red", lw=2)
        ax.axvline(k * patch_size - 0.5, color="tab:red", lw=2)
    for r in range(per_side):
        for c in range(per_side):
            ax.text(c * patch_size - 0.4, r * patch_size - 0.1, str(1 + r * per_side + c), color="tab:red",
                    fontsize=9, va="top")
    ax.set(xticks=[], yticks=[], title=f"{per_side * per_side} patches of {patch_size}×{patch_size} pixels")
    return ax


def plot_epochs(records: list[dict], axes=None):
    """Training and held-out loss, and held-out accuracy, per epoch (records of labs_lib.train.deepspeed.vit)."""
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(12, 4))
    epochs = [r["epoch"] for r in records]
    axes[0].plot(epochs, [r["loss"] for r in records], "o-", label="training (mean over the epoch)")
    axes[0].plot(epochs, [r["test_loss"] for r in records], "s--", label="held-out test set")
    axes[0].set(xlabel="epoch", ylabel="cross-entropy (nats)", yscale="log", title="loss")
    axes[1].plot(epochs, [100 * r["test_accuracy"] for r in records], "o-", color="tab:green")
    axes[1].axhline(90, color="k", ls="--", lw=1, label="90 %")
    axes[1].set(xlabel="epoch", ylabel="accuracy (%)", ylim=(0, 100), title="held-out accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    return axes


def plot_flops_parts(parts: dict[str, float], ax=None):
    """Horizontal bars: forward FLOPs by kind of work, with each one's share."""
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.5))
    total = sum(parts.values())
    names = list(parts)[::-1]
    ax.barh(names, [parts[n] / 1e6 for n in names], color="tab:blue")
    for i, n in enumerate(names):
        ax.text(parts[n] / 1e6, i, f" {parts[n] / total:.1%}", va="center", fontsize=9)
    ax.set(xlabel="forward MFLOPs per micro-batch (2 × profiler MACs)", title="where the FLOPs go")
    ax.set_xlim(0, 1.15 * max(parts.values()) / 1e6)
    ax.grid(alpha=0.3, axis="x")
    return ax


def plot_flops_vs_patch(patch_sizes, formula, profiler, attention_share, ax=None):
    """Forward FLOPs per image against patch size (formula line, profiler points) and attention's share."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    tokens = [(8 // p) ** 2 + 1 for p in patch_sizes]
    ax.plot(tokens, [f / 1e6 for f in formula], "-", label="formula")
    ax.plot(tokens, [f / 1e6 for f in profiler], "o", label="DeepSpeed profiler (2 × MACs)")
    for t, f, share in zip(tokens, formula, attention_share):
        ax.annotate(f"attention {share:.0%}", (t, f / 1e6), textcoords="offset points", xytext=(5, -12), fontsize=8)
    ax.set(xscale="log", yscale="log", xlabel="sequence length T (patches + class token)",
           ylabel="forward MFLOPs per image", title="cost per image vs patch size")
    ax.minorticks_off()
    ax.set_xticks(tokens, [f"{t}\n(patch {p})" for t, p in zip(tokens, patch_sizes)])
    ax.set_xlim(tokens[0] / 1.3, tokens[-1] * 1.6)
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def plot_bandwidth(links: dict[str, dict], ax=None):
    """Bus bandwidth against message size per link (labs_lib.planner.calibrate's ``links``), with the fitted
    latency + bytes / busbw line the planner uses, the way nccl-tests' tables are read."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    for name, link in links.items():
        sizes = [r["bytes"] for r in link["rows"]]
        line, = ax.plot(sizes, [r["busbw"] / 1e9 for r in link["rows"]], "o", label=f"{name} measured")
        n = link["group_size"]
        fitted = [s * 2 * (n - 1) / n / (link["latency_s"] + s * 2 * (n - 1) / n / link["busbw"]) / 1e9
                  for s in sizes]
        ax.plot(sizes, fitted, "--", color=line.get_color(),
                label=f"{name} fit: {link['latency_s'] * 1e6:.0f} us + bytes / {link['busbw'] / 1e9:.2f} GB/s")
    ax.set(xscale="log", xlabel="message bytes", ylabel="busbw (GB/s)", title="all-reduce bus bandwidth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def plot_predicted_vs_measured(rows: list[dict], predicted: str, measured: str, label: str = "plan",
                               title: str = "planner vs measurement", unit: str = "", ax=None):
    """One point per row at (measured, predicted) and the diagonal: points on it are plans the planner got right."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5))
    xs, ys = [r[measured] for r in rows], [r[predicted] for r in rows]
    ax.scatter(xs, ys)
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(str(r[label]), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    top = max(xs + ys) * 1.1
    ax.plot([0, top], [0, top], "k--", lw=1, label="predicted = measured")
    ax.set(xlim=(0, top), ylim=(0, top), xlabel=f"measured {unit}".strip(), ylabel=f"predicted {unit}".strip(),
           title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def plot_expert_load(shares: list[list[float]], ax=None):
    """A heat map of each expert's share of the tokens (columns) over the training steps (rows), from
    labs_lib.labs.lab08.load_matrix; 1/E everywhere is a perfectly balanced router."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    n_experts = len(shares[0])
    image = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0, vmax=min(1.0, 3 / n_experts),
                      extent=(-0.5, n_experts - 0.5, len(shares) + 0.5, 0.5))
    ax.figure.colorbar(image, ax=ax, label=f"share of the tokens (balanced: 1/{n_experts})")
    ax.set(xlabel="expert", ylabel="training step", title="expert load during training")
    ax.set_xticks(range(n_experts))
    return ax


def plot_dropped(rows: list[dict], formula=None, ax=None):
    """Fraction of assignments dropped against the capacity factor (labs_lib.labs.lab08.dropped_fraction_curve),
    with ``formula`` rows of the same form beside it (e.g. a perfectly balanced router's)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["capacity_factor"] for r in rows], [r["dropped_fraction"] for r in rows], "o-", label="measured")
    if formula:
        ax.plot([r["capacity_factor"] for r in formula], [r["dropped_fraction"] for r in formula], "k--",
                label="balanced router")
    ax.set(xlabel="capacity factor", ylabel="fraction of tokens dropped", title="tokens over capacity", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


# ---------------------------------------------------------------------------------------------------- inference

def plot_serving_memory(rows: list[dict], gpu_gb: float = 80, ax=None):
    """Weights (flat) and KV cache (growing) per GPU against the batch, one colour per model and TP degree."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    for key in dict.fromkeys((r["model"], r["tp"]) for r in rows):
        sel = [r for r in rows if (r["model"], r["tp"]) == key]
        label = f"{key[0]}, tp {key[1]}"
        line, = ax.plot([r["batch"] for r in sel], [r["kv_cache_gb"] for r in sel], "o-", label=f"{label}: KV cache")
        ax.plot([r["batch"] for r in sel], [r["weights_gb"] for r in sel], "--", color=line.get_color(),
                label=f"{label}: weights")
    ax.axhline(gpu_gb, color="k", lw=1, ls=":", label=f"one {gpu_gb:g} GB GPU")
    ax.set(xscale="log", yscale="log", xlabel="sequences in flight (each at the full context)",
           ylabel="GB per GPU (16-bit)", title="serving memory: the KV cache grows, the weights do not")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return ax


def plot_per_token_times(rows: list[dict], flop_ratio=None, ax=None):
    """Milliseconds per new token with and without the KV cache by context length; the measured ratio beside the
    ratio of FLOPs (``flop_ratio(context)``), the formula's promise."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    contexts = [r["context"] for r in rows]
    ax.plot(contexts, [1e3 * r["uncached_s"] for r in rows], "o-", label="no cache: the whole context again")
    ax.plot(contexts, [1e3 * r["cached_s"] for r in rows], "o-", label="KV cache: one token")
    ax.set(xlabel="context length (tokens)", ylabel="ms per new token", title="one decoding step")
    ax.grid(alpha=0.3)
    ratio = ax.twinx()
    ratio.plot(contexts, [r["uncached_s"] / r["cached_s"] for r in rows], "k.:", label="measured ratio")
    if flop_ratio is not None:
        ratio.plot(contexts, [flop_ratio(c) for c in contexts], "k--", lw=1, label="FLOP ratio (formula)")
    ratio.set(ylabel="no cache / cache")
    lines = ax.get_legend_handles_labels()
    more = ratio.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper left")
    return ax


def plot_reductions(rows: list[dict], axes=None):
    """Each reduction's size against its validation perplexity, and its 128-token latency."""
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 4))
    size_ax, time_ax = axes
    for r in rows:
        size_ax.scatter(r["MB"], r["perplexity"])
        size_ax.annotate(r["variant"], (r["MB"], r["perplexity"]), fontsize=8, xytext=(3, 3),
                         textcoords="offset points")
    size_ax.set(xscale="log", xlabel="size (MB, log)", ylabel="validation perplexity", title="smaller vs worse")
    size_ax.grid(alpha=0.3)
    time_ax.barh([r["variant"] for r in rows], [r["latency ms"] for r in rows])
    time_ax.set(xlabel="ms for a 128-token generation (median of 10)", title="latency at batch 1")
    time_ax.invert_yaxis()
    return axes


# ---------------------------------------------------------------------------------------------------- serving

def plot_serving_batching(rows: list[dict], axes=None):
    """Throughput and p95 latency against concurrency (``labs_lib.deploy.load.compare_batching`` rows): one colour
    per batching setting, one line style per tool."""
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 4))
    rate_ax, p95_ax = axes
    colors = {"dynamic": "tab:blue", "off": "tab:orange"}
    styles = dict(zip(dict.fromkeys(r["tool"] for r in rows), ("o-", "s--", "^:")))
    for key in dict.fromkeys((r["batching"], r["tool"]) for r in rows):
        sel = sorted((r for r in rows if (r["batching"], r["tool"]) == key), key=lambda r: r["concurrency"])
        label = f"batching {key[0]}, {key[1]}"
        for ax, column in ((rate_ax, "throughput"), (p95_ax, "p95_ms")):
            ax.plot([r["concurrency"] for r in sel], [r[column] for r in sel], styles[key[1]],
                    color=colors.get(key[0]), label=label)
    rate_ax.set(xlabel="concurrent clients", ylabel="requests / s", title="throughput")
    p95_ax.set(xlabel="concurrent clients", ylabel="ms", title="p95 latency")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return axes

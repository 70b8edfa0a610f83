"""The DeepSpeed flops profiler's report, read back: its headline numbers, every module's, the FLOPs by kind of work.

    summary = flops_profile_summary("build/runs/lab06_vit/flops_profile.txt")
    summary["fwd_macs"], summary["modules"]["blocks.0.mlp.fc"]["macs"]
    flops_by_part(summary)          # {"patch embedding": ..., "qkv": ..., "MLP fc": ..., "head": ...} of a ViT

The report is the text DeepSpeed writes to ``flops_profiler.output_file`` (labs_lib.train.deepspeed.vit
``--flops-profile``); numbers carry SI prefixes (``16.08 MMACs``, ``4.09 ms``) and are read back in base units.
"""

from __future__ import annotations

import re
from pathlib import Path

_PREFIX = {"": 1, "n": 1e-9, "u": 1e-6, "m": 1e-3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
_STATS = re.compile(r"([\d.]+) ?([KMGTP]?) = [\d.]+% Params, ([\d.]+) ?([KMGTP]?)MACs = [\d.]+% MACs, "
                    r"([\d.]+) ?([numKMGTP]?)s = [\d.]+% latency")


def _number(text: str) -> float:
    """'3.5 M' / '16.08 MMACs' / '4.09 ms' / '512' → a float in base units."""
    m = re.match(r"\s*([\d.]+)\s*([numKMGTP]?)", text)
    return float(m.group(1)) * _PREFIX[m.group(2)]


def flops_profile_summary(path: str | Path) -> dict:
    """The headline numbers of a DeepSpeed flops profiler report: ``params``, ``fwd_macs``, ``fwd_flops`` (per GPU,
    one micro-batch), ``batch_size``, ``fwd_latency_s``, ``bwd_latency_s``, ``step_latency_s``, ``iter_latency_s``,
    ``profile_step``, and ``modules``: ``{dotted name: {"params", "macs", "latency_s"}}`` for every module of the
    detailed tree (the model itself is ``""``; ``"blocks.0.attn.qkv"`` ...)."""
    text = Path(path).read_text()
    out: dict = {}
    for key, label in (("params", "params per GPU"), ("fwd_macs", "fwd MACs per GPU"),
                       ("fwd_flops", "fwd flops per GPU"), ("batch_size", "batch size per GPU"),
                       ("fwd_latency_s", "fwd latency"), ("bwd_latency_s", "bwd latency"),
                       ("step_latency_s", "step latency"), ("iter_latency_s", "iter latency")):
        m = re.search(rf"^{re.escape(label)}:\s*(.+)$", text, re.M)
        if m:
            out[key] = _number(m.group(1))
    m = re.search(r"Profile Summary at step (\d+)", text)
    out["profile_step"] = int(m.group(1)) if m else None
    modules, stack = {}, []  # stack of (indent, name) of the open containers
    lines = text[text.find("\nViT(") + 1:].splitlines() if "\nViT(" in text else []
    for i, line in enumerate(lines):
        head = re.match(r"^(\s*)(?:\(([\w.-]+)\): )?(?:\d+ x )?\w+\(", line)
        if not head:
            continue
        indent, name = len(head.group(1)), head.group(2) or ""
        while stack and stack[-1][0] >= indent:
            stack.pop()
        full = ".".join([n for _, n in stack if n] + ([name] if name else []))
        stats = _STATS.search(line) or (_STATS.search(lines[i + 1]) if i + 1 < len(lines) else None)
        if stats:
            params, pp, macs, mp, lat, lp = stats.groups()
            modules[full] = {"params": float(params) * _PREFIX[pp], "macs": float(macs) * _PREFIX[mp],
                             "latency_s": float(lat) * _PREFIX[lp]}
        if not line.rstrip().endswith(")") or not _STATS.search(line):  # a container: its children follow
            stack.append((indent, name))
    out["modules"] = modules
    return out


def flops_by_part(summary: dict) -> dict[str, float]:
    """Forward FLOPs (2 × the profiler's MACs) of one micro-batch by kind of work, summed over the blocks: the patch
    embedding, qkv projection, attention itself (q kᵀ and the weighted sum of v: the attention module's MACs that
    are not in its two Linear layers), output projection, the MLP's two Linear layers, and the classifier head."""
    m = summary["modules"]
    blocks = sorted({name.split(".")[1] for name in m if name.startswith("blocks.")}, key=int)
    parts = {"patch embedding": 2 * m["patch_embed"]["macs"], "qkv": 0.0, "attention q·kᵀ, ·v": 0.0,
             "attention proj": 0.0, "MLP fc": 0.0, "MLP proj": 0.0}
    for b in blocks:
        attn, qkv, proj = (m[f"blocks.{b}.attn{s}"]["macs"] for s in ("", ".qkv", ".proj"))
        parts["qkv"] += 2 * qkv
        parts["attention q·kᵀ, ·v"] += 2 * (attn - qkv - proj)
        parts["attention proj"] += 2 * proj
        parts["MLP fc"] += 2 * m[f"blocks.{b}.mlp.fc"]["macs"]
        parts["MLP proj"] += 2 * m[f"blocks.{b}.mlp.proj"]["macs"]
    parts["head"] = 2 * m["head"]["macs"]
    return parts

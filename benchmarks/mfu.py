"""Model FLOPs utilisation of a GPT training step: GPT-2 small in bf16 on a GPU (target: >= 50% on an H100).

    python benchmarks/mfu.py                          # GPU: GPT-2 small, bf16, eager vs torch.compile, batch sweep
    python benchmarks/mfu.py --batch 32 64 --no-eager
    python benchmarks/mfu.py --model ci               # CPU: the ci profile's shape, peak measured on the spot

A step is forward + backward + fused AdamW on ``batch x 1024`` random tokens, as ``labs_lib.train`` runs it (bf16
autocast, fp32 master weights). MFU = ``model.flops_per_token() x tokens/s / peak`` where the FLOPs per token are
6N + 12·L·h·s (PaLM appendix B) and the peak comes from the GPU's data sheet (989 TFLOP/s dense bf16 for H100 SXM
and H200), or a matmul measured on the spot on a CPU. Vocabulary padded to 50304 (a multiple of 64) as nanoGPT
does: same model quality, faster matmuls. Writes benchmarks/results/mfu_<device>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_results  # noqa: E402

from labs_lib.core.config import GPTConfig, get_profile  # noqa: E402
from labs_lib.measure.flops import mfu, peak_flops  # noqa: E402
from labs_lib.models.gpt import GPT  # noqa: E402


def model_config(name: str) -> GPTConfig:
    if name in ("ci", "cpu", "gpu"):
        return get_profile(name).model
    return GPTConfig(**{**GPTConfig.preset(name).to_dict(), "vocab_size": 50304})


def attention_backend(name: str):
    """Context that pins scaled_dot_product_attention to one kernel family (``default``: torch's choice)."""
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION}[name])


def top_kernels(step, device: torch.device, n: int = 12) -> str:
    """The kernels that take the most device time in two steps: where the rest of the time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(2):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=n, max_name_column_width=70)


def bench(cfg: GPTConfig, batch: int, compiled: bool, dtype: str, device: torch.device, steps: int,
          warmup: int, sdpa: str = "default", show_kernels: bool = False, compile_mode: str = "default") -> dict:
    torch.manual_seed(0)
    model = GPT(cfg).to(device).train()
    fused = device.type == "cuda" or None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    # static shapes: one graph per batch size; max-autotune times several GEMM/Triton kernels per shape (slow compile)
    forward = torch.compile(model, dynamic=False, mode=compile_mode) if compiled else model
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=device)
    y = torch.roll(x, -1, dims=1)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext())

    def step():
        with autocast, attention_backend(sdpa):
            loss = forward(x, y)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for _ in range(warmup):  # the first compiled steps build the kernels
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - t0) / steps
    tokens_per_s = batch * cfg.block_size / seconds
    peak, _ = peak_flops(device)
    if show_kernels:
        print(top_kernels(step, device))
    row = {"model": f"{cfg.n_layer}L {cfg.n_embd}d", "params": model.num_params(), "dtype": dtype,
           "compile": compile_mode if compiled else "eager", "sdpa": sdpa, "batch": f"{batch}x{cfg.block_size}",
           "step_ms": round(seconds * 1e3, 2),
           "tokens/s": round(tokens_per_s), "TFLOP/s": round(model.flops_per_token() * tokens_per_s / 1e12, 1),
           "MFU": round(mfu(model.flops_per_token(), tokens_per_s, peak), 4), "warmup_s": round(warmup_s, 1)}
    if device.type == "cuda":
        row["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    return row


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2-small" if cuda else "ci", help="a GPTConfig preset or a profile name")
    p.add_argument("--batch", type=int, nargs="+", default=[16, 32] if cuda else [8])
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--no-eager", action="store_true", help="only the compiled model")
    p.add_argument("--no-compile", action="store_true", help="only the eager model")
    p.add_argument("--sdpa", nargs="+", default=["default"], choices=["default", "flash", "cudnn", "efficient"],
                   help="attention kernels to compare")
    p.add_argument("--compile-mode", nargs="+", default=["default"],
                   choices=["default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"])
    p.add_argument("--kernels", action="store_true", help="print the top device kernels of each compiled run")
    p.add_argument("--tag", default="", help="suffix of the results file name (keeps several sweeps apart)")
    p.add_argument("--steps", type=int, default=20 if cuda else 10)
    p.add_argument("--warmup", type=int, default=5 if cuda else 2)
    args = p.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = model_config(args.model)
    modes = [m for m in (False, True) if not (m and args.no_compile) and not (not m and args.no_eager)]
    peak, source = peak_flops(device)
    print(f"peak {peak / 1e12:.1f} TFLOP/s ({source})")
    rows = []
    runs = [(c, m, b, a) for c in modes for m in (args.compile_mode if c else ["default"]) for b in args.batch
            for a in args.sdpa]
    for compiled, compile_mode, batch, sdpa in runs:
        try:
            row = bench(cfg, batch, compiled, args.dtype, device, args.steps, args.warmup, sdpa,
                        show_kernels=args.kernels and compiled, compile_mode=compile_mode)
        except torch.OutOfMemoryError:
            print(f"batch {batch}: out of memory, skipped")
            row = None
        except RuntimeError as e:  # e.g. an attention kernel this GPU or dtype lacks
            print(f"batch {batch} sdpa {sdpa}: {str(e).splitlines()[0]}, skipped")
            row = None
        if cuda:
            torch.cuda.empty_cache()
        if row:
            rows.append(row)
            print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")
    save_results(f"mfu_{slug}" + (f"_{args.tag}" if args.tag else ""), rows, peak_flops=peak, peak_source=source,
                 description=f"GPT training step (forward, backward, fused AdamW), {args.dtype}, random tokens; "
                             f"MFU against {peak / 1e12:.1f} TFLOP/s ({source}).")


if __name__ == "__main__":
    main()

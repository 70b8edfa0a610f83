"""How fast the hardware could go, and how much of it a run uses: peak FLOP/s and MFU.

    peak, source = peak_flops("cuda")                              # a data sheet for known GPUs, else measured
    mfu(model.flops_per_token(), tokens_per_s, peak)               # model FLOPs utilisation, 0..1

MFU counts the model's FLOPs (labs_lib.models.gpt.GPT.flops_per_token: 6N + 12·L·h·s per token, PaLM appendix B),
not recomputed ones, so activation checkpointing lowers it: the honest number for comparing runs.
"""

from __future__ import annotations

import re
import time

import torch

# Dense bf16 peak FLOP/s per accelerator from vendor data sheets (tensor cores, no sparsity). Keys are matched
# against torch.cuda.get_device_name() word by word, most specific first ("NVIDIA H100 PCIe" before "H100").
PEAK_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "A100": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
    "V100": 125e12,  # fp16: V100 has no bf16
    "T4": 65e12,  # fp16
}


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: useful FLOP/s (``flops_per_token * tokens_per_s``) as a fraction of the peak."""
    return flops_per_token * tokens_per_s / peak_flops


def measure_matmul_flops(size: int = 1024, dtype: torch.dtype = torch.float32, seconds: float = 0.5,
                         device: str | torch.device = "cpu") -> float:
    """Achieved FLOP/s of a square matmul on this device: the practical peak of a CPU, measured on the spot."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * runs / (time.perf_counter() - start)


def peak_flops(device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from): a data-sheet value for known GPUs, else a measurement."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_FLOPS.items():
            if set(key.split()) <= set(re.split(r"[\s_-]+", name)):
                return value, f"data sheet ({name})"
        return measure_matmul_flops(8192, dtype, device=device), f"measured matmul ({name})"
    measured = measure_matmul_flops(1024, torch.float32)
    return measured, f"measured fp32 matmul on {torch.get_num_threads()} CPU thread(s)"

"""The planner's named models and clusters.

    model_preset("gpt3-175b")        # a ModelSpec
    cluster_preset("a100-80gb")      # a ClusterSpec of one 8-GPU node: .with_gpus(1024) for more
    cluster_preset("local")          # this machine, as labs_lib.planner.calibrate measured it

Models: labs_lib.core.config.MODEL_PRESETS (GPT-2, Radford et al. 2019; GPT-3, Brown et al. 2020, table 2.1) and
Megatron-LM's 1T model (Narayanan et al. 2021, table 1: 128 layers, hidden 25600, 160 heads, vocabulary 51200,
sequence 2048). The GPT-2 shapes are labs_lib's own GPT (kind "labs": it is GPT-2, tied embeddings and biases), the
GPT-3 and Megatron shapes Megatron-style models (kind "megatron": Korthikanti's 16-bit activations).

Clusters, per GPU, from NVIDIA's data sheets (A100: "NVIDIA A100 Tensor Core GPU" data sheet and DGX A100 user
guide; H100 / H200: the H100 and H200 Tensor Core GPU data sheets and DGX H100 / H200 user guides):

    gpu         bf16 dense peak   memory   NVLink (per direction)       InfiniBand (one NIC per GPU)
    a100-80gb   312 TFLOP/s       80 GB    300 GB/s (NVLink 3, 600 bi)  25 GB/s (HDR, 200 Gb/s)
    h100-80gb   989 TFLOP/s       80 GB    450 GB/s (NVLink 4, 900 bi)  50 GB/s (NDR, 400 Gb/s)
    h200        989 TFLOP/s       141 GB   450 GB/s (NVLink 4, 900 bi)  50 GB/s (NDR, 400 Gb/s)

The link speeds are line rates, the ceiling of nccl-tests' all-reduce bus bandwidth (busbw); a tuned cluster
reaches about 80% of them, so plans on paper are a little optimistic about communication.
"""

from __future__ import annotations

from labs_lib.core.config import MODEL_PRESETS
from labs_lib.measure.flops import PEAK_FLOPS
from labs_lib.planner.plan import ClusterSpec, ModelSpec

GPT2_VOCAB, GPT2_SEQ = 50257, 1024  # GPT-2's tokenizer and context; GPT-3 keeps the tokenizer, doubles the context

MODELS: dict[str, ModelSpec] = {
    name: ModelSpec(name, layers=shape["n_layer"], hidden=shape["n_embd"], heads=shape["n_head"], vocab=GPT2_VOCAB,
                    seq=shape.get("block_size", GPT2_SEQ), kind="labs" if name.startswith("gpt2") else "megatron")
    for name, shape in MODEL_PRESETS.items()
}
MODELS["megatron-1t"] = ModelSpec("megatron-1t", layers=128, hidden=25600, heads=160, vocab=51200, seq=2048)

GB = 1e9
CLUSTERS: dict[str, ClusterSpec] = {
    "a100-80gb": ClusterSpec("a100-80gb", gpus=8, gpus_per_node=8, memory_bytes=80 * GB,
                             peak_flops=PEAK_FLOPS["A100"], intra_node_busbw=300 * GB, inter_node_busbw=25 * GB),
    "h100-80gb": ClusterSpec("h100-80gb", gpus=8, gpus_per_node=8, memory_bytes=80 * GB,
                             peak_flops=PEAK_FLOPS["H100"], intra_node_busbw=450 * GB, inter_node_busbw=50 * GB),
    "h200": ClusterSpec("h200", gpus=8, gpus_per_node=8, memory_bytes=141 * GB, peak_flops=PEAK_FLOPS["H200"],
                        intra_node_busbw=450 * GB, inter_node_busbw=50 * GB),
}
CLUSTER_NAMES = (*CLUSTERS, "local")


def model_preset(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model preset {name!r}: choose one of {', '.join(MODELS)}, or give the shape "
                         "(--layers --hidden --heads --vocab --seq)")
    return MODELS[name]


def cluster_preset(name: str) -> ClusterSpec:
    """A data-sheet cluster, or ``local``: this machine measured (labs_lib.planner.calibrate; measured on first
    use, about a minute, then read from its cache)."""
    if name == "local":
        from labs_lib.planner.calibrate import local_cluster

        return local_cluster()
    if name not in CLUSTERS:
        raise ValueError(f"unknown GPU preset {name!r}: choose one of {', '.join(CLUSTER_NAMES)}")
    return CLUSTERS[name]

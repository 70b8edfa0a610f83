"""TensorRT-LLM's real path, for NVIDIA's Triton + TensorRT-LLM container: the commands, the ``tensorrt_llm``
repository variant and the check of every field its backend reads.

    ok, why = available()                                      # tensorrt_llm importable, trtllm-build, a CUDA GPU
    for argv in build_commands(run, "build/trtllm/demo", tp=2, pp=2):    # export -> convert -> trtllm-build
        print(shlex.join(argv))
    repo = render_repository(run, out, engine="tensorrt_llm", engine_dir="build/trtllm/demo/engine")
    problems = check_engine_config(read_config(repo / "tensorrt_llm"), read_config(repo / "ensemble"))   # [] = ok
    print(shlex.join(launch_command(repo, world_size=4)))       # one MPI rank per GPU: tp x pp

TensorRT-LLM cannot be installed from the package registries this project reaches and needs an NVIDIA GPU, so here
:func:`available` says why not and the labs serve the python-backend ``gpt`` engine in its place (the same ideas,
built and measured in labs_lib.inference.paged / inflight). In the container the same repository code renders a
``tensorrt_llm`` model (backend ``tensorrtllm``) behind the same ``ensemble``.

The course's engine flags, as trtllm-build spells them (the old build.py's ``--use_inflight_batching
--paged_kv_cache --remove_input_padding --use_gpt_attention_plugin --use_gemm_plugin``): :data:`ENGINE_FLAGS`.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

ENGINE_MODEL = "tensorrt_llm"
BACKEND = "tensorrtllm"
GPT_MODEL_TYPES = ("V1", "inflight_batching", "inflight_fused_batching")  # the backend's gpt_model_type values
SCHEDULER_POLICIES = ("max_utilization", "guaranteed_no_evict")
# The tensors the backend cannot run without (name: data type, dims), and its outputs the ensemble reads.
REQUIRED_INPUTS = {"input_ids": ("TYPE_INT32", [-1]), "input_lengths": ("TYPE_INT32", [1]),
                   "request_output_len": ("TYPE_INT32", [1])}
REQUIRED_OUTPUTS = {"output_ids": ("TYPE_INT32", [-1, -1]), "sequence_length": ("TYPE_INT32", [-1])}
# The ensemble's names for the engine's inputs where the python-backend gpt names them differently.
RENAMED_INPUTS = {"seed": "random_seed"}

# What each engine flag does, and where the course builds and measures its idea on CPU.
ENGINE_FLAGS = {
    "--gpt_attention_plugin auto": "fused attention over a packed batch and a paged cache "
                                   "(labs_lib.inference.paged.forward_paged)",
    "--gemm_plugin auto": "cuBLAS-backed GEMMs chosen per shape (torch's matmul here)",
    "--remove_input_padding enable": "the batch packed without padding: one token row per real token "
                                     "(PagedKVCache pack layout)",
    "--paged_kv_cache enable": "KV cache in fixed-size blocks from a pool, a block table per sequence "
                               "(labs_lib.inference.paged.PagedKVCache)",
    "--context_fmha enable": "flash attention for the prompt (context) phase (torch's scaled_dot_product_attention)",
}


def available() -> tuple[bool, str]:
    """(True, "") where an engine can be built and served here; else (False, why not, in one sentence)."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        return False, ("tensorrt_llm is not installed (its package index is NVIDIA's own, which this machine does "
                       "not reach): run this in NVIDIA's Triton + TensorRT-LLM container")
    if shutil.which("trtllm-build") is None:
        return False, "trtllm-build is not on PATH: run this in NVIDIA's Triton + TensorRT-LLM container"
    import torch

    if not torch.cuda.is_available():
        return False, "TensorRT-LLM builds and runs engines on NVIDIA GPUs only, and there is none here"
    return True, ""


def build_commands(run: str | Path, workdir: str | Path, tp: int = 1, pp: int = 1, dtype: str = "float16",
                   max_batch_size: int = 8, max_input_len: int = 512, max_seq_len: int = 1024,
                   examples: str = "tensorrt_llm/examples") -> list[list[str]]:
    """The three commands that turn a run into a TensorRT engine for ``tp`` x ``pp`` GPUs, as argv lists: our Hugging
    Face export (lab 09), TensorRT-LLM's GPT checkpoint conversion, trtllm-build with the course's flags. The engine
    is ``workdir/engine``; ``examples`` is the TensorRT-LLM repository's examples folder at the container's
    version."""
    if tp < 1 or pp < 1:
        raise ValueError(f"tp={tp}, pp={pp}: both must be at least 1")
    if max_input_len >= max_seq_len:
        raise ValueError(f"max_input_len={max_input_len} must be below max_seq_len={max_seq_len}: the rest is "
                         "room for the generated tokens")
    work = Path(workdir)
    hf, checkpoint, engine = work / "hf", work / "checkpoint", work / "engine"
    flags = [part for flag in ENGINE_FLAGS for part in flag.split()]
    return [
        [sys.executable, "-m", "labs_lib.export", "--checkpoint", str(run), "--format", "hf", "--out", str(hf)],
        ["python3", f"{examples}/gpt/convert_checkpoint.py", "--model_dir", str(hf), "--dtype", dtype,
         "--tp_size", str(tp), "--pp_size", str(pp), "--output_dir", str(checkpoint)],
        ["trtllm-build", "--checkpoint_dir", str(checkpoint), "--output_dir", str(engine), *flags,
         "--max_batch_size", str(max_batch_size), "--max_input_len", str(max_input_len),
         "--max_seq_len", str(max_seq_len)],
    ]


def launch_command(repository: str | Path, world_size: int = 1,
                   scripts: str = "tensorrtllm_backend/scripts") -> list[str]:
    """tritonserver through the backend's launcher: one MPI rank per GPU of the engine (tp x pp)."""
    return ["python3", f"{scripts}/launch_triton_server.py", f"--world_size={world_size}",
            f"--model_repo={Path(repository).resolve()}"]


def _parameter(config, key: str) -> str | None:
    return config.parameters[key].string_value if key in config.parameters else None


def _tensor_problems(tensors, required: dict, kind: str, types) -> list[str]:
    found = {t.name: t for t in tensors}
    problems = []
    for name, (dtype, dims) in required.items():
        if name not in found:
            problems.append(f"{kind} {name!r} is missing")
        elif types.Name(found[name].data_type) != dtype or list(found[name].dims) != dims:
            problems.append(f"{kind} {name!r} must be {dtype} {dims}")
        elif kind == "input" and found[name].optional:
            problems.append(f"input {name!r} must not be optional: the backend needs it")
    return problems


def check_engine_config(config, ensemble=None) -> list[str]:
    """Every field the tensorrtllm backend reads, checked on a parsed ``tensorrt_llm`` ModelConfig (and the
    ensemble's step into it, when given); returns the problems, [] when the backend would accept it."""
    from tritonclient.grpc import model_config_pb2

    types = model_config_pb2.DataType
    problems = [] if config.backend == BACKEND else [f"backend is {config.backend!r}, not {BACKEND!r}"]
    if config.name != ENGINE_MODEL:
        problems.append(f"the model is named {config.name!r}: the ensemble and clients expect {ENGINE_MODEL!r}")
    if config.max_batch_size < 1:
        problems.append("max_batch_size must be at least 1 (the in-flight batcher's slots)")
    problems += _tensor_problems(config.input, REQUIRED_INPUTS, "input", types)
    problems += _tensor_problems(config.output, REQUIRED_OUTPUTS, "output", types)
    if _parameter(config, "gpt_model_type") not in GPT_MODEL_TYPES:
        problems.append(f"parameter gpt_model_type={_parameter(config, 'gpt_model_type')!r}: one of {GPT_MODEL_TYPES}")
    if not _parameter(config, "gpt_model_path"):
        problems.append("parameter gpt_model_path (the engine folder, with its config.json) is empty")
    policy = _parameter(config, "batch_scheduler_policy")
    if policy not in (None, *SCHEDULER_POLICIES):
        problems.append(f"parameter batch_scheduler_policy={policy!r}: one of {SCHEDULER_POLICIES}")
    problems += _number_problems(config)
    if ensemble is not None:
        problems += _ensemble_problems(config, ensemble)
    return problems


def _number_problems(config) -> list[str]:
    checks = {"max_beam_width": (int, 1, None), "max_tokens_in_paged_kv_cache": (int, 1, None),
              "kv_cache_free_gpu_mem_fraction": (float, 1e-9, 1.0)}
    problems = []
    for key, (kind, low, high) in checks.items():
        text = _parameter(config, key)
        if not text:
            continue  # left empty: the backend's default
        try:
            value = kind(text)
        except ValueError:
            problems.append(f"parameter {key}={text!r} is not a {kind.__name__}")
            continue
        if value < low or (high is not None and value > high):
            problems.append(f"parameter {key}={text!r} is outside [{low:g}, {high if high is not None else 'inf'}]")
    return problems


def _ensemble_problems(config, ensemble) -> list[str]:
    steps = [s for s in ensemble.ensemble_scheduling.step if s.model_name == ENGINE_MODEL]
    if len(steps) != 1:
        return [f"the ensemble has {len(steps)} steps into {ENGINE_MODEL!r}, not 1"]
    inputs, outputs = {t.name for t in config.input}, {t.name for t in config.output}
    step = steps[0]
    problems = [f"the ensemble feeds {key!r}, which {ENGINE_MODEL} does not take" for key in step.input_map
                if key not in inputs]
    problems += [f"the ensemble does not feed the required input {name!r}" for name in REQUIRED_INPUTS
                 if name not in step.input_map]
    problems += [f"the ensemble reads {key!r}, which {ENGINE_MODEL} does not give" for key in step.output_map
                 if key not in outputs]
    return problems


def point_ensemble_at_engine(ensemble, engine_inputs: set[str]):
    """The ensemble (a parsed ModelConfig, changed in place and returned) with its engine step (``gpt``) sent to
    ``tensorrt_llm``: inputs renamed to the backend's names (:data:`RENAMED_INPUTS`), the ones it does not take
    dropped."""
    for step in ensemble.ensemble_scheduling.step:
        if step.model_name != "gpt":
            continue
        step.model_name = ENGINE_MODEL
        mapped = {RENAMED_INPUTS.get(k, k): v for k, v in step.input_map.items()}
        step.input_map.clear()
        step.input_map.update({k: v for k, v in mapped.items() if k in engine_inputs})
    return ensemble

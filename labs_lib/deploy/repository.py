"""A Triton model repository rendered from a trained run, out of the templates in triton_models/.

    repo = render_repository("build/runs/demo")                  # build/deploy/demo/repository
    repo = render_repository(run, out, max_batch_size=16, decoupled=False)

The layout and names are TensorRT-LLM's inflight_batcher_llm: ``preprocessing`` (text → ids), ``gpt`` (the
engine), ``postprocessing`` (ids → text) and ``ensemble`` joining them. The templates' ``${name}`` fields are
filled as TensorRT-LLM's fill_template does: batch size and queue delay of dynamic batching, the tokenizer
folder, the checkpoint (the run's newest step at rendering time, so later training does not change what is
served), whether ``gpt`` is decoupled (it can stream), tp, the engine: torch, or the run's ONNX export run
by ONNX Runtime inside the python backend, and how gpt batches: static (``V1``) or in flight
(TensorRT-LLM's ``batching_strategy`` ``inflight_fused_batching``, its scheduler policy and KV-cache sizes).
"""

from __future__ import annotations

import shutil
import string
from pathlib import Path

from labs_lib.core import paths
from labs_lib.core.checkpoint import load_meta, resolve_run
from labs_lib.core.config import GPTConfig
from labs_lib.deploy.inflight import check_batching
from labs_lib.deploy.words import TOKENIZER_FILE
from labs_lib.parallel.tensor_parallel import check_tensor_parallel

__all__ = ["TEMPLATES", "MODELS", "ENGINES", "models_for", "render_repository", "default_repository", "parse_config",
           "read_config"]

TEMPLATES = paths.PROJECT_ROOT / "triton_models"
MODELS = ("preprocessing", "gpt", "postprocessing", "ensemble")
ENGINES = ("torch", "onnx", "tensorrt_llm")


def models_for(engine: str = "torch") -> tuple[str, ...]:
    """The model folders of a repository rendered for ``engine``: TensorRT-LLM's engine model replaces gpt."""
    return MODELS if engine != "tensorrt_llm" else tuple(m if m != "gpt" else "tensorrt_llm" for m in MODELS)


def parse_config(text: str):
    """A config.pbtxt's text as Triton's ``ModelConfig`` protobuf (the server's own schema, from tritonclient)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def read_config(model_dir: str | Path):
    """The ``ModelConfig`` of a model folder (or of a config.pbtxt file)."""
    path = Path(model_dir)
    return parse_config((path / "config.pbtxt" if path.is_dir() else path).read_text())


def default_repository(run: str | Path) -> Path:
    """build/deploy/<run name>/repository."""
    _, run_dir = resolve_run(run)
    return paths.build_dir() / "deploy" / run_dir.name / "repository"


def _fill(template: Path, values: dict[str, str]) -> str:
    try:
        return string.Template(template.read_text()).substitute(values)
    except KeyError as e:
        raise ValueError(f"{template} asks for ${{{e.args[0]}}}, which render_repository does not fill: add it "
                         "there or remove it from the template") from None


def render_repository(run: str | Path, out: str | Path | None = None, max_batch_size: int = 8,
                      max_queue_delay_microseconds: int = 1000, decoupled: bool = True, tp: int = 1,
                      torch_threads: int = 0, instance_count: int = 1, engine: str = "torch",
                      dynamic_batching: bool = True,
                      batching_strategy: str = "V1", batch_scheduler_policy: str = "guaranteed_no_evict",
                      max_tokens_in_paged_kv_cache: int | None = None, tokens_per_block: int = 16,
                      max_num_tokens: int = 256, engine_dir: str | Path | None = None,
                      kv_cache_free_gpu_mem_fraction: float = 0.9, max_beam_width: int = 1) -> Path:
    """Write the four models for ``run`` (a run folder or one checkpoints/step_N folder) into ``out``; returns it.

    ``engine`` "onnx": the run is exported to ONNX into gpt/1/onnx and ONNX Runtime serves it (greedy only).
    ``engine`` "tensorrt_llm": for NVIDIA's container, a ``tensorrt_llm`` model (backend tensorrtllm) on the
    TensorRT engine in ``engine_dir`` (labs_lib.deploy.trtllm.build_commands) replaces ``gpt``, with
    ``kv_cache_free_gpu_mem_fraction`` and ``max_beam_width``; every field its backend reads is checked first.
    ``batching_strategy`` "inflight_fused_batching": gpt batches in flight over a paged KV cache
    (labs_lib.deploy.inflight) with TensorRT-LLM's ``batch_scheduler_policy``, ``max_tokens_in_paged_kv_cache``
    (the pool; None: 16 contexts), ``tokens_per_block`` and ``max_num_tokens`` (per step); "V1": static batches.
    ``dynamic_batching`` False: gpt has no dynamic_batching block, so Triton executes each request alone.
    Only the four model folders of ``out`` are replaced; anything else there stays."""
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: use one of {ENGINES}")
    if max_batch_size < 1 or max_queue_delay_microseconds < 0 or instance_count < 1:
        raise ValueError("max_batch_size and instance_count must be >= 1 and the queue delay >= 0")
    checkpoint, run_dir = resolve_run(run)
    _check_engine(engine, tp, checkpoint, batching_strategy, batch_scheduler_policy, decoupled, engine_dir)
    if not (run_dir / TOKENIZER_FILE).exists():
        raise FileNotFoundError(f"{run_dir / TOKENIZER_FILE} is missing: the run folder must hold the tokenizer it "
                                "trained with")
    if not TEMPLATES.is_dir():
        raise FileNotFoundError(f"the templates {TEMPLATES} are missing: render from the project's checkout")
    values = {"triton_max_batch_size": str(max_batch_size),
              "max_queue_delay_microseconds": str(max_queue_delay_microseconds),
              "tokenizer_dir": str(run_dir.resolve()), "checkpoint_dir": str(checkpoint.resolve()),
              "decoupled_mode": "true" if decoupled else "false", "tp": str(tp), "torch_threads": str(torch_threads),
              "preprocessing_instance_count": str(instance_count), "postprocessing_instance_count": str(instance_count),
              "skip_special_tokens": "false",
              "dynamic_batching": (f"dynamic_batching {{\n  preferred_batch_size: [ {max_batch_size} ]\n"
                                   f"  max_queue_delay_microseconds: {max_queue_delay_microseconds}\n}}"
                                   if dynamic_batching else "# no dynamic_batching: each request executes alone"),
              "batching_strategy": batching_strategy, "batch_scheduler_policy": batch_scheduler_policy,
              "max_tokens_in_paged_kv_cache": str(max_tokens_in_paged_kv_cache or ""),
              "tokens_per_block": str(tokens_per_block), "max_num_tokens": str(max_num_tokens),
              "engine_dir": str(Path(engine_dir).resolve()) if engine_dir else "",
              "kv_cache_free_gpu_mem_fraction": str(kv_cache_free_gpu_mem_fraction),
              "max_beam_width": str(max_beam_width)}
    out = Path(out) if out is not None else default_repository(run)
    onnx_dir = (out / "gpt" / "1" / "onnx").resolve()
    values["onnx_dir"] = str(onnx_dir) if engine == "onnx" else ""
    _write_models(out, _rendered(engine, values))
    if engine == "onnx":
        from labs_lib.inference.export import export_onnx_run

        export_onnx_run(checkpoint, onnx_dir)
    return out


def _check_engine(engine, tp, checkpoint, batching_strategy, batch_scheduler_policy, decoupled, engine_dir) -> None:
    """The engine's settings, before anything is written (the fix in each message)."""
    if engine == "tensorrt_llm":
        if not engine_dir:
            raise ValueError("engine='tensorrt_llm' needs engine_dir: the folder trtllm-build wrote (see "
                             "labs_lib.deploy.trtllm.build_commands)")
        if tp != 1:
            raise ValueError("with engine='tensorrt_llm' the engine itself is split (trtllm-build from a checkpoint "
                             "converted with --tp_size): render with tp=1 and launch with world_size = tp x pp")
        return
    check_batching(batching_strategy, batch_scheduler_policy, decoupled,
                   in_process_torch=tp == 1 and engine == "torch")
    if tp != 1:  # split the model now, not when the server loads it: the fix is in the message
        if engine != "torch":
            raise ValueError(f"tp={tp} with engine={engine!r}: tensor-parallel serving runs the torch engine; "
                             "render with engine='torch' or tp=1")
        check_tensor_parallel(GPTConfig(**load_meta(checkpoint)["model"]), tp)


def _rendered(engine: str, values: dict[str, str]) -> dict[str, str]:
    """{model folder: its config.pbtxt text}; for TensorRT-LLM the ensemble's engine step points at tensorrt_llm and
    the whole is checked against what the tensorrtllm backend reads (ValueError listing every problem)."""
    from google.protobuf import text_format

    from labs_lib.deploy import trtllm

    models = models_for(engine)
    engine_model = models[1]
    texts = {model: _fill(TEMPLATES / model / "config.pbtxt", values) for model in models}
    if engine == "tensorrt_llm":
        config = parse_config(texts[engine_model])
        ensemble = trtllm.point_ensemble_at_engine(parse_config(texts["ensemble"]), {t.name for t in config.input})
        problems = trtllm.check_engine_config(config, ensemble)
        if problems:
            raise ValueError("the tensorrt_llm model would not load: " + "; ".join(problems))
        texts["ensemble"] = ("# rendered for TensorRT-LLM: the engine step runs tensorrt_llm "
                             "(labs_lib.deploy.trtllm)\n" + text_format.MessageToString(ensemble))
    return texts


def _write_models(out: Path, texts: dict[str, str]) -> None:
    """Replace the model folders of ``out`` (and only them: an engine variant's other folder goes too)."""
    out.mkdir(parents=True, exist_ok=True)
    for model in ("gpt", "tensorrt_llm"):
        shutil.rmtree(out / model, ignore_errors=True)
    for model, text in texts.items():
        target = out / model
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(TEMPLATES / model, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".gitkeep"))
        (target / "config.pbtxt").write_text(text)
        (target / "1").mkdir(exist_ok=True)  # Triton needs a version folder, the ensemble's stays empty

"""TensorRT-LLM's path: the rendered tensorrt_llm repository has every field the tensorrtllm backend reads (checked
with Triton's own ModelConfig schema), bad settings fail before anything is written, and the build commands carry the
course's flags for tp 1 and tp 2 x pp 2. (Building and serving an engine needs NVIDIA's container: not here.)"""

from __future__ import annotations

import pytest

from labs_lib.deploy import trtllm
from labs_lib.deploy.repository import parse_config, read_config, render_repository


@pytest.fixture(scope="module")
def trt_repo(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "repository"
    render_repository(trained_run, out, engine="tensorrt_llm", engine_dir=out.parent / "engine",
                      batching_strategy="inflight_fused_batching", batch_scheduler_policy="max_utilization",
                      max_tokens_in_paged_kv_cache=4096, kv_cache_free_gpu_mem_fraction=0.85)
    return out


def test_rendered_repository_has_every_field_the_backend_reads(trt_repo, trained_run, tmp_path):
    assert sorted(p.name for p in trt_repo.iterdir()) == ["ensemble", "postprocessing", "preprocessing",
                                                          "tensorrt_llm"]
    engine, ensemble = read_config(trt_repo / "tensorrt_llm"), read_config(trt_repo / "ensemble")
    assert trtllm.check_engine_config(engine, ensemble) == []
    params = {k: v.string_value for k, v in engine.parameters.items()}
    assert params["gpt_model_type"] == "inflight_fused_batching" and params["batch_scheduler_policy"] == \
        "max_utilization"
    assert params["gpt_model_path"] == str((trt_repo.parent / "engine").resolve())
    assert params["kv_cache_free_gpu_mem_fraction"] == "0.85" and params["max_tokens_in_paged_kv_cache"] == "4096"
    assert engine.model_transaction_policy.decoupled
    step = {s.model_name: s for s in ensemble.ensemble_scheduling.step}["tensorrt_llm"]
    assert step.input_map["random_seed"] == "seed" and "seed" not in step.input_map  # the backend's name
    # the text side is the python-backend repository's, unchanged
    torch_repo = render_repository(trained_run, tmp_path / "torch", batching_strategy="inflight_fused_batching")
    for model in ("preprocessing", "postprocessing"):
        assert (trt_repo / model / "config.pbtxt").read_text() == (torch_repo / model / "config.pbtxt").read_text()
    assert {s.model_name for s in read_config(torch_repo / "ensemble").ensemble_scheduling.step} == \
        {"preprocessing", "gpt", "postprocessing"}


def test_the_check_names_every_problem(trt_repo):
    text = (trt_repo / "tensorrt_llm" / "config.pbtxt").read_text()
    broken = parse_config(text)
    broken.backend = "python"
    broken.parameters["gpt_model_type"].string_value = "static"
    broken.parameters["gpt_model_path"].string_value = ""
    broken.parameters["kv_cache_free_gpu_mem_fraction"].string_value = "1.5"
    broken.parameters["batch_scheduler_policy"].string_value = "fifo"
    next(t for t in broken.input if t.name == "input_ids").optional = True
    del broken.output[:]
    problems = "\n".join(trtllm.check_engine_config(broken))
    for expected in ("backend is 'python'", "gpt_model_type='static'", "gpt_model_path", "kv_cache_free_gpu_mem_"
                     "fraction='1.5' is outside", "batch_scheduler_policy='fifo'", "input 'input_ids' must not be "
                     "optional", "output 'output_ids' is missing", "output 'sequence_length' is missing"):
        assert expected in problems
    ensemble = read_config(trt_repo / "ensemble")
    step = next(s for s in ensemble.ensemble_scheduling.step if s.model_name == "tensorrt_llm")
    step.input_map["no_such_input"] = "text_input"
    del step.input_map["input_lengths"]
    problems = trtllm.check_engine_config(read_config(trt_repo / "tensorrt_llm"), ensemble)
    assert "the ensemble feeds 'no_such_input', which tensorrt_llm does not take" in problems
    assert "the ensemble does not feed the required input 'input_lengths'" in problems


@pytest.mark.parametrize("settings, message", [
    (dict(), "needs engine_dir"),
    (dict(engine_dir="e", tp=2), "the engine itself is split"),
    (dict(engine_dir="e", batch_scheduler_policy="fifo"), "batch_scheduler_policy='fifo'"),
    (dict(engine_dir="e", kv_cache_free_gpu_mem_fraction=0), "kv_cache_free_gpu_mem_fraction='0' is outside"),
    (dict(engine_dir="e", max_beam_width=0), "max_beam_width='0' is outside"),
])
def test_bad_settings_fail_before_anything_is_written(trained_run, tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        render_repository(trained_run, tmp_path / "repo", engine="tensorrt_llm", **settings)
    assert not (tmp_path / "repo").exists()


def test_build_commands_carry_the_course_flags(trained_run, tmp_path):
    export, convert, build = trtllm.build_commands(trained_run, tmp_path, tp=2, pp=2)
    assert export[1:4] == ["-m", "labs_lib.export", "--checkpoint"] and "hf" in export
    assert convert[1].endswith("gpt/convert_checkpoint.py")
    assert convert[convert.index("--tp_size") + 1] == "2" and convert[convert.index("--pp_size") + 1] == "2"
    assert build[0] == "trtllm-build" and build[build.index("--output_dir") + 1] == str(tmp_path / "engine")
    for flag in ("--gpt_attention_plugin", "--gemm_plugin", "--remove_input_padding", "--paged_kv_cache"):
        assert flag in build
    assert build[build.index("--paged_kv_cache") + 1] == "enable"
    single = trtllm.build_commands(trained_run, tmp_path, tp=1, pp=1)[1]
    assert single[single.index("--tp_size") + 1] == "1"
    with pytest.raises(ValueError, match="below max_seq_len"):
        trtllm.build_commands(trained_run, tmp_path, max_input_len=1024, max_seq_len=1024)
    launch = trtllm.launch_command(tmp_path / "repo", world_size=4)
    assert "--world_size=4" in launch and launch[1].endswith("launch_triton_server.py")


def test_available_says_plainly_why_not_here():
    ok, why = trtllm.available()
    if ok:
        pytest.skip("TensorRT-LLM is installed here, with a GPU")
    assert "container" in why or "GPU" in why


# ------------------------------------------------------------------------------------- lab 10, section 11
def test_exercise_checks_accept_the_rule_and_refuse_the_usual_slips():
    from labs_lib.labs import lab10_trtllm as lab10

    assert lab10.check_kv_blocks(lambda p, n, b: -(-(p + n - 1) // b))
    with pytest.raises(AssertionError, match="is the last new token ever fed back"):
        lab10.check_kv_blocks(lambda p, n, b: -(-(p + n) // b))
    assert lab10.check_kv_blocks(None) is False
    from labs_lib.inference.inflight import admitted

    no_evict, max_util = (admitted(policy, **lab10.ADMISSION) for policy in ("guaranteed_no_evict", "max_utilization"))
    assert no_evict != max_util, "the exercise's queue must tell the policies apart"
    assert lab10.check_admission(no_evict, max_util)
    with pytest.raises(AssertionError, match="reserves every block"):
        lab10.check_admission(max_util, max_util)


def test_paged_in_flight_holds_and_computes_less_than_one_static_batch(trained_run):
    from labs_lib.labs import lab10_trtllm as lab10

    static, paged = lab10.cache_comparison(trained_run)
    assert paged["peak KV bytes"] < static["peak KV bytes"]
    assert paged["token positions computed"] < static["token positions computed"]
    real = sum(p + n - 1 for p, n in lab10.MIXED)  # every real token fed once: no padding
    assert paged["token positions computed"] == real


def test_the_lab_renders_the_tensorrt_llm_repository_and_says_what_runs_here(trained_run, tmp_path):
    from labs_lib.labs import lab10_trtllm as lab10

    repo, rows, note = lab10.tensorrt_llm_repository(trained_run, tmp_path)
    assert [r["model"] for r in rows] == ["preprocessing", "tensorrt_llm", "postprocessing", "ensemble"]
    assert rows[1]["runs on"] == "tensorrtllm" and "inflight_fused_batching" in rows[1]["serves"]
    assert "tensorrt_llm" in rows[3]["serves"]
    if not trtllm.available()[0]:
        assert note.startswith("Not on this machine") and "python-backend gpt engine in its place" in note


def test_command_line_prints_the_recipe_and_refuses_to_build_without_tensorrt_llm(trained_run, tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "labs_lib.deploy", "trtllm", "--checkpoint", str(trained_run), "--workdir",
           str(tmp_path), "--tp", "2", "--pp", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "trtllm-build --checkpoint_dir" in result.stdout and "--tp_size 2 --pp_size 2" in result.stdout
    assert "--world_size=4" in result.stdout and (tmp_path / "repository" / "tensorrt_llm" / "config.pbtxt").exists()
    if not trtllm.available()[0]:
        refused = subprocess.run([*cmd, "--run-build"], capture_output=True, text=True)
        assert refused.returncode != 0 and refused.stderr.strip().startswith("error: cannot build here:")

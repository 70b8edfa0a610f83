"""Lab 10, sections 10 and 11: TensorRT-LLM's ideas built and measured, and its real path for NVIDIA's container.

    check_kv_blocks(kv_blocks)                        # exercise 4: the KV blocks a request holds at most
    check_admission(no_evict, max_util)               # exercise 5: what each scheduler policy admits of ADMISSION
    rows = cache_comparison(run)                      # one static contiguous batch vs paged in flight, MIXED workload
    repo, rows, note = tensorrt_llm_repository(run, out)   # the tensorrt_llm repository, checked; what runs here
    text = serve_tensorrt_llm(run, out, prompt)       # where TensorRT-LLM is installed: build, serve, ask

The engine code is labs_lib.inference.paged / inflight (our paged KV cache and in-flight batcher) and
labs_lib.deploy.trtllm (commands, the repository's field check); the checks' expected values are computed here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from labs_lib.deploy.repository import models_for, render_repository
from labs_lib.inference.inflight import InflightBatcher, admitted
from labs_lib.inference.paged import blocks_needed
from labs_lib.labs.checks import check
from labs_lib.labs.lab10 import config_rows, start_server

__all__ = ["ADMISSION", "MIXED", "check_kv_blocks", "check_admission", "cache_comparison", "tensorrt_llm_repository",
           "serve_tensorrt_llm"]

# Exercise 5's queue: (prompt tokens, max new tokens) per request, oldest first, against a pool of free blocks.
ADMISSION = dict(queue=[(40, 60), (20, 100), (30, 10), (8, 8)], free_blocks=12, block_size=16)
# A mixed workload for the cache comparison: (prompt tokens, new tokens) per request.
MIXED = [(6, 40), (30, 8), (12, 24), (50, 4), (4, 60), (20, 16), (40, 12), (8, 32)]


def check_kv_blocks(fn) -> bool:
    """Exercise 4: ``fn(prompt_tokens, max_new_tokens, tokens_per_block)`` -> the most KV blocks the request holds."""
    if fn is None or fn is Ellipsis:
        return check("KV blocks", None, None, hint="write kv_blocks(prompt_tokens, max_new_tokens, tokens_per_block).")
    cases = [(10, 6, 16), (16, 1, 16), (17, 1, 16), (16, 2, 16), (100, 28, 64), (1, 1, 8), (30, 35, 32)]
    for prompt, new, block in cases:
        got = fn(prompt, new, block)
        if got in (None, Ellipsis):
            return check("KV blocks", None, None, hint="kv_blocks still returns ...: write its body.")
        if got != blocks_needed(prompt, new, block):
            raise AssertionError(f"❌ KV blocks: {got!r} for a {prompt}-token prompt, {new} new tokens and blocks of "
                                 f"{block}: count the tokens whose keys and values are ever computed (is the last new "
                                 "token ever fed back?), then round up to whole blocks")
    print(f"✅ KV blocks: right for all {len(cases)} requests")
    return True


def check_admission(no_evict, max_utilization) -> bool:
    """Exercise 5: which requests of ADMISSION's queue each policy admits at once (lists of indices)."""
    if no_evict in (None, Ellipsis) or max_utilization in (None, Ellipsis):
        return check("admission", None, None, hint="give both lists of request indices.")
    for policy, answer in (("guaranteed_no_evict", no_evict), ("max_utilization", max_utilization)):
        want = admitted(policy, **ADMISSION)
        if list(answer) != want:
            rule = ("it reserves every block a request will ever hold" if policy == "guaranteed_no_evict" else
                    "it asks only for the blocks of the tokens a request feeds now")
            raise AssertionError(f"❌ admission under {policy}: {list(answer)} is not it: {rule}, oldest request "
                                 "first, and stops at the first that does not fit")
    print("✅ admission: right for both policies")
    return True


def cache_comparison(run: str | Path, workload=MIXED, block_size: int = 16) -> list[dict]:
    """The workload served two ways by the run's model: one static, left-padded batch over the contiguous cache, and
    in flight over a paged pool (requests join and leave between steps). Peak KV bytes held, token positions
    computed, steps: measured for the paged run, from the batch's shape for the static one."""
    from labs_lib.inference.generate import Decoding, load_trained
    from labs_lib.inference.paged import contiguous_kv_bytes

    model = load_trained(run)[0].eval()
    prompts, news = [p for p, _ in workload], [n for _, n in workload]
    pool = sum(blocks_needed(p, n, block_size) for p, n in workload)
    batcher = InflightBatcher(model, num_blocks=pool, block_size=block_size, policy="max_utilization")
    for i, (prompt, new) in enumerate(workload):
        batcher.submit([1 + (i + t) % 50 for t in range(prompt)], Decoding(max_new_tokens=new, temperature=0))
    peak = tokens = steps = 0
    with torch.no_grad():
        while (stats := batcher.step()) is not None:
            peak, tokens, steps = max(peak, stats.kv_bytes), tokens + stats.tokens, steps + 1
    longest = max(prompts) + max(news)
    return [{"cache": "contiguous, one static batch", "peak KV bytes": contiguous_kv_bytes(model, prompts, max(news)),
             "token positions computed": len(workload) * longest, "steps": max(news)},
            {"cache": "paged, in flight", "peak KV bytes": peak, "token positions computed": tokens, "steps": steps}]


def tensorrt_llm_repository(run: str | Path, out: str | Path) -> tuple[Path, list[dict], str]:
    """The run's repository rendered for NVIDIA's container (engine tensorrt_llm, on the engine trtllm-build would
    write into out/engine), checked field by field; returns (repository, its config rows, what this machine can do
    with it)."""
    from labs_lib.deploy import trtllm

    out = Path(out)
    repo = render_repository(run, out / "repository", engine="tensorrt_llm", engine_dir=out / "engine",
                             batching_strategy="inflight_fused_batching", batch_scheduler_policy="max_utilization")
    ok, why = trtllm.available()
    note = ("TensorRT-LLM is here: build the engine with the commands above, then serve this repository"
            if ok else f"Not on this machine: {why}. The labs serve the python-backend gpt engine in its place.")
    return repo, config_rows(repo, models=models_for("tensorrt_llm")), note


def serve_tensorrt_llm(run: str | Path, out: str | Path, prompt: str, max_tokens: int = 24) -> str:
    """Where TensorRT-LLM is installed (NVIDIA's container, a GPU): build the run's engine for one GPU with the
    course's flags, serve the rendered repository with tritonserver and return the answer to ``prompt``. Elsewhere
    RuntimeError saying why (labs_lib.deploy.trtllm.available)."""
    import subprocess

    from labs_lib.deploy import client, trtllm

    ok, why = trtllm.available()
    if not ok:
        raise RuntimeError(why)
    out = Path(out)
    for command in trtllm.build_commands(run, out):
        subprocess.run(command, check=True)
    repo, _, _ = tensorrt_llm_repository(run, out)
    server = start_server(repo, models=models_for("tensorrt_llm"))
    try:
        return client.generate(server.http_url, prompt, max_tokens)
    finally:
        server.stop()

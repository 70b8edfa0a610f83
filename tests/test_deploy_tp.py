"""Tensor-parallel serving: the gpt model's instance drives 2 worker processes holding the shards.

The workers alone (no server) generate what one process generates, greedy, sampled, batched and streamed, each
holding about half the weights; refusals come before any process starts; then the real server rendered with
tp=2 answers the generate endpoint, streams and reports per-worker weight bytes on its metrics endpoint, equal
to tp=1, and its workers go when it goes.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from labs_lib.deploy import client
from labs_lib.deploy.repository import MODELS, render_repository
from labs_lib.deploy.server import TritonServer
from labs_lib.deploy.tensor_parallel import TensorParallelWorkers
from labs_lib.inference.generate import Decoding, generate_ids, generate_text, load_trained
from labs_lib.measure.memory import storage_bytes

pytestmark = pytest.mark.slow
PROMPTS = ["def ", "import os\n", "class Point:\n    def "]
MAX_TOKENS = 24
WORKER = "labs_lib.deploy.tensor_parallel"


def worker_pids() -> list[int]:
    """Processes running a tensor-parallel worker, from /proc."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and WORKER in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:  # gone meanwhile
            continue
    return found


@pytest.fixture(scope="module")
def reference(trained_run):
    model, tokenizer, _ = load_trained(trained_run)
    return model, tokenizer, [tokenizer.encode(p).ids for p in PROMPTS]


@pytest.fixture(scope="module")
def workers(trained_run):
    w = TensorParallelWorkers(trained_run, tp=2)
    yield w
    w.close()


def test_workers_generate_what_one_process_generates(workers, reference):
    model, _, prompts = reference
    greedy = Decoding(max_new_tokens=MAX_TOKENS, temperature=0)
    assert workers.generate(prompts, greedy) == generate_ids(model, prompts, greedy)  # a left-padded batch
    sampled = Decoding(max_new_tokens=MAX_TOKENS, temperature=0.8, top_k=40, seed=7)
    assert workers.generate(prompts[:1], sampled) == generate_ids(model, prompts[:1], sampled)
    streamed: list[list[int]] = []
    rows = workers.generate(prompts[:1], greedy, on_token=lambda new: streamed.append(list(new)))
    assert streamed == [rows[0][:i] for i in range(1, len(rows[0]) + 1)]  # one report per token, in order


def test_workers_stop_at_stop_words_and_survive_a_refusal(workers, reference):
    model, _, prompts = reference
    greedy = Decoding(max_new_tokens=MAX_TOKENS, temperature=0)
    full = generate_ids(model, prompts[:1], greedy)[0]
    stop = (tuple(full[2:4]),)
    end = next(j for j in range(2, len(full) + 1) if tuple(full[j - 2:j]) == stop[0])  # its first occurrence
    assert workers.generate(prompts[:1], greedy, stop)[0] == full[:end]
    with pytest.raises(ValueError, match="context"):
        workers.generate([prompts[0] * 100], greedy)  # longer than the context: every rank refuses it
    assert workers.generate(prompts[:1], greedy)[0] == full


def test_each_worker_holds_about_half_the_weights(workers, reference):
    model = reference[0]
    full, _ = storage_bytes([*model.parameters(), *model.buffers()])
    assert len(workers.weight_bytes) == 2
    assert all(b < 0.6 * full for b in workers.weight_bytes), (workers.weight_bytes, full)
    assert sum(workers.weight_bytes) >= full  # the replicated parts (LayerNorms, positions, biases) twice


def test_a_tp_the_model_cannot_be_split_by_is_refused_before_any_process(trained_run):
    before = set(worker_pids())
    with pytest.raises(ValueError, match="n_head=2 is not divisible by the tensor-parallel size 3"):
        TensorParallelWorkers(trained_run, tp=3)
    with pytest.raises(ValueError, match="divisible by the tensor-parallel size 3"):
        render_repository(trained_run, Path("/nonexistent/never-written"), tp=3)
    assert set(worker_pids()) == before


def test_cli_refuses_a_tp_the_model_cannot_be_split_by(trained_run):
    from labs_lib.deploy.__main__ import main

    with pytest.raises(SystemExit, match="n_head=2 is not divisible by the tensor-parallel size 3: choose tp among"):
        main(["serve", "--checkpoint", str(trained_run), "--tp", "3"])


def _weight_bytes(metrics_url: str) -> dict[str, float]:
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    return {line.split('rank="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith("gpt_worker_weight_bytes{")}


def test_the_server_with_tp_2_serves_what_tp_1_serves(trained_run, reference, tmp_path):
    model, tokenizer, _ = reference
    d = Decoding(max_new_tokens=MAX_TOKENS, temperature=0)
    expected = {p: generate_text(model, tokenizer, p, d)[0] for p in PROMPTS}
    full, _ = storage_bytes([*model.parameters(), *model.buffers()])
    before = set(worker_pids())
    with TritonServer(render_repository(trained_run, tmp_path / "repository", tp=2), list(MODELS)) as server:
        assert len(set(worker_pids()) - before) == 2
        for prompt in PROMPTS:
            assert client.generate(server.http_url, prompt, MAX_TOKENS) == expected[prompt]
        assert "".join(client.generate_stream(server.http_url, PROMPTS[1], MAX_TOKENS)) == expected[PROMPTS[1]]
        shards = _weight_bytes(server.metrics_url)
        assert set(shards) == {"0", "1"} and all(b < 0.6 * full for b in shards.values()), shards
    assert set(worker_pids()) - before == set(), "tensor-parallel workers outlived the server"

"""3D parallelism end to end: the real training CLI under torchrun (gloo) on DP x TP x PP meshes vs one process."""

import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from multiproc import run_ranks

from labs_lib.core import checkpoint
from labs_lib.core.config import ParallelConfig
from labs_lib.core.runs import read_metrics
from labs_lib.jobs.launch import check, settings_args
from labs_lib.parallel.mesh import build_mesh

from conftest import run_train

pytestmark = pytest.mark.slow

# A model with 4 layers and 4 heads splits 2 and 4 ways; fp32, dropout 0: every layout must give the same losses.
TINY = dict(n_layer=4, n_head=4, n_embd=64, block_size=32, dropout=0.0, max_steps=5, eval_interval=5, eval_iters=1,
            checkpoint_interval=0)
GLOBAL_BATCH = 8


def losses(out):
    return torch.tensor([r["loss"] for r in read_metrics(out)], dtype=torch.float64)


def final_weights(out):
    return checkpoint.load_model_state(checkpoint.latest_checkpoint(out / "checkpoints"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ci_data):
    out = tmp_path_factory.mktemp("reference") / "run"
    run_train(out, batch_size=GLOBAL_BATCH, **TINY)
    return out


@pytest.mark.parametrize("dp, tp, pp, extra", [
    (1, 2, 1, {}),
    (1, 4, 1, {}),
    (1, 1, 2, {}),
    (1, 1, 4, {}),
    (2, 2, 1, {}),
    (2, 1, 2, {}),
    (1, 2, 2, {}),
    (2, 2, 2, {}),
    (1, 2, 1, dict(sequence_parallel=True)),
    # TP + SP inside pipeline stages (Megatron's 3D layout): stages exchange (b, T/t, C) sequence shards.
    (1, 2, 2, dict(sequence_parallel=True, pp_schedule="gpipe")),
    (1, 2, 2, dict(sequence_parallel=True, micro_batches=4)),
    (1, 2, 2, dict(sequence_parallel=True, pp_schedule="interleaved-1f1b", pp_chunks=2)),
    (1, 2, 2, dict(pp_schedule="gpipe", micro_batches=4)),
    (1, 1, 2, dict(pp_schedule="interleaved-1f1b", pp_chunks=2)),
], ids=lambda v: "-".join(f"{k}={w}" for k, w in v.items()) if isinstance(v, dict) else str(v))
def test_layout_matches_single_process(tmp_path, reference, dp, tp, pp, extra):
    """Same global batch (8 sequences: dp replicas x batch 8/dp, in pp micro-batches): same losses, same weights."""
    settings = dict(TINY, batch_size=GLOBAL_BATCH // dp, tp=tp, pp=pp, micro_batches=pp if pp > 1 else None)
    run_train(tmp_path / "run", nproc=dp * tp * pp, **(settings | extra))
    torch.testing.assert_close(losses(tmp_path / "run"), losses(reference), rtol=0, atol=1e-5)
    # Evaluation at the last step: a forward-only pass through the pipeline, averaged over the replicas.
    val_loss = read_metrics(tmp_path / "run")[-1]["val_loss"]
    assert val_loss == pytest.approx(read_metrics(reference)[-1]["val_loss"], abs=1e-5)
    # The checkpoint is single-device: the full weights, gathered from every TP and PP shard. Adam divides by
    # sqrt(v), so where a gradient is near 0 the sums TP splits differently move a weight by up to ~4e-5 here.
    weights, ref_weights = final_weights(tmp_path / "run"), final_weights(reference)
    assert weights.keys() == ref_weights.keys()
    for key, value in ref_weights.items():
        torch.testing.assert_close(weights[key], value, rtol=1e-4, atol=1e-4, msg=key)


def test_3d_run_resumes(tmp_path, ci_data):
    """(dp, tp, pp) = (1, 2, 2) with dropout: 6 steps straight vs 3 steps, then --resume to 6."""
    settings = dict(TINY, dropout=0.1, eval_interval=0, max_steps=6, lr_decay_steps=6, checkpoint_interval=3,
                    batch_size=4, tp=2, pp=2, micro_batches=2)
    run_train(tmp_path / "straight", nproc=4, **settings)
    out = tmp_path / "run"
    run_train(out, nproc=4, **(settings | dict(max_steps=3)))
    run_train(out, nproc=4, resume=True, **settings)
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 7))
    torch.testing.assert_close(losses(out), losses(tmp_path / "straight"), rtol=0, atol=1e-6)

    # Another layout cannot take over the per-shard optimizer state: it says which flags to use.
    other = run_train(out, nproc=2, check=False, resume=True, **(settings | dict(pp=1, micro_batches=None)))
    assert other.returncode != 0 and "resume with --tp 2 --pp 2 --pp-chunks 1" in other.stderr


@pytest.mark.parametrize("settings, world, match", [
    (dict(tp=2, pp=2, dp=2), 4, "launch 8 processes"),
    (dict(tp=3), 3, "divisors of n_head"),
    (dict(n_layer=4, pp=3, micro_batches=3), 3, "divisors of n_layer"),
    (dict(pp=4, micro_batches=2), 4, "raise --micro-batches to at least 4"),
    (dict(n_head=3, n_embd=48, tp=3), 3, "pad the vocabulary"),
    (dict(pp=2, micro_batches=3), 2, "divisors of the batch size"),
    (dict(tp=4, block_size=30, sequence_parallel=True), 4, "multiple of the tensor-parallel size"),
    (dict(tp=2, pp=2, micro_batches=2, block_size=31, sequence_parallel=True), 4, "multiple of the tensor-parallel"),
    (dict(micro_batches=2), 1, "--grad-accum"),
    (dict(pp=2, micro_batches=2, pp_schedule="interleaved-1f1b"), 2, "chunks >= 2"),
])
def test_bad_layout_fails_before_spawning(tmp_path, settings, world, match):
    with pytest.raises(ValueError, match=match):
        check("labs_lib.train.gpt", settings_args("ci", **(dict(n_layer=4, n_head=4) | settings)), tmp_path / "run",
              world)


def test_cli_rejects_a_bad_layout_at_once(tmp_path):
    out = tmp_path / "run"
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "labs_lib.train", "--profile", "ci", "--out", str(out),
                             "--tp", "2", "--pp", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and time.perf_counter() - start < 30
    assert "invalid configuration: world size 1 != dp*tp*pp" in result.stderr and "launch 4 processes" in result.stderr
    assert not out.exists()


def _mesh_coordinates(rank, world_size):
    mesh = build_mesh(ParallelConfig(tp=2, pp=2), rank, world_size)
    return ((mesh.dp_rank, mesh.tp_rank, mesh.pp_rank),
            [dist.get_process_group_ranks(g) for g in (mesh.tp_group, mesh.dp_group, mesh.pp_group)])


def test_mesh_puts_tensor_parallel_ranks_next_to_each_other():
    results = run_ranks(_mesh_coordinates, 8)
    assert results[5] == ((0, 1, 1), [[4, 5], [5, 7], [1, 5]])  # rank = (pp_rank * dp + dp_rank) * tp + tp_rank
    for rank, ((dp_rank, tp_rank, pp_rank), (tp_ranks, dp_ranks, pp_ranks)) in enumerate(results):
        assert rank == (pp_rank * 2 + dp_rank) * 2 + tp_rank
        assert tp_ranks == [rank - tp_rank, rank - tp_rank + 1]
        assert rank in tp_ranks and rank in dp_ranks and rank in pp_ranks

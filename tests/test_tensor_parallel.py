"""Tensor parallelism checked against one process and against torch's DTensor tensor parallelism.

Every multi-rank check runs on real gloo ranks (tests/multiproc.py) with a tiny fp32 GPT:
  * f/g: a column-split then row-split product of two matrices is the full product, gradients included; the
    sequence-parallel pair (all-gather / reduce-scatter along the sequence) likewise; so are the layers;
  * vocab-parallel cross-entropy equals F.cross_entropy (ignore_index too) without gathering the logits;
  * 5 AdamW steps without dropout give the single-process losses for tp=2 and tp=4, with and without sequence
    parallelism (and for two TP groups of 2 side by side on 4 ranks), and the reassembled first-step gradients
    equal the single-process ones; the shards reassemble to the full weights exactly; without targets the model
    returns the full logits;
  * with dropout, two runs from the same seed give identical losses, every TP rank the same loss, and the
    replicated weights stay identical across ranks (only the sharded regions draw per-rank masks);
  * torch's DTensor TP (parallelize_module, ColwiseParallel/RowwiseParallel, loss_parallel) gives our losses;
  * impossible splits raise ValueError naming the fix.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from multiproc import run_ranks

from labs_lib.core.config import GPTConfig, ParallelConfig, validate
from labs_lib.models.gpt import GPT
from labs_lib.parallel.comms import (
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)
from labs_lib.parallel.rng import TP_RNG, get_rng_tracker, tensor_parallel_manual_seed
from labs_lib.parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    apply_tensor_parallel,
    check_tensor_parallel,
    gather_full_state_dict,
    reduce_sequence_parallel_grads,
    shard_tensor,
    vocab_parallel_cross_entropy,
)

pytestmark = pytest.mark.slow

CFG = GPTConfig(vocab_size=128, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
BATCH, STEPS, LR = 4, 5, 1e-2


def _model(dropout: float = 0.0) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**CFG.to_dict(), "dropout": dropout}))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, CFG.vocab_size, (BATCH, CFG.block_size), generator=g),
             torch.randint(0, CFG.vocab_size, (BATCH, CFG.block_size), generator=g)) for _ in range(STEPS)]


def _plain(tensors: dict) -> dict:
    """numpy copies: tensors sent back from a rank travel as shared-memory handles that vanish when it exits."""
    return {name: t.detach().numpy().copy() for name, t in tensors.items()}


def _train(model, grads_of=None):
    """5 full-batch AdamW steps: (losses, first-step gradients by full-model name via ``grads_of(model)``)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, grads = [], None
    for step, (x, y) in enumerate(_batches()):
        loss = model(x, y)[1]
        loss.backward()
        reduce_sequence_parallel_grads(model)  # a no-op without sequence parallelism
        if step == 0 and grads_of is not None:
            grads = grads_of(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, grads


# ---------------------------------------------------------------------------------------------------------------
# The operators.


def _operators(rank, world_size):
    torch.manual_seed(0)  # same full tensors on every rank
    X, A, B, W = torch.randn(2, 8, 6), torch.randn(6, 8), torch.randn(8, 5), torch.randn(2, 8, 5)
    (X_ref, A_ref, B_ref) = (t.clone().requires_grad_() for t in (X, A, B))
    ((X_ref @ A_ref @ B_ref) * W).sum().backward()

    # Megatron MLP: f, X·A_r (A split by columns), ·B_r (B split by rows), g.
    X_ = X.clone().requires_grad_()
    A_r = shard_tensor(A, 1, rank, world_size).requires_grad_()
    B_r = shard_tensor(B, 0, rank, world_size).requires_grad_()
    Z = reduce_from_tensor_parallel_region(copy_to_tensor_parallel_region(X_) @ A_r @ B_r)
    (Z * W).sum().backward()
    mlp = [(Z, X_ref @ A_ref @ B_ref), (X_.grad, X_ref.grad), (A_r.grad, shard_tensor(A_ref.grad, 1, rank, world_size)),
           (B_r.grad, shard_tensor(B_ref.grad, 0, rank, world_size))]

    # Sequence parallel: X arrives split along the sequence; all-gather, the same products, reduce-scatter.
    X_s = shard_tensor(X, 1, rank, world_size).requires_grad_()
    A_r.grad = B_r.grad = None
    Z_s = reduce_scatter_to_sequence_parallel_region(gather_from_sequence_parallel_region(X_s) @ A_r @ B_r)
    (Z_s * shard_tensor(W, 1, rank, world_size)).sum().backward()
    seq = [(Z_s, shard_tensor(X_ref @ A_ref @ B_ref, 1, rank, world_size)),
           (X_s.grad, shard_tensor(X_ref.grad, 1, rank, world_size)),
           (A_r.grad, shard_tensor(A_ref.grad, 1, rank, world_size)),
           (B_r.grad, shard_tensor(B_ref.grad, 0, rank, world_size))]

    # Scatter then gather along the last dim is the identity, gradient too.
    X_g = X.clone().requires_grad_()
    Y = gather_from_tensor_parallel_region(scatter_to_tensor_parallel_region(X_g))
    (Y * X).sum().backward()
    last = [(Y, X), (X_g.grad, X)]

    # The layers built directly: each rank slices the same full initialisation, so the pair is one full MLP.
    torch.manual_seed(1)
    pair = torch.nn.Sequential(ColumnParallelLinear(6, 8), RowParallelLinear(8, 5))
    full = gather_full_state_dict(pair)
    dense = F.linear(F.linear(X, full["0.weight"], full["0.bias"]), full["1.weight"], full["1.bias"])
    layers = [(pair(X), dense)]
    return [torch.allclose(a.detach(), b.detach(), atol=1e-5) for a, b in mlp + seq + last + layers]


def test_f_and_g_give_the_full_product_and_gradients():
    for rank, ok in enumerate(run_ranks(_operators, 2)):
        assert all(ok), f"rank {rank}: mismatches at {[i for i, o in enumerate(ok) if not o]}"


# ---------------------------------------------------------------------------------------------------------------
# Vocab-parallel cross-entropy.


def _cross_entropy(rank, world_size):
    torch.manual_seed(0)
    logits = torch.randn(3, 7, CFG.vocab_size) * 30  # large: exp() would overflow without the max shift in fp16
    targets = torch.randint(0, CFG.vocab_size, (3, 7))
    targets[0, :3] = -100
    full = logits.clone().requires_grad_()
    ref = F.cross_entropy(full.view(-1, CFG.vocab_size), targets.view(-1), ignore_index=-100)
    ref.backward()
    shard = shard_tensor(logits, -1, rank, world_size).requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, targets)
    loss.backward()
    return (loss.item(), ref.item(), torch.allclose(shard.grad, shard_tensor(full.grad, -1, rank, world_size),
                                                    atol=1e-6))


def test_vocab_parallel_cross_entropy_matches_f_cross_entropy():
    for loss, ref, grads_ok in run_ranks(_cross_entropy, 2):
        assert loss == pytest.approx(ref, abs=1e-5)
        assert grads_ok


# ---------------------------------------------------------------------------------------------------------------
# Training equals one process.


def _reference():
    return _train(_model(), lambda m: {n: p.grad.clone() for n, p in m.named_parameters()})


def _train_tp(rank, world_size):
    """Per sequence-parallel setting: (losses, first-step grads, weights round-trip, full logits match)."""
    # On 4 ranks also two TP groups of 2 side by side (as under DP x TP): the layers must use their group's rank.
    settings = [(False, None), (True, None)]
    if world_size == 4:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
        settings.append((True, pairs[rank // 2]))
    results = {}
    x = _batches()[0][0]
    for sp, group in settings:
        reference = _model()
        model = apply_tensor_parallel(_model(), group, sequence_parallel=sp)
        full = gather_full_state_dict(model)  # the model's own group
        round_trip = all(torch.equal(t, reference.state_dict()[n]) for n, t in full.items())
        logits_match = torch.allclose(model(x)[0], reference(x)[0], atol=1e-5)  # no targets: the full logits
        losses, grads = _train(model, lambda m, g=group: _plain(gather_full_state_dict(m, g, grads=True)))
        results[f"sp={sp} tp={dist.get_world_size(group)}"] = losses, grads, round_trip, logits_match
    return results


@pytest.mark.parametrize("tp", [2, 4])
def test_training_matches_single_process(tp):
    ref_losses, ref_grads = _reference()
    for rank, result in enumerate(run_ranks(_train_tp, tp)):
        assert len(result) == (3 if tp == 4 else 2)
        for setting, (losses, grads, round_trip, logits_match) in result.items():
            assert round_trip, f"{setting}: gather_full_state_dict does not give back the full weights"
            assert logits_match, f"{setting}: full logits differ from the single-device model's"
            assert losses == pytest.approx(ref_losses, abs=1e-5), f"{setting} rank {rank}"
            for name, ref in ref_grads.items():
                assert torch.allclose(torch.from_numpy(grads[name]), ref, atol=1e-5), f"{setting} rank {rank}: {name}"


# ---------------------------------------------------------------------------------------------------------------
# Dropout: per-rank masks inside the sharded regions, shared masks outside, reproducible run to run.


def _dropout(rank, world_size):
    tensor_parallel_manual_seed(1234)
    with get_rng_tracker().fork():
        sharded_draw = torch.rand(4)
    replicated_draw = torch.rand(4)
    results = _plain({"sharded_draw": sharded_draw, "replicated_draw": replicated_draw})
    # Without sequence parallelism only the attention dropout is sharded (heads): it must draw from the TP stream.
    model = apply_tensor_parallel(_model(dropout=0.1))
    tensor_parallel_manual_seed(1234)
    before = get_rng_tracker().states[TP_RNG][0].clone()
    model(*_batches()[0])
    results["attention_used_tp_stream"] = not torch.equal(before, get_rng_tracker().states[TP_RNG][0])
    for sp in (False, True):
        runs = []
        for _ in range(2):
            model = apply_tensor_parallel(_model(dropout=0.1), sequence_parallel=sp)
            tensor_parallel_manual_seed(1234)
            runs.append(_train(model)[0])
        replicated = _plain({n: p for n, p in model.named_parameters() if not hasattr(p, "tp_dim")})
        results[sp] = (runs, replicated)
    return results


def test_dropout_is_reproducible_and_replicated_regions_agree():
    results = run_ranks(_dropout, 2)
    assert (results[0]["sharded_draw"] != results[1]["sharded_draw"]).all()  # per-rank stream
    assert (results[0]["replicated_draw"] == results[1]["replicated_draw"]).all()  # shared stream
    assert results[0]["attention_used_tp_stream"]
    no_dropout_losses = _train(_model())[0]
    for sp in (False, True):
        (runs0, replicated0), (runs1, replicated1) = results[0][sp], results[1][sp]
        assert runs0[0] == runs0[1], f"sp={sp}: same seed, different losses"
        assert runs0[0] == runs1[0], f"sp={sp}: the TP ranks disagree on the loss"
        assert runs0[0] != pytest.approx(no_dropout_losses, abs=1e-4), f"sp={sp}: dropout had no effect"
        for name, p in replicated0.items():
            assert (p == replicated1[name]).all(), f"sp={sp}: replicated {name} drifted apart across ranks"


# ---------------------------------------------------------------------------------------------------------------
# The production implementation: torch's DTensor tensor parallelism.


def _dtensor_tp(rank, world_size):
    """The same GPT under DTensor TP. ColwiseParallel splits a weight into contiguous row blocks, so the fused qkv
    rows are first reordered to [q_0; k_0; v_0; q_1; ...] for rank r's block to hold its heads' q, k and v."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, loss_parallel, parallelize_module

    ours = _train(apply_tensor_parallel(_model()))[0]

    model = _model()
    with torch.no_grad():
        for block in model.blocks:
            for p in (block.attn.qkv.weight, block.attn.qkv.bias):
                p.copy_(torch.cat([shard_tensor(p, 0, r, world_size, fused=3) for r in range(world_size)]))
    plan = {"tok_emb": RowwiseParallel(input_layouts=Replicate()),  # vocab-parallel embedding
            "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)}  # vocab-sharded logits
    for i in range(CFG.n_layer):
        plan |= {f"blocks.{i}.attn.qkv": ColwiseParallel(), f"blocks.{i}.attn.proj": RowwiseParallel(),
                 f"blocks.{i}.mlp.fc": ColwiseParallel(), f"blocks.{i}.mlp.proj": RowwiseParallel()}
    parallelize_module(model, init_device_mesh("cpu", (world_size,)), plan)
    model.lm_head.weight = model.tok_emb.weight  # parallelize_module distributed the two uses separately: tie again
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    theirs = []
    for x, y in _batches():
        with loss_parallel():  # cross-entropy on the vocab-sharded DTensor logits
            loss = model(x, y)[1]
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        theirs.append(loss.full_tensor().item())
    return ours, theirs


def test_matches_dtensor_tensor_parallel():
    for ours, theirs in run_ranks(_dtensor_tp, 2):
        assert ours == pytest.approx(theirs, abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Impossible splits are caught before anything runs.


@pytest.mark.parametrize("changes, tp, seq_len, fix", [
    (dict(n_head=6), 4, None, "divisors of n_head"),
    (dict(vocab_size=130), 4, None, "vocab_size=256"),
    ({}, 4, 18, "multiple of the tensor-parallel size"),
])
def test_bad_configs_name_the_fix(changes, tp, seq_len, fix):
    config = GPTConfig(**{**CFG.to_dict(), **changes, "n_embd": 48})
    with pytest.raises(ValueError, match=fix):
        check_tensor_parallel(config, tp, seq_len=seq_len, sequence_parallel=seq_len is not None)
    if seq_len is None:  # labs_lib.core.config.validate catches the same before any process is spawned
        with pytest.raises(ValueError, match="divisible by tp=4"):
            validate(config, parallel=ParallelConfig(tp=tp), world_size=tp)

"""The code-writing exercises of labs 01, 02 and 06: a right function passes, the unanswered stub lets the notebook
run on (no exception), and a typical wrong one fails with the hint that names its mistake. The references are the
labs' own: one process's backward on the whole batch (01), step_breakdown on the trace (02), the ViT's patch
embedding (06)."""

import json

import pytest
import torch.nn.functional as F

from labs_lib.labs import lab01, lab02, lab06
from labs_lib.labs.checks import hint


def stub(*args):
    """The notebook's starter: a body of ``...``."""
    ...


# --------------------------------------------------------------------------------------- lab 01: a DDP step by hand

def ddp_step(model, x, y, rank, world_size, all_reduce):
    x_mine, y_mine = x.chunk(world_size)[rank], y.chunk(world_size)[rank]
    _, loss = model(x_mine, y_mine)
    loss.backward()
    for p in model.parameters():
        p.grad = all_reduce(p.grad) / world_size
    return all_reduce(loss.detach()) / world_size


def ddp_step_strided(model, x, y, rank, world_size, all_reduce):
    """Another fair split of the batch (every world_size-th sequence): the same averaged gradient."""
    _, loss = model(x[rank::world_size], y[rank::world_size])
    loss.backward()
    for p in model.parameters():
        p.grad = all_reduce(p.grad) / world_size
    return (all_reduce(loss.detach()) / world_size).item()


def ddp_step_summed(model, x, y, rank, world_size, all_reduce):
    x_mine, y_mine = x.chunk(world_size)[rank], y.chunk(world_size)[rank]
    _, loss = model(x_mine, y_mine)
    loss.backward()
    for p in model.parameters():
        p.grad = all_reduce(p.grad)  # the sum, not the average
    return all_reduce(loss.detach()) / world_size


def ddp_step_whole_batch(model, x, y, rank, world_size, all_reduce):
    _, loss = model(x, y)  # every rank on the whole batch: right gradients, world_size times the work
    loss.backward()
    for p in model.parameters():
        p.grad = all_reduce(p.grad) / world_size
    return all_reduce(loss.detach()) / world_size


def ddp_step_unsynchronised(model, x, y, rank, world_size, all_reduce):
    _, loss = model(x.chunk(world_size)[rank], y.chunk(world_size)[rank])
    loss.backward()  # no all-reduce: the replicas drift apart
    return loss.item()


# ------------------------------------------------------------------------ lab 02: exposed communication of a step

def exposed_ms(compute, comm):
    exposed = 0.0
    for c_start, c_end in comm:
        hidden = sum(max(0.0, min(c_end, end) - max(c_start, start)) for start, end in compute)
        exposed += (c_end - c_start) - hidden
    return exposed / 1e3


def all_comm_ms(compute, comm):
    return sum(end - start for start, end in comm) / 1e3  # forgets that overlapped communication is hidden


def exposed_us(compute, comm):
    return exposed_ms(compute, comm) * 1e3


@pytest.fixture
def traces(tmp_path):
    """Two ranks' Chrome traces as the profiler writes them on CPU: two steps each, operators on the training
    thread (one a collective's c10d call), gloo's all-reduces on its worker thread, partly hidden behind compute."""
    def op(name, ts, dur, tid=1, cat="cpu_op"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "pid": 1}

    files = {}
    for rank in (0, 1):
        events = [op("ProfilerStep#2", 1000, 500, cat="user_annotation"),
                  op("ProfilerStep#3", 1500, 400, cat="user_annotation"),
                  op("aten::mm", 1000, 150 + 10 * rank), op("aten::addmm", 1200, 100), op("aten::mm", 1250, 50),
                  op("c10d::allreduce_", 1360, 5), op("gloo:all_reduce", 1340, 120 + 30 * rank, 7, "user_annotation"),
                  op("aten::mm", 1500, 200), op("gloo:all_reduce", 1650, 300, 7, "user_annotation")]
        files[rank] = tmp_path / f"rank{rank}.123.pt.trace.json"
        files[rank].write_text(json.dumps({"traceEvents": events}))
    return files


def test_exposed_communication_right(traces, capsys):
    assert lab02.check_exposed_communication(exposed_ms, traces) is True
    out = capsys.readouterr().out
    assert "✅" in out and "all 4 profiled steps of 2 ranks" in out


def test_exposed_communication_unanswered(traces, capsys):
    assert lab02.check_exposed_communication(stub, traces) is False
    assert lab02.check_exposed_communication(None, traces) is False
    assert capsys.readouterr().out.count("not answered yet") == 2


@pytest.mark.parametrize("fn, message", [
    (all_comm_ms, "that is all of the communication: subtract the part of it that runs while compute runs"),
    (exposed_us, "in microseconds (the trace's unit): return milliseconds"),
])
def test_exposed_communication_wrong(fn, message, traces, capsys):
    with pytest.raises(AssertionError, match="not right") as error:
        lab02.check_exposed_communication(fn, traces)
    assert message in str(error.value) and "the worked example" in str(error.value)
    hint(lab02.EXPOSED)
    assert "hidden = sum(max(0, min(ce, e) - max(cs, s))" in capsys.readouterr().out


def test_exposed_communication_checks_the_real_steps_too(traces):
    """Right on the worked example only (it hard-codes it): the run's own steps catch it."""
    with pytest.raises(AssertionError, match="rank 0, ProfilerStep#2"):
        lab02.check_exposed_communication(lambda compute, comm: 0.02, traces)


# --------------------------------------------------------------------------------------------- lab 06: patchify

def patchify(images, patch_size):
    B, C, H, W = images.shape
    P = patch_size
    patches = images.reshape(B, C, H // P, P, W // P, P).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(B, (H // P) * (W // P), C * P * P)


def patchify_unfold(images, patch_size):
    return F.unfold(images, patch_size, stride=patch_size).transpose(1, 2)


def patchify_by_columns(images, patch_size):
    B, C, H, W = images.shape
    P = patch_size
    patches = images.reshape(B, C, H // P, P, W // P, P).permute(0, 4, 2, 1, 3, 5)  # column by column
    return patches.reshape(B, (H // P) * (W // P), C * P * P)


def patchify_rows_of_pixels(images, patch_size):
    B = images.size(0)
    return images.reshape(B, -1, patch_size * patch_size)  # consecutive pixels, not squares


# ------------------------------------------------------------------- labs 01 and 06: one table, the same three tests
# exercise -> (its check, the right ways, the wrong ones with the words their hint must say, the stronger hint's)
EXERCISES = {
    "data_parallel_step": (lab01.check_data_parallel_step, lab01.DDP_STEP, [ddp_step, ddp_step_strided], [
        (ddp_step_summed, "4x one process's: all_reduce sums over the ranks; divide by world_size"),
        (ddp_step_whole_batch, "on 32 sequences in all, the batch has 8"),
        (ddp_step_unsynchronised, "differs from one process's on the whole batch"),
    ], "all_reduce(p.grad) / world_size"),
    "patchify": (lab06.check_patchify, lab06.PATCHIFY, [patchify, patchify_unfold], [
        (patchify_by_columns, "the right patches in the wrong order (column by column)"),
        (patchify_rows_of_pixels, "every patch must hold exactly its P x P square's pixels"),
        (lambda images, patch_size: patchify(images, 4), "P=2: the patches must be (batch, (8 / P)**2 patches"),
    ], ".permute(0, 2, 4, 1, 3, 5)"),
}
RIGHT = [(name, fn) for name, (_, _, right, _, _) in EXERCISES.items() for fn in right]
WRONG = [(name, fn, words) for name, (_, _, _, wrong, _) in EXERCISES.items() for fn, words in wrong]


@pytest.mark.parametrize("name, fn", RIGHT)
def test_a_right_answer_passes(name, fn, capsys):
    assert EXERCISES[name][0](fn) is True
    assert "✅" in capsys.readouterr().out


@pytest.mark.parametrize("name", EXERCISES)
def test_the_unanswered_stub_lets_the_notebook_run_on(name, capsys):
    check = EXERCISES[name][0]
    assert check(stub) is False
    assert check(None) is False
    assert capsys.readouterr().out.count("not answered yet") == 2


@pytest.mark.parametrize("name, fn, words", WRONG)
def test_a_wrong_answer_fails_naming_its_mistake(name, fn, words, capsys):
    check, title, _, _, stronger = EXERCISES[name]
    with pytest.raises(AssertionError, match="not right") as error:
        check(fn)
    assert words in str(error.value)
    hint(title)
    assert stronger in capsys.readouterr().out

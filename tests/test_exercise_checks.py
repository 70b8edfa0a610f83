"""The training labs' exercise checks: the expected values live in labs_lib.labs.labNN (the notebooks show none),
a right answer passes, a wrong one fails with its hint, no answer lets the notebook run on, and hint(name) gives the
stronger hint."""

import json

import pytest
import torch
import torch.nn.functional as F

from labs_lib.labs import lab00, lab01, lab03, lab04, lab06
from labs_lib.labs.checks import hint


@pytest.mark.parametrize("check, right, wrong", [
    (lab00.check_hello_tasks, 2, 4),
    (lab00.check_allreduce_sum, 78, 66),
    (lab01.check_training_state_gb, 124_439_808 * 16 / 1e9, 124_439_808 * 12 / 1e9),
    (lab03.check_bytes_per_param, 16, 12),
    (lab03.check_zero3_gb, 1.875, 16.6),
    (lab04.check_operator, "F", "g"),
    (lab06.check_vit_flops, None, 1),
], ids=lambda v: getattr(v, "__name__", None))
def test_right_passes_wrong_fails(check, right, wrong, capsys):
    if right is not None:
        assert check(right)
    with pytest.raises(AssertionError, match="not right"):
        check(wrong)
    assert check(None) is False and "not answered yet" in capsys.readouterr().out


def test_the_stronger_hint_waits_to_be_asked(capsys):
    with pytest.raises(AssertionError, match=r"Stuck\? hint\('bytes per parameter, mixed-precision Adam'\)"):
        lab03.check_bytes_per_param(12)
    assert "2 (16-bit weights)" not in capsys.readouterr().out
    hint("bytes per parameter, mixed-precision Adam")
    assert "2 (16-bit weights)" in capsys.readouterr().out
    hint("no such exercise")
    assert "no stronger hint for 'no such exercise'" in capsys.readouterr().out


def test_tokens_per_step_comes_from_the_run(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"train": {"batch_size": 8, "grad_accum": 2}, "world_size": 4,
                                                      "model": {"block_size": 64}}))
    assert lab01.check_tokens_per_step(8 * 2 * 4 * 64, tmp_path)
    with pytest.raises(AssertionError):
        lab01.check_tokens_per_step(8 * 4 * 64, tmp_path)


def test_row_parallel_and_mlp_params():
    def right(x_shard, w_shard, bias, all_reduce):
        return all_reduce(F.linear(x_shard, w_shard)) + bias

    def bias_twice(x_shard, w_shard, bias, all_reduce):
        return all_reduce(F.linear(x_shard, w_shard, bias))

    assert lab04.check_row_parallel(right)
    with pytest.raises(AssertionError):
        lab04.check_row_parallel(bias_twice)
    assert lab04.check_row_parallel(lambda *args: None) is False
    assert lab04.check_mlp_params(lambda h, t: (8 * h * h + 4 * h) // t + h, 64)
    with pytest.raises(AssertionError):
        lab04.check_mlp_params(lambda h, t: (8 * h * h + 5 * h) // t, 64)


def test_patches_and_optimizer_state():
    assert lab06.check_patches(16, 17)
    with pytest.raises(AssertionError, match="sequence length"):
        lab06.check_patches(16, 16)
    assert lab06.check_optimizer_gb(12 * 1.5e9 / 16 / 1e9, 18.0)
    with pytest.raises(AssertionError, match="plain data parallel"):
        lab06.check_optimizer_gb(1.125, 1.125)


def test_accumulation_check():
    def accumulate(model, x, y, micro_batches):
        total = 0.0
        for xm, ym in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
            loss = model(xm, ym)[1] / micro_batches
            loss.backward()
            total += loss.item()
        return total

    def no_scaling(model, x, y, micro_batches):
        for xm, ym in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
            model(xm, ym)[1].backward()
        return 0.0

    torch.manual_seed(0)
    assert lab03.check_accumulation(accumulate)
    with pytest.raises(AssertionError):
        lab03.check_accumulation(no_scaling)

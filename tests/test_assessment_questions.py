"""The assessment's checks without nbgrader: right answers pass, typical wrong ones fail with a hint that does not
state the answer, the hidden cases catch what the visible ones let through; the grading helpers' own rules."""

from __future__ import annotations

import json
import zipfile

import nbformat
import pytest
import torch
import torch.nn.functional as F

from labs_lib.grading import course as C
from labs_lib.grading import practical as P
from labs_lib.grading import questions as Q


def row_parallel(x_shard, weight_shard, bias, all_reduce):
    return all_reduce(x_shard @ weight_shard.t()) + bias


def decode_step(attn, x_new, past_k, past_v):
    q, k_new, v_new = attn.split_heads(x_new)
    k, v = torch.cat([past_k, k_new], dim=2), torch.cat([past_v, v_new], dim=2)
    y = F.scaled_dot_product_attention(q, k, v)
    return attn.proj(y.transpose(1, 2).reshape(x_new.size(0), 1, -1)), k, v


def accumulate(model, x, y, micro_batches):
    total = 0.0
    for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
        loss = model(xs, ys)[1]
        (loss / micro_batches).backward()
        total += loss.item() / micro_batches
    return total


def top_k(logits, k):
    top, experts = logits.softmax(-1).topk(k, dim=-1)
    return (top / top.sum(-1, keepdim=True) if k > 1 else top), experts


@pytest.mark.parametrize("hidden", [False, True])
def test_right_answers_pass(hidden):
    Q.check_row_parallel(row_parallel, hidden)
    Q.check_warmup(lambda s, p, m: min(p - s - 1, m), hidden)
    Q.check_accumulation(accumulate, hidden)
    Q.check_top_k(top_k, hidden)
    Q.check_decode_step(decode_step, hidden)


def test_numbers_within_tolerance_and_the_visible_test_only_checks_the_form():
    expected = {name: value() for name, value in Q.NUMBERS.items()}
    assert expected["zero_gb"] == pytest.approx(13e9 * (2 + 14 / 64) / 1e9)
    assert expected["bubble"] == pytest.approx(7 / 31)
    for name, value in expected.items():
        Q.check_number(name, value * 1.009, hidden=True)
        Q.check_number(name, 123.0)  # visible: any positive number
        with pytest.raises(AssertionError, match="not within 1%") as err:
            Q.check_number(name, value * 1.02, hidden=True)
        assert f"{value:.3g}" not in str(err.value), "the hint must not give the answer"
    for bad in ("3", float("nan"), -1.0, True, None):
        with pytest.raises(AssertionError):
            Q.check_number("bubble", bad)


def test_wrong_answers_fail_with_a_hint():
    bias_first = lambda x, w, b, all_reduce: all_reduce(x @ w.t() + b)  # noqa: E731
    with pytest.raises(AssertionError, match="bias was added on every rank"):
        Q.check_row_parallel(bias_first)
    no_scaling = lambda model, x, y, m: [model(xs, ys)[1].backward() for xs, ys in zip(x.chunk(m), y.chunk(m))]  # noqa
    with pytest.raises(AssertionError, match="scale each micro-batch's loss"):
        Q.check_accumulation(no_scaling)
    with pytest.raises(AssertionError, match="gates are off"):
        Q.check_top_k(lambda logits, k: logits.softmax(-1).topk(k, dim=-1))
    with pytest.raises(AssertionError, match="is not a function yet"):
        Q.check_decode_step(None)


def test_hidden_cases_catch_what_the_visible_ones_let_through():
    no_min = lambda stage, stages, micro: stages - stage - 1  # noqa: E731  (right while micro >= stages)
    Q.check_warmup(no_min)
    with pytest.raises(AssertionError, match="is not the warm-up count"):
        Q.check_warmup(no_min, hidden=True)
    tp2_only = lambda x, w, b, all_reduce: all_reduce(x @ w.t() + b / 2)  # noqa: E731  (2 ranks hard-coded)
    Q.check_row_parallel(tp2_only)
    with pytest.raises(AssertionError, match="tp=4"):
        Q.check_row_parallel(tp2_only, hidden=True)


def test_a_job_config_is_refused_before_anything_is_submitted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="must be a dict"):
        P.run_job("job_a", None)
    with pytest.raises(ValueError, match="unknown setting"):
        P.run_job("job_a", {}, zero_stage=3)
    with pytest.raises(ValueError, match="stage"):
        P.run_job("job_a", {"zero_optimization": {"stage": 5}})
    assert not (tmp_path / "runs" / "job_a").exists()


def test_deepspeed_json_drives_the_loop_and_a_conflict_is_refused(tmp_path):
    from labs_lib.train.deepspeed.gpt import build_parser, configs_from_args

    def configs(*argv):
        return configs_from_args(build_parser().parse_args(["--out", "x", "--profile", "ci", *argv]))

    _, train, _ = configs("--ds-config", "zero2.json", "--grad-accum", "3")
    assert train.grad_accum == 3  # "auto" in the JSON: the flag decides
    path = tmp_path / "accum.json"
    path.write_text(json.dumps({**P.example_config("zero2.json"), "gradient_accumulation_steps": 2,
                                "bf16": {"enabled": True}}))
    _, train, _ = configs("--ds-config", str(path))
    assert train.grad_accum == 2 and train.dtype == "bf16"
    with pytest.raises(ValueError, match="give it in one place"):
        configs("--ds-config", str(path), "--grad-accum", "4")


def test_restore_test_cells_puts_deleted_tests_back_in_place():
    source = nbformat.read(C.COURSE_SOURCE / "source" / C.ASSIGNMENT / C.NOTEBOOK, as_version=4)
    nb = nbformat.from_dict(json.loads(json.dumps(source)))
    ids = [c.metadata["nbgrader"]["grade_id"] for c in nb.cells]
    nb.cells = [c for c in nb.cells if c.metadata["nbgrader"]["grade_id"] not in ("q4_test", "run_job_b", "intro")]
    assert C.restore_test_cells(nb, source) == 3
    assert [c.metadata["nbgrader"]["grade_id"] for c in nb.cells] == ids


def test_damaged_submissions_are_named(tmp_path):
    bad = tmp_path / "a.ipynb"
    bad.write_text("{oops")
    with pytest.raises(ValueError, match=r"is not a notebook \(invalid JSON\)"):
        C.read_submission(bad)
    bad.write_text('{"cells": 3}')
    with pytest.raises(ValueError, match="not a valid notebook"):
        C.read_submission(bad)


def test_collect_takes_folders_files_and_zips(tmp_path):
    root = C.course_root(tmp_path / "course")
    inbox = tmp_path / "inbox"
    (inbox / "Ada Lovelace").mkdir(parents=True)
    (inbox / "Ada Lovelace" / "my work.ipynb").write_text("{}")
    (inbox / "grace.ipynb").write_text("{}")
    assert C.collect(inbox, root) == ["Ada_Lovelace", "grace"]
    assert (root / "submitted" / "Ada_Lovelace" / C.ASSIGNMENT / C.NOTEBOOK).exists()
    assert (root / "submitted" / "grace" / C.ASSIGNMENT / "timestamp.txt").exists()
    with zipfile.ZipFile(tmp_path / "class.zip", "w") as z:  # a class folder zipped
        z.write(inbox / "grace.ipynb", "class/linus.ipynb")
        z.write(inbox / "grace.ipynb", "class/margaret/assessment.ipynb")
    assert C.collect(tmp_path / "class.zip", root) == ["linus", "margaret"]
    with zipfile.ZipFile(tmp_path / "one.zip", "w") as z:  # one learner's folder zipped
        z.write(inbox / "grace.ipynb", "alan/assessment.ipynb")
    assert C.collect(tmp_path / "one.zip", root) == ["alan"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no notebooks"):
        C.collect(tmp_path / "empty", root)

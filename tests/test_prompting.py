"""Lab 11's parts: the task suite and its scorers, the prompt builders, the measurement, the exercise checks, the
fine-tune's --init-from, and the Hugging Face completer against local generation on the same weights."""

import json
import random
import re
import subprocess
import sys

import pytest

from labs_lib.data.tasks import (
    CLOSED_CLASS,
    TASKS,
    episode,
    example_pool,
    held_out_items,
    is_held_out,
    train_items,
    write_finetune_data,
)
from labs_lib.inference.generate import Decoding
from labs_lib.inference.prompting import (
    Prompting,
    build,
    evaluate,
    hf_completer,
    local_completer,
    measure,
    summarize,
)
from labs_lib.labs import lab11

ANSWERS = {("type", "[1, 2]"): "list", ("type", "None"): "NoneType", ("type", "(3,)"): "tuple",
           ("type", "-7"): "int", ("truth", "0.0"): "False", ("truth", "'a'"): "True", ("truth", "{}"): "False",
           ("length", "{'a': 1, 'b': 2}"): "2", ("length", "''"): "0", ("length", "(1, 2, 3)"): "3"}


@pytest.mark.parametrize("case", ANSWERS, ids=lambda c: f"{c[0]}:{c[1]}")
def test_answers_are_python_s(case):
    name, text = case
    assert TASKS[name].answer(text) == ANSWERS[case]


def test_scorer_reads_the_first_line_only():
    task = TASKS["type"]
    assert task.score("[1]", " list\nInput: 3\nOutput: int")
    assert task.score("[1]", "list  ")
    assert not task.score("[1]", " lists")
    assert not task.score("[1]", "\nlist")
    assert not task.score("[1]", " tuple")


def test_held_out_items_never_reach_the_training_text(tmp_path):
    data = write_finetune_data(tmp_path / "mix", episodes=2000, corpus_bytes=1000)
    seen = set(re.findall(r"^Input: (.*)$", (data / "tasks.txt").read_text(), flags=re.M))
    assert (data / "corpus.py").stat().st_size == 1000
    for task in TASKS.values():
        held = set(held_out_items(task, 300))
        assert held and not any(is_held_out(x) for x in seen)
        assert not (held & seen) - set(CLOSED_CLASS), "a held-out literal was trained on"
        assert not any(is_held_out(x) for x in train_items(task, 300))


def test_finetune_data_is_kept_when_its_settings_match(tmp_path):
    first = write_finetune_data(tmp_path / "mix", episodes=50, corpus_bytes=100)
    stamp = (first / "tasks.txt").stat().st_mtime_ns
    write_finetune_data(tmp_path / "mix", episodes=50, corpus_bytes=100)
    assert (first / "tasks.txt").stat().st_mtime_ns == stamp
    write_finetune_data(tmp_path / "mix", episodes=60, corpus_bytes=100)
    assert (first / "tasks.txt").read_text().count("\n\n") == 60


def test_episodes_are_in_the_trained_format():
    text = episode(random.Random(0))
    lines = text.strip().split("\n")
    if lines[0].startswith("Task: "):
        assert lines[0][len("Task: "):] in {t.instruction for t in TASKS.values()}
        lines = lines[1:]
    assert lines and len(lines) % 2 == 0
    assert all(a.startswith("Input: ") and b.startswith("Output: ") for a, b in zip(lines[::2], lines[1::2]))


def test_every_answer_has_an_example():
    for task in TASKS.values():
        answers = {task.answer(x) for x in held_out_items(task, 300)}
        assert answers <= {task.answer(x) for x in example_pool(task)}


def test_templates_render_the_parts_in_order():
    task = TASKS["length"]
    rng = random.Random(0)
    prompt, answer = build(task, "[1, 2]", Prompting(template="qa", shots=2), rng, pool=["[5]", "()"])
    assert answer == "2"
    lines = prompt.split("\n")
    assert lines[0] == "Question: How many items?" and lines[-2:] == ["Q: [1, 2]", "A:"]
    assert sorted(lines[1:5]) == sorted(["Q: [5]", "A: 1", "Q: ()", "A: 0"])
    prompt, _ = build(task, "[1, 2]", Prompting(instruction=False), rng)
    assert prompt == "Input: [1, 2]\nOutput:"
    prompt, _ = build(task, "[1, 2]", Prompting(template="arrow", instruction=False), rng)
    assert prompt == "[1, 2] ->"


@pytest.mark.parametrize("order", ["same answer last", "other answer last"])
def test_the_order_puts_the_chosen_example_last(order):
    task = TASKS["truth"]
    rng = random.Random(1)
    for query in held_out_items(task, 20):
        prompt, answer = build(task, query, Prompting(shots=3, order=order), rng)
        last = prompt.split("\n")[-3]  # "Output: <the last example's answer>"
        assert (last == f"Output: {answer}") == (order == "same answer last")


@pytest.mark.parametrize("bad, words", [(dict(template="chat"), "template 'chat'"), (dict(shots=-1), "shots=-1"),
                                        (dict(order="same answer last"), "needs examples"),
                                        (dict(decoding="hot"), "decoding 'hot'")])
def test_bad_settings_are_refused_naming_the_fix(bad, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        Prompting(**bad).check()


def oracle(prompts: list[str], d: Decoding) -> list[str]:
    """A 'model' that answers right exactly when the prompt has the trained format and names its task (by the
    instruction line or by an example's answer): what lab 11's fine-tune learns, in Python."""
    by_instruction = {f"Task: {t.instruction}": t for t in TASKS.values()}
    out = []
    for p in prompts:
        lines = p.split("\n")
        query = lines[-2][len("Input: "):] if lines[-1] == "Output:" else None
        task = by_instruction.get(lines[0])
        if task is None and len(lines) > 2 and lines[1].startswith("Output: "):
            example, said = lines[0][len("Input: "):], lines[1][len("Output: "):]
            task = next((t for t in TASKS.values() if _answers(t, example) == said), None)
        out.append(f" {task.answer(query)}\nInput:" if task and query else " ?")
    return out


def _answers(task, text):
    try:
        return task.answer(text)
    except TypeError:
        return None


def test_measure_and_summarize_count_what_the_completer_gets_right():
    settings = [Prompting(), Prompting(instruction=False), Prompting(template="qa"), Prompting(shots=1,
                                                                                             instruction=False)]
    rows = measure(oracle, [TASKS["type"], TASKS["length"]], settings, seeds=(0, 1), items=10, progress=False)
    assert len(rows) == 2 * 4 * 2
    table = {(r["task"], r["template"], r["instruction"], r["shots"]): r for r in summarize(rows)}
    assert table[("type", "trained", True, 0)]["mean"] == 1.0
    assert table[("type", "trained", False, 0)]["mean"] == 0.0
    assert table[("type", "qa", True, 0)]["mean"] == 0.0
    assert table[("length", "trained", False, 1)]["mean"] > 0.5  # the example names the task (mostly)
    gap = lab11.largest_gap(rows, "template")
    assert gap["best"] == "trained" and gap["difference"] > gap["seed_spread"]


def test_evaluate_asks_the_same_items_for_every_setting():
    a = evaluate(oracle, TASKS["truth"], Prompting(), items=8, seed=3)
    b = evaluate(oracle, TASKS["truth"], Prompting(template="arrow", shots=2), items=8, seed=3)
    assert a["answers"] == b["answers"] and a["accuracy"] == 1.0 and b["accuracy"] == 0.0


def test_exercise_checks(capsys):
    assert lab11.check_scorer(lambda answer, completion: completion.split("\n")[0].strip() == answer)
    with pytest.raises(AssertionError, match="integer"):
        lab11.check_scorer(lambda answer, completion: answer in completion)
    assert not lab11.check_scorer(lambda answer, completion: ...)
    assert lab11.check_prompt(lambda q, ex: f"Task: How many items?\nInput: {q}\nOutput:", oracle)
    with pytest.raises(AssertionError, match="below the bar"):
        lab11.check_prompt(lambda q, ex: f"Q: {q}\nA:", oracle)
    assert not lab11.check_prompt(lambda q, ex: ..., oracle)
    rows = [dict(decoding=d, accuracy=a, seed=s) for s, (g, t) in enumerate([(0.9, 0.5), (0.8, 0.6), (1.0, 0.4)])
            for d, a in (("greedy", g), ("temperature 1.5", t))]
    assert lab11.check_best_decoding("greedy", rows)
    with pytest.raises(AssertionError):
        lab11.check_best_decoding("temperature 1.5", rows)
    with pytest.raises(AssertionError, match="answer one of"):
        lab11.check_best_decoding("beams 9", rows)
    assert "not answered yet" in capsys.readouterr().out


def _train(out, *flags):
    return subprocess.run([sys.executable, "-m", "labs_lib.train", "--profile", "ci", "--out", str(out),
                           "--no-progress", "--eval-interval", "0", *flags], capture_output=True, text=True)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """The ci GPT after 30 steps on the corpus, with a context that holds two-shot prompts."""
    base = tmp_path_factory.mktemp("lab11") / "base"
    result = _train(base, "--max-steps", "30", "--checkpoint-interval", "30", "--block-size", "128")
    assert result.returncode == 0, result.stderr
    return base


def test_hf_completer_matches_local_generation(base_run, tmp_path):
    """The same weights answer the same through transformers' generate and through ours (greedy and beams)."""
    from labs_lib.inference.export import export_hf_run
    from labs_lib.inference.generate import load_trained

    model, tokenizer, _ = load_trained(base_run)
    export_hf_run(base_run, tmp_path / "hf")
    for decoding in ("greedy", "beams 4"):
        setting = Prompting(shots=2, decoding=decoding)
        ours = evaluate(local_completer(model, tokenizer), TASKS["type"], setting, items=6)
        theirs = evaluate(hf_completer(tmp_path / "hf"), TASKS["type"], setting, items=6)
        assert ours["completions"] == theirs["completions"]


def test_hf_completer_needs_a_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        hf_completer(tmp_path)


def test_init_from_starts_from_the_base_weights_and_tokenizer(base_run, tmp_path):
    base = base_run
    data = write_finetune_data(tmp_path / "mix", episodes=300, corpus_bytes=20_000)
    tuned, fresh = tmp_path / "tuned", tmp_path / "fresh"
    result = _train(tuned, "--init-from", str(base), "--data", str(data), "--max-steps", "2",
                    "--warmup-steps", "0", "--corpus-max-bytes", "100000000")
    assert result.returncode == 0, result.stderr
    assert (tuned / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()
    assert _train(fresh, "--data", str(data), "--max-steps", "2", "--corpus-max-bytes", "100000000",
                  "--block-size", "128", "--warmup-steps", "0").returncode == 0
    first = [json.loads((run / "metrics.jsonl").read_text().split("\n")[0])["loss"] for run in (base, tuned, fresh)]
    assert first[1] < first[2] - 0.5, f"the fine-tune's first loss {first[1]} is no better than a fresh model's"
    config = json.loads((tuned / "config.json").read_text())
    assert config["model"] == json.loads((base / "config.json").read_text())["model"]


def test_init_from_refuses_a_new_shape_or_a_missing_run(base_run, tmp_path):
    result = _train(tmp_path / "t", "--init-from", str(base_run), "--n-layer", "3", "--max-steps", "1")
    assert result.returncode != 0 and "drop --n-layer 3 (the base has 2)" in result.stderr
    result = _train(tmp_path / "t", "--init-from", str(tmp_path / "nowhere"), "--max-steps", "1")
    assert result.returncode != 0 and "--init-from" in result.stderr and "does not exist" in result.stderr

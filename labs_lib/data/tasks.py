"""Lab 11's task suite: small instruction-style tasks on Python literals that a minutes-trained GPT can learn.

    task = TASKS["type"]
    task.answer("[1, 2]")                      # 'list': Python itself computes every answer (ast.literal_eval)
    items = held_out_items(task, 60, seed=0)   # literals the fine-tune never saw (their repr is held out)
    task.score("[1, 2]", " list\\nInput: ...")  # True: the completion's first line, stripped, equals the answer
    write_finetune_data("build/lab11/mix", episodes=30_000, corpus_bytes=200_000)   # tasks.txt + a corpus slice

Every task reads one Python literal and answers with one word; the tasks share their inputs and differ in the
question, so a prompt with neither an instruction nor examples leaves the task open (which is what lab 11 measures).
The fine-tune sees *episodes*: an instruction line half of the time, then one to eight solved items of one task in
the trained format (``Input: x`` / ``Output: y``). Held-out items: every literal whose text hashes into the held-out
fifth, never written into the training text; the few closed-class literals (``None``, ``True``, ``[]``, ``0`` ...)
are shared by both sides, as a language's function words are.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from labs_lib.data.text import default_corpus_files

__all__ = ["Task", "TASKS", "CLOSED_CLASS", "literal", "is_held_out", "held_out_items", "train_items", "example_pool",
           "format_item", "episode", "write_finetune_data", "first_line"]

TRAINED_INPUT, TRAINED_OUTPUT, TRAINED_INSTRUCTION = "Input: ", "Output:", "Task: "
CLOSED_CLASS = ("None", "True", "False", "0", "0.0", "''", "[]", "()", "{}")
_WORDS = ("a", "b", "x", "ok", "hi", "id", "cat", "key", "tea", "sun", "box", "zip", "map", "red", "owl", "pen")
_HELD_OUT_FIFTH = 0  # a literal whose hash is 0 mod 5 is held out


def first_line(completion: str) -> str:
    """What a completion answers: its first line, without the spaces around it."""
    return completion.split("\n", 1)[0].strip()


@dataclass(frozen=True)
class Task:
    name: str
    instruction: str  # the instruction line's text
    function: Callable[[object], object]  # of the literal's value; str() of its result is the answer
    kinds: tuple[str, ...]  # the literal kinds the task is asked about

    def answer(self, text: str) -> str:
        """The correct answer for the literal ``text``, computed by Python."""
        return str(self.function(ast.literal_eval(text)))

    def score(self, text: str, completion: str) -> bool:
        """Exact match of the completion's first line with the answer."""
        return first_line(completion) == self.answer(text)


TASKS = {
    "type": Task("type", "Name the type.", lambda v: type(v).__name__,
                 ("int", "float", "str", "list", "tuple", "dict", "bool", "none")),
    "truth": Task("truth", "Is it true?", bool, ("int", "float", "str", "list", "tuple", "dict", "bool", "none")),
    "length": Task("length", "How many items?", len, ("str", "list", "tuple", "dict")),
}


def literal(rng: random.Random, kinds: tuple[str, ...]) -> str:
    """A random Python literal of one of ``kinds``: empty (or zero) three times in ten."""
    kind = rng.choice(kinds)
    empty = rng.random() < 0.3

    def number() -> str:
        return str(rng.randint(1, 99))

    def several(make) -> str:
        return ", ".join(make() for _ in range(rng.randint(1, 3)))

    if kind == "bool":
        return rng.choice(("True", "False"))
    if kind == "none":
        return "None"
    if empty:
        return {"int": "0", "float": "0.0", "str": "''", "list": "[]", "tuple": "()", "dict": "{}"}[kind]
    if kind == "int":
        return rng.choice(("", "-")) + number()
    if kind == "float":
        return f"{number()}.{rng.randint(0, 9)}"
    if kind == "str":
        return repr("".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 5))))
    if kind == "list":
        return f"[{several(number)}]"
    if kind == "tuple":
        return f"({several(number)},)" if rng.random() < 0.2 else f"({number()}, {several(number)})"
    keys = rng.sample(_WORDS, rng.randint(1, 3))  # distinct: a repeated key would not count
    return "{" + ", ".join(f"{key!r}: {number()}" for key in keys) + "}"


def is_held_out(text: str) -> bool:
    """Whether the literal belongs to the held-out side (closed-class literals belong to both)."""
    if text in CLOSED_CLASS:
        return False
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") % 5 == _HELD_OUT_FIFTH


def _items(task: Task, n: int, seed: int, held_out: bool) -> list[str]:
    rng = random.Random(f"{task.name}-{seed}-{held_out}")
    items = []
    while len(items) < n:
        text = literal(rng, task.kinds)
        if text in CLOSED_CLASS:  # as often as among the training literals: a fifth of the time when held out
            if not held_out or rng.random() < 0.2:
                items.append(text)
        elif is_held_out(text) == held_out:
            items.append(text)
    return items


def held_out_items(task: Task, n: int, seed: int = 0) -> list[str]:
    """``n`` evaluation literals for ``task`` (repeats possible), none of them in any training text."""
    return _items(task, n, seed, held_out=True)


def train_items(task: Task, n: int, seed: int = 0) -> list[str]:
    """``n`` literals from the training side: the examples a few-shot prompt shows."""
    return _items(task, n, seed, held_out=False)


def example_pool(task: Task, seed: int = 0, n: int = 200) -> list[str]:
    """Literals a few-shot prompt may show: ``n`` from the training side, plus every closed-class literal the task
    can answer (so that every answer has an example)."""
    closed = []
    for text in CLOSED_CLASS:
        try:
            task.answer(text)
            closed.append(text)
        except TypeError:  # len(None): not a question of this task
            pass
    return train_items(task, n, seed) + closed


def format_item(task: Task, text: str) -> str:
    """One solved item in the trained format."""
    return f"{TRAINED_INPUT}{text}\n{TRAINED_OUTPUT} {task.answer(text)}"


def episode(rng: random.Random) -> str:
    """One training episode: an instruction half of the time, then 1 to 8 solved items of one task."""
    task = TASKS[rng.choice(sorted(TASKS))]
    lines = [TRAINED_INSTRUCTION + task.instruction] if rng.random() < 0.5 else []
    items = []
    for _ in range(rng.randint(1, 8)):
        text = literal(rng, task.kinds)
        while is_held_out(text):
            text = literal(rng, task.kinds)
        items.append(format_item(task, text))
    return "\n".join(lines + items) + "\n\n"


def write_finetune_data(out: str | Path, episodes: int = 30_000, corpus_bytes: int = 200_000,
                        seed: int = 0) -> Path:
    """The fine-tune's corpus folder: ``tasks.txt`` (``episodes`` episodes) and ``corpus.py``, the first
    ``corpus_bytes`` of the standard library's sources (the base model's own corpus, so it keeps its Python).
    Written into a temporary folder and renamed into place (kept when it already holds these settings: the
    tokenized copy is cached by the files' times); returns ``out``."""
    out = Path(out)
    settings = json.dumps(dict(episodes=episodes, corpus_bytes=corpus_bytes, seed=seed, tasks=sorted(TASKS)))
    if (out / ".settings.json").exists() and (out / ".settings.json").read_text() == settings:
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = random.Random(seed)
    (tmp / "tasks.txt").write_text("".join(episode(rng) for _ in range(episodes)))
    corpus, size = [], 0
    for f in default_corpus_files():
        if size >= corpus_bytes:
            break
        text = f.read_text(errors="replace")[: corpus_bytes - size]
        corpus.append(text)
        size += len(text)
    (tmp / "corpus.py").write_text("".join(corpus))
    (tmp / ".settings.json").write_text(settings)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out

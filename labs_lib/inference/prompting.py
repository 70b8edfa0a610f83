"""Prompts built from parts, and accuracy measured per prompting strategy, against any text completer.

    setting = Prompting(template="trained", shots=4, instruction=False, order="random", decoding="greedy")
    prompt, answer = build(TASKS["type"], "[1, 2]", setting, rng)      # the text the model continues, the answer
    complete = local_completer(model, tokenizer)                       # or lab 11's Triton one, or hf_completer
    rows = measure(complete, tasks, settings, seeds=(0, 1, 2), items=40)   # one row per task, setting and seed
    table = summarize(rows)                                            # mean and spread over the seeds

A completer is ``complete(prompts, decoding) -> completions`` (the new text only). A *seed* fixes which held-out
items are asked, which examples a few-shot prompt shows and in what order, and the sampler's seed, so the spread
over seeds is what a different draw of the same strategy would change.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from labs_lib.data.tasks import TRAINED_INPUT, TRAINED_INSTRUCTION, TRAINED_OUTPUT, Task, example_pool, held_out_items
from labs_lib.inference.generate import Decoding, generate_text

__all__ = ["Template", "TEMPLATES", "DECODINGS", "ORDERS", "Prompting", "Completer", "build", "decoding_of", "ask",
           "evaluate", "measure", "summarize", "local_completer", "hf_completer"]

Completer = Callable[[list[str], Decoding], list[str]]
MAX_NEW_TOKENS = 6  # the longest answer ("NoneType") is 3 tokens of the course tokenizer, plus the newline


@dataclass(frozen=True)
class Template:
    """How a prompt is written: ``{instruction}``, ``{input}``, ``{output}`` are filled in; a prompt is the
    instruction line (when asked for), the examples and the query, one per line."""

    name: str
    instruction: str
    example: str
    query: str

    def render(self, task: Task, query: str, examples: list[str], instruction: bool) -> str:
        lines = [self.instruction.format(instruction=task.instruction)] if instruction else []
        lines += [self.example.format(input=x, output=task.answer(x)) for x in examples]
        return "\n".join(lines + [self.query.format(input=query)])


TEMPLATES = {
    "trained": Template("trained", TRAINED_INSTRUCTION + "{instruction}", TRAINED_INPUT + "{input}\n"
                        + TRAINED_OUTPUT + " {output}", TRAINED_INPUT + "{input}\n" + TRAINED_OUTPUT),
    "qa": Template("qa", "Question: {instruction}", "Q: {input}\nA: {output}", "Q: {input}\nA:"),
    "arrow": Template("arrow", "# {instruction}", "{input} -> {output}", "{input} ->"),
}
DECODINGS = {"greedy": dict(temperature=0.0), "temperature 0.7": dict(temperature=0.7),
             "temperature 1.5": dict(temperature=1.5), "top-p 0.5": dict(temperature=1.0, top_p=0.5),
             "beams 4": dict(temperature=0.0, num_beams=4)}
ORDERS = ("random", "same answer last", "other answer last")


@dataclass(frozen=True)
class Prompting:
    """One prompting strategy: the template, how many examples (shots), whether the instruction line is there, the
    examples' order (:data:`ORDERS`: the last example's answer equal to or different from the query's, to measure
    recency bias) and the decoding (:data:`DECODINGS`)."""

    template: str = "trained"
    shots: int = 0
    instruction: bool = True
    order: str = "random"
    decoding: str = "greedy"

    def check(self) -> Prompting:
        problems = []
        if self.template not in TEMPLATES:
            problems.append(f"template {self.template!r}: use one of {sorted(TEMPLATES)}")
        if self.shots < 0:
            problems.append(f"shots={self.shots}: use 0 or more examples")
        if self.order not in ORDERS:
            problems.append(f"order {self.order!r}: use one of {list(ORDERS)}")
        if self.order != "random" and self.shots == 0:
            problems.append(f"order {self.order!r} needs examples: give shots >= 1")
        if self.decoding not in DECODINGS:
            problems.append(f"decoding {self.decoding!r}: use one of {sorted(DECODINGS)}")
        if problems:
            raise ValueError("bad prompting setting: " + "; ".join(problems))
        return self

    def label(self) -> str:
        return (f"{self.template}, {self.shots}-shot, {'instruction' if self.instruction else 'no instruction'}, "
                f"{self.order}, {self.decoding}")


def decoding_of(name: str, seed: int = 0) -> Decoding:
    """The Decoding of one of :data:`DECODINGS`: short answers, stopped at the end of the line."""
    return Decoding(max_new_tokens=MAX_NEW_TOKENS, stop=("\n",), seed=seed, **DECODINGS[name])


def _examples(task: Task, query: str, setting: Prompting, pool: list[str], rng: random.Random) -> list[str]:
    """``setting.shots`` examples from ``pool`` (not the query itself), ordered as ``setting.order`` asks."""
    candidates = [x for x in pool if x != query]
    examples = rng.sample(candidates, setting.shots)
    if setting.order == "random":
        return examples
    wanted = task.answer(query)
    def fits(x: str) -> bool:
        return (task.answer(x) == wanted) == (setting.order == "same answer last")
    # The query itself only where nothing else has its answer ("None" is the only NoneType).
    last = rng.choice([x for x in candidates if fits(x)] or [x for x in pool if fits(x)])
    return [x for x in examples if x != last][: setting.shots - 1] + [last]


def build(task: Task, query: str, setting: Prompting, rng: random.Random, pool: list[str] | None = None
          ) -> tuple[str, str]:
    """(prompt, correct answer) for asking ``task`` about the literal ``query`` the way ``setting`` says; examples
    come from ``pool`` (default: :func:`labs_lib.data.tasks.example_pool`)."""
    setting.check()
    pool = pool if pool is not None else example_pool(task)
    examples = _examples(task, query, setting, pool, rng) if setting.shots else []
    return TEMPLATES[setting.template].render(task, query, examples, setting.instruction), task.answer(query)


def ask(complete: Completer, task: Task, prompt_of: Callable[[str, list[str], random.Random], str], items: int = 40,
        seed: int = 0, decoding: str = "greedy") -> dict:
    """Ask ``task`` about ``items`` held-out literals (drawn with ``seed``), each with the prompt
    ``prompt_of(query, example pool, rng)`` writes: the accuracy, prompts, answers and completions."""
    rng = random.Random(f"{task.name}-{seed}")
    queries = held_out_items(task, items, seed)
    pool = example_pool(task, seed)
    prompts = [prompt_of(q, pool, rng) for q in queries]
    completions = complete(prompts, decoding_of(decoding, seed))
    correct = [task.score(q, c) for q, c in zip(queries, completions)]
    return dict(accuracy=sum(correct) / len(correct), prompts=prompts, answers=[task.answer(q) for q in queries],
                completions=list(completions))


def evaluate(complete: Completer, task: Task, setting: Prompting, items: int = 40, seed: int = 0) -> dict:
    """Accuracy of ``setting`` on ``items`` held-out literals (drawn with ``seed``): a row with the prompts,
    completions and what each should have answered."""
    setting.check()
    asked = ask(complete, task, lambda q, pool, rng: build(task, q, setting, rng, pool)[0], items, seed,
                setting.decoding)
    return dict(task=task.name, **asdict(setting), seed=seed, **asked)


def measure(complete: Completer, tasks: list[Task], settings: list[Prompting], seeds=(0, 1, 2), items: int = 40,
            progress: bool = True) -> list[dict]:
    """:func:`evaluate` for every task, setting and seed (a progress bar over them); rows without the texts."""
    from tqdm.auto import tqdm

    for setting in settings:
        setting.check()
    runs = [(t, s, seed) for t in tasks for s in settings for seed in seeds]
    rows = []
    for task, setting, seed in tqdm(runs, desc="prompting", unit="measurement", disable=not progress):
        row = evaluate(complete, task, setting, items, seed)
        rows.append({k: v for k, v in row.items() if k not in ("prompts", "answers", "completions")})
    return rows


def summarize(rows: list[dict], by: tuple[str, ...] = ("task", "template", "shots", "instruction", "order",
                                                        "decoding")) -> list[dict]:
    """One row per group of ``by``: the mean accuracy over its seeds, their standard deviation, min and max."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in by), []).append(row["accuracy"])
    return [dict(zip(by, key), mean=statistics.fmean(accs), std=statistics.pstdev(accs), min=min(accs),
                 max=max(accs), seeds=len(accs)) for key, accs in groups.items()]


def local_completer(model, tokenizer, batch: int = 64) -> Completer:
    """Completions from the workshop GPT in this process (labs_lib.inference.generate), ``batch`` prompts at once."""
    def complete(prompts: list[str], d: Decoding) -> list[str]:
        out = []
        for start in range(0, len(prompts), batch):
            chunk = prompts[start:start + batch]
            out += generate_text(model, tokenizer, chunk, replace(d, seed=d.seed + start))
        return out
    return complete


def hf_completer(folder: str | Path) -> Completer:
    """Completions from a Hugging Face causal LM in ``folder`` (its config, weights and tokenizer; read from disk,
    never downloaded), one prompt at a time through transformers' own ``generate``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder).expanduser()
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} holds no Hugging Face model (config.json is missing): pass a folder saved "
                                "with save_pretrained, e.g. one from your cluster's model cache")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()

    def complete(prompts: list[str], d: Decoding) -> list[str]:
        out = []
        for i, prompt in enumerate(prompts):
            torch.manual_seed(d.seed + i)
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            sampled = d.temperature > 0 and d.num_beams == 1
            settings = dict(do_sample=sampled, num_beams=d.num_beams, max_new_tokens=d.max_new_tokens,
                            pad_token_id=tokenizer.eos_token_id)
            if sampled:
                settings.update(temperature=d.temperature, top_p=d.top_p or 1.0, top_k=0)
            with torch.no_grad():
                new = model.generate(ids, **settings)[0, ids.size(1):]
            text = tokenizer.decode(new, skip_special_tokens=True)
            out.append(text.split(d.stop[0])[0] if d.stop else text)
        return out
    return complete

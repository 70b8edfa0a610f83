"""Lab 11, prompt engineering that measurably matters: the lab's runs, the grids it measures, plots, exercise checks.

    base = train_base(out / "base")                 # the lab's GPT on the Python corpus (the one launcher)
    tuned = fine_tune(base, out / "tuned")          # --init-from base on the task suite + corpus (a real job)
    complete = local_completer(*load_trained(tuned)[:2])
    rows = measure(complete, tasks(), grid("shots"))   # labs_lib.inference.prompting; one grid per question
    server = serve(tuned, out / "repository")       # the fine-tune behind Triton's ensemble
    complete = triton_completer(server.http_url)    # the same measurements through its generate endpoint
    complete = hf_completer(hf_model_path())        # a pretrained model when LABS_HF_MODEL names one

Exercise checks compute their bars from the learner's own measurements, here, out of the notebook's sight.
"""

from __future__ import annotations

import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from labs_lib.core.config import get_profile
from labs_lib.data.tasks import TASKS, Task
from labs_lib.inference.generate import Decoding
from labs_lib.inference.prompting import DECODINGS, ORDERS, TEMPLATES, Completer, Prompting, ask, evaluate, summarize
from labs_lib.labs.checks import check

__all__ = ["MODEL", "BASE_STEPS", "FINE_TUNE", "SHOTS", "HF_MODEL_ENV", "tasks", "grid", "train_base", "fine_tune",
           "serve", "triton_completer", "hf_model_path", "spread_table", "largest_gap", "plot_shots",
           "plot_settings", "check_scorer", "check_prompt", "check_best_decoding"]

# The lab's GPT per profile: lab 01's shape with a context that holds eight examples.
MODEL = {"ci": dict(block_size=320, batch_size=4), "cpu": dict(block_size=320), "gpu": {}}
BASE_STEPS = {"ci": 120, "cpu": 400, "gpu": None}
# The fine-tune per profile: steps, batch, learning rate, episodes of the task suite written for it.
FINE_TUNE = {"ci": dict(max_steps=1500, batch_size=8, lr=3e-3, episodes=30_000),
             "cpu": dict(max_steps=1500, batch_size=16, lr=2e-3, episodes=40_000),
             "gpu": dict(max_steps=1000, batch_size=16, lr=3e-4, episodes=100_000)}
SHOTS = (0, 1, 2, 4, 8)
HF_MODEL_ENV = "LABS_HF_MODEL"


def tasks(names=None) -> list[Task]:
    return [TASKS[n] for n in (names or sorted(TASKS))]


def grid(question: str) -> list[Prompting]:
    """The settings that answer one question, everything else at the trained template, greedy, random order:
    ``shots`` (0-8 examples, with and without the instruction), ``templates`` (each template, 0 and 4 examples),
    ``order`` (4 examples, no instruction, the last example's answer), ``decoding`` (instruction, 0 examples)."""
    if question == "shots":
        return [Prompting(shots=k, instruction=i) for i in (True, False) for k in SHOTS]
    if question == "templates":
        return [Prompting(template=t, shots=k) for t in TEMPLATES for k in (0, 4)]
    if question == "order":
        return [Prompting(shots=4, instruction=False, order=o) for o in ORDERS]
    if question == "decoding":
        return [Prompting(decoding=d) for d in DECODINGS]
    raise ValueError(f"question {question!r}: ask 'shots', 'templates', 'order' or 'decoding'")


# ------------------------------------------------------------------------------------------------ runs

def train_base(out: str | Path, profile: str | None = None, progress: bool = True) -> Path:
    """The lab's GPT trained on the Python corpus (one rank, the one launcher: Slurm when up); returns its run."""
    from labs_lib.jobs.launch import train_gpt

    name = get_profile(profile).name
    steps = BASE_STEPS[name] or get_profile(profile).train.max_steps
    train_gpt(out, nodes=1, nproc_per_node=1, profile=profile, progress=progress, max_steps=steps,
              checkpoint_interval=steps, eval_interval=0, **MODEL[name])
    return Path(out)


def fine_tune(base: str | Path, out: str | Path, profile: str | None = None, progress: bool = True) -> Path:
    """``base`` fine-tuned on the task suite mixed with a slice of its corpus (``--init-from``: its weights and
    tokenizer), through the one launcher; the data folder is written beside ``out``. Returns the run."""
    from labs_lib.data.tasks import write_finetune_data
    from labs_lib.jobs.launch import train_gpt

    name = get_profile(profile).name
    settings = dict(FINE_TUNE[name])
    data = write_finetune_data(Path(out).parent / "finetune_data", episodes=settings.pop("episodes"))
    steps = settings["max_steps"]
    train_gpt(out, nodes=1, nproc_per_node=1, profile=profile, progress=progress, init_from=str(Path(base).resolve()),
              data=str(data.resolve()), corpus_max_bytes=1 << 30, warmup_steps=20, checkpoint_interval=steps,
              eval_interval=0, **settings)
    return Path(out)


def serve(run: str | Path, repository: str | Path):
    """The run rendered as a Triton repository (dynamic batching, 20 ms queue: the measurement's concurrent
    requests meet) and tritonserver started on it; stopped at exit too."""
    from labs_lib.deploy.repository import render_repository
    from labs_lib.labs.lab10 import start_server

    repo = render_repository(run, repository, decoupled=False, max_batch_size=16, max_queue_delay_microseconds=20_000)
    return start_server(repo)


def triton_completer(url: str, concurrency: int = 8) -> Completer:
    """Completions from Triton's ``ensemble`` through ``POST /v2/models/ensemble/generate``, ``concurrency``
    requests in flight (the server batches them). Each prompt samples with its own seed (the decoding's + its index),
    as :func:`labs_lib.inference.prompting.local_completer` does per batch."""
    from labs_lib.deploy.client import generate

    def settings_of(d: Decoding, i: int) -> dict:
        s = dict(temperature=d.temperature, seed=d.seed + i)
        if d.top_p is not None:
            s["top_p"] = d.top_p
        if d.num_beams > 1:  # beams do not stop at stop words here: cut at the newline afterwards
            return dict(beam_width=d.num_beams, temperature=0.0)
        return dict(s, stop_words=list(d.stop))

    def complete(prompts: list[str], d: Decoding) -> list[str]:
        def one(i: int) -> str:
            text = generate(url, prompts[i], max_tokens=d.max_new_tokens, **settings_of(d, i))
            return text.split("\n", 1)[0] if d.stop else text
        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(one, range(len(prompts))))
    return complete


def hf_model_path() -> Path | None:
    """The Hugging Face causal-LM folder ``LABS_HF_MODEL`` names, or None (the lab never downloads one)."""
    value = os.environ.get(HF_MODEL_ENV)
    return Path(value).expanduser() if value else None


# ------------------------------------------------------------------------------------------------ readers

def spread_table(rows: list[dict], by: tuple[str, ...]) -> list[dict]:
    """Mean accuracy and its spread over seeds per group of ``by``, as printable rows."""
    return [{**{k: r[k] for k in by}, "accuracy": f"{r['mean']:.2f}", "± (std over seeds)": f"{r['std']:.2f}",
             "min-max": f"{r['min']:.2f}-{r['max']:.2f}"} for r in summarize(rows, by)]


def largest_gap(rows: list[dict], by: str) -> dict:
    """The two values of ``by`` whose mean accuracies (over tasks and seeds) differ most, the difference, and the
    largest seed-to-seed spread (max - min of one setting's per-seed accuracy, tasks averaged) among all values."""
    per_seed: dict[tuple, list[float]] = {}
    for r in rows:
        per_seed.setdefault((r[by], r["seed"]), []).append(r["accuracy"])
    by_value: dict = {}
    for (value, _), accs in per_seed.items():
        by_value.setdefault(value, []).append(statistics.fmean(accs))
    means = {v: statistics.fmean(a) for v, a in by_value.items()}
    best, worst = max(means, key=means.get), min(means, key=means.get)
    spread = max(max(a) - min(a) for a in by_value.values())
    return dict(best=best, worst=worst, difference=means[best] - means[worst], seed_spread=spread)


def plot_shots(rows: list[dict], ax=None):
    """Accuracy against the number of examples, with and without the instruction, one line per task; error bars:
    the standard deviation over seeds."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(7, 3.5))[1]
    for r_task in sorted({r["task"] for r in rows}):
        for instruction, style in ((True, "-"), (False, "--")):
            points = sorted((r["shots"], r["mean"], r["std"]) for r in summarize(rows)
                            if r["task"] == r_task and r["instruction"] == instruction)
            if points:
                k, mean, std = zip(*points)
                ax.errorbar(k, mean, yerr=std, fmt=style + "o", capsize=3,
                            label=f"{r_task}, {'instruction' if instruction else 'no instruction'}")
    ax.set(xlabel="examples in the prompt (shots)", ylabel="held-out accuracy", ylim=(-0.02, 1.02),
           xticks=SHOTS, title="few-shot: accuracy vs examples")
    ax.legend(fontsize=7, ncol=2)
    return ax


def plot_settings(rows: list[dict], by: str, title: str, ax=None):
    """Bars of mean accuracy per value of ``by`` (grouped by task), error bars the standard deviation over seeds."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(7, 3.2))[1]
    table = summarize(rows, ("task", by))
    values = list(dict.fromkeys(r[by] for r in rows))
    task_names = sorted({r["task"] for r in rows})
    width = 0.8 / len(task_names)
    for i, t in enumerate(task_names):
        found = {r[by]: r for r in table if r["task"] == t}
        ax.bar([j + i * width for j in range(len(values))], [found[v]["mean"] for v in values], width,
               yerr=[found[v]["std"] for v in values], capsize=3, label=t)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(values))], [str(v) for v in values], fontsize=8)
    ax.set(ylabel="held-out accuracy", ylim=(0, 1.05), title=title)
    ax.legend(fontsize=7)
    return ax


# ------------------------------------------------------------------------------------------------ exercise checks

_SCORER_CASES = [("[1, 2]", "list", " list"), ("[1, 2]", "list", "list\nInput: 3"), ("7", "int", " int  "),
                 ("7", "int", " integer"), ("''", "str", ""), ("None", "NoneType", " NoneType\n"),
                 ("(1, 2)", "tuple", " tuples"), ("{}", "dict", "\ndict"), ("True", "bool", " bool\nOutput: x")]


def check_scorer(fn) -> bool:
    """Exercise 1: ``fn(answer, completion) -> bool`` must score exactly as the lab's scorer does: the
    completion's first line, stripped, equal to the answer."""
    hint = "score the first line of the completion only, with the spaces around it removed, against the answer"
    if fn is None or fn is Ellipsis or fn("list", " list") is Ellipsis:
        return check("scorer", None, True, hint=hint)
    task = TASKS["type"]
    wrong = [(c, a) for x, a, c in _SCORER_CASES if bool(fn(a, c)) != task.score(x, c)]
    return check("scorer", f"{len(wrong)} cases scored differently" if wrong else "agrees on every case",
                 "agrees on every case", hint=f"{hint}; e.g. {wrong[0][0]!r} for the answer {wrong[0][1]!r}"
                 if wrong else hint)


def check_prompt(fn, complete: Completer, items: int = 24, seeds=(0, 1)) -> bool:
    """Exercise 2: ``fn(query, examples) -> prompt`` (examples: four (input, answer) pairs) must ask the ``length``
    task well: its held-out accuracy must come within 0.15 of the lab's best strategy for that task, measured now."""
    hint = ("write the prompt in the format the model was fine-tuned on, with its instruction line or examples "
            "(look at the training episodes printed above)")
    task = TASKS["length"]
    if fn is None or fn is Ellipsis or fn("[1]", [("[2]", "1")] * 4) is Ellipsis:
        return check("prompt", None, True, hint=hint)
    best = max(statistics.fmean(evaluate(complete, task, Prompting(shots=k), items, s)["accuracy"] for s in seeds)
               for k in (0, 4))
    yours = statistics.fmean(_accuracy_of_prompt(fn, complete, task, items, s) for s in seeds)
    verdict = "clears the bar" if yours >= best - 0.15 else f"{yours:.2f} held-out accuracy, below the bar"
    return check("prompt", verdict, "clears the bar", hint=f"the best strategy measured gets {best:.2f}; {hint}")


def _accuracy_of_prompt(fn, complete: Completer, task: Task, items: int, seed: int) -> float:
    def prompt_of(query: str, pool: list[str], rng) -> str:
        return fn(query, [(x, task.answer(x)) for x in rng.sample(pool, 4)])
    return ask(complete, task, prompt_of, items, seed)["accuracy"]


def check_best_decoding(answer: str | None, rows: list[dict]) -> bool:
    """Exercise 3: the decoding with the highest exact-match accuracy in ``rows`` (the learner's measurements);
    any decoding within one seed-to-seed standard deviation of the best counts."""
    hint = "read the decoding table above: which setting's mean accuracy is highest?"
    if answer is None or answer is Ellipsis:
        return check("best decoding", None, True, hint=hint)
    table = {r["decoding"]: r for r in summarize(rows, ("decoding",))}
    if answer not in table:
        return check("best decoding", answer, "one of " + ", ".join(table), hint=f"answer one of {sorted(table)}")
    top = max(table.values(), key=lambda r: r["mean"])
    within = table[answer]["mean"] >= top["mean"] - max(top["std"], 1e-9)
    return check("best decoding", answer if within else f"{answer} ({table[answer]['mean']:.2f})",
                 answer, hint=hint)

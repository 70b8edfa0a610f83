"""Lab 12, the final review: the learner's own measurements read back from their run folders, and the survey.

    rows = your_runs()                     # every run the labs wrote: steps, final loss, tokens/s, memory per rank
    for lab, note in highlights(): ...     # one measured sentence per lab that has run, a note for each that has not
    path = save_survey(answers)            # one JSON file per response under build/survey/ (atomic)
    python -m labs_lib.labs.lab12 [FOLDER]   # the instructor's summary of every response in FOLDER (default there)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from collections import Counter
from pathlib import Path

from labs_lib.core import paths
from labs_lib.core.runs import METRICS, read_json, read_metrics, write_json
from labs_lib.core.tables import format_table
from labs_lib.labs.common import largest_loss_gap

__all__ = ["QUESTIONS", "your_runs", "highlights", "survey_form", "save_survey", "read_survey", "summarize_survey",
           "main"]

# key -> (question, kind): "rating" 1 to 5, "lab" a lab's number, "text" anything.
QUESTIONS = {
    "overall": ("How useful was the workshop to you? (1 not at all ... 5 very)", "rating"),
    "pace": ("The pace? (1 too slow, 3 right, 5 too fast)", "rating"),
    "clarity": ("How clear were the notebooks and their checks? (1 ... 5)", "rating"),
    "most_useful_lab": ("Which lab taught you most? (its number, 0-11)", "lab"),
    "hardest_lab": ("Which lab was hardest? (its number, 0-11)", "lab"),
    "comments": ("What should we change, add or drop?", "text"),
}


def _runs_under(root: Path) -> list[Path]:
    return sorted({p.parent for p in root.rglob(METRICS)}) if root.exists() else []


def your_runs(runs: Path | None = None) -> list[dict]:
    """One row per run folder (one with metrics.jsonl) under ``runs`` (default: the labs' runs folder), by lab."""
    runs = Path(runs or paths.runs_dir())
    rows = []
    for run in _runs_under(runs):
        records = read_metrics(run)
        if not records:
            continue
        last = records[-1]
        speeds = [r["tokens_per_s"] for r in records[1:] if "tokens_per_s" in r] or [0.0]
        held = [sum(v.values()) for k, v in last.items() if k.startswith("mem_rank") and isinstance(v, dict)]
        name = run.relative_to(runs).as_posix()
        rows.append({"lab": name[3:5] if name.startswith("lab") else "--", "run": name, "steps": last.get("step", 0),
                     "final loss": round(last.get("loss", float("nan")), 3),
                     "tokens/s": round(statistics.median(speeds)),
                     "MB held per rank": round(max(held) / 1e6, 1) if held else "-"})
    return rows


def _lab01(runs: Path) -> str | None:
    ddp, single = read_metrics(runs / "lab01_ddp"), read_metrics(runs / "lab01_single")
    if not (ddp and single):
        return None
    return (f"data parallel logged the same losses as one process: largest difference "
            f"{largest_loss_gap(ddp, single):.1e} over {len(ddp)} steps")


def _lab11(runs: Path) -> str | None:
    path = runs / "lab11" / "gaps.json"
    if not path.exists():
        return None
    gaps = read_json(path)
    real = [g for g in gaps if g["difference"] > g["seed_spread"]]
    return "prompting: " + "; ".join(f"{g['question']} moved accuracy by {g['difference']:.2f} (best {g['best']}, "
                                     f"spread over seeds {g['seed_spread']:.2f})" for g in real[:3])


_HIGHLIGHTS = {"01": _lab01, "11": _lab11}


def highlights(runs: Path | None = None) -> list[tuple[str, str]]:
    """(lab, sentence) for every lab: what your runs measured, or how to get there when the lab has not run."""
    runs = Path(runs or paths.runs_dir())
    by_lab = Counter(r["lab"] for r in your_runs(runs))
    out = []
    for number, title, notebook in paths.lab_notebooks():
        if number == "12":
            continue
        special = _HIGHLIGHTS.get(number)
        sentence = special(runs) if special else None
        if sentence is None and by_lab[number]:
            sentence = f"{by_lab[number]} run(s): see the table above"
        elif sentence is None and any(runs.glob(f"lab{number}*")):
            sentence = f"ran (its files are in {runs})"
        elif sentence is None:
            sentence = f"not run yet: open notebooks/{notebook.name} and run it top to bottom"
        out.append((f"{number} {title}", sentence))
    return out


# ------------------------------------------------------------------------------------------------ the survey

def survey_form() -> dict:
    """Every question with no answer yet: fill in the values and pass the dict to :func:`save_survey`."""
    return {key: None for key in QUESTIONS}


def _check_answer(key: str, value) -> None:
    question, kind = QUESTIONS[key]
    if kind == "rating" and not (isinstance(value, int) and 1 <= value <= 5):
        raise ValueError(f"{key}: {value!r} is not a rating; answer a whole number from 1 to 5 ({question})")
    if kind == "lab" and not (isinstance(value, int) and 0 <= value <= 11):
        raise ValueError(f"{key}: {value!r} is not a lab; answer its number, 0 to 11 ({question})")
    if kind == "text" and not isinstance(value, str):
        raise ValueError(f"{key}: answer with text in quotes ({question})")


def save_survey(answers: dict, folder: str | Path | None = None) -> Path | None:
    """Check the answers and save them as one JSON file in ``folder`` (default build/survey/): the path, or None
    (and a note) when nothing is answered yet. ValueError names a bad answer and what it should be."""
    unknown = set(answers) - set(QUESTIONS)
    if unknown:
        raise ValueError(f"no such question(s) {sorted(unknown)}: the survey asks {list(QUESTIONS)}")
    given = {k: v for k, v in answers.items() if v not in (None, "", Ellipsis)}
    if not given:
        print("nothing answered yet: fill in the values above (None means no answer) and run the cell again")
        return None
    for key, value in given.items():
        _check_answer(key, value)
    folder = Path(folder or paths.build_dir() / "survey")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"response-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}.json"
    write_json(path, {"answers": given, "saved": time.strftime("%Y-%m-%dT%H:%M:%S")})
    print(f"thank you: saved {len(given)} answer(s) to {path}")
    return path


def read_survey(folder: str | Path | None = None) -> list[dict]:
    """Every response's answers in ``folder``; a file that is not a response is skipped with a note."""
    folder = Path(folder or paths.build_dir() / "survey")
    responses = []
    for path in sorted(folder.glob("response-*.json")):
        try:
            responses.append(json.loads(path.read_text())["answers"])
        except (ValueError, KeyError, TypeError):
            print(f"skipped {path}: not a survey response")
    return responses


def summarize_survey(responses: list[dict]) -> tuple[list[dict], list[str]]:
    """(one row per question: answers, mean and spread for ratings, the most named labs; every comment)."""
    rows, comments = [], []
    for key, (_, kind) in QUESTIONS.items():
        values = [r[key] for r in responses if key in r]
        if kind == "text":
            comments += values
            continue
        row = {"question": key, "answers": len(values)}
        if kind == "rating":
            row["mean"] = f"{statistics.fmean(values):.2f}" if values else "-"
            row["spread"] = f"{statistics.pstdev(values):.2f}" if values else "-"
            row["counts 1..5"] = " ".join(str(values.count(v)) for v in range(1, 6))
        else:
            row["mean"] = row["spread"] = "-"
            row["counts 1..5"] = ", ".join(f"lab {lab:02d}: {n}" for lab, n in Counter(values).most_common(3))
        rows.append(row)
    return rows, comments


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m labs_lib.labs.lab12",
                                     description="Sum up the workshop survey's responses.")
    parser.add_argument("folder", nargs="?", help="where the responses are (default build/survey/)")
    args = parser.parse_args(argv)
    folder = Path(args.folder) if args.folder else paths.build_dir() / "survey"
    if not folder.is_dir():
        raise SystemExit(f"no survey folder {folder}: pass the folder learners saved their responses in")
    responses = read_survey(folder)
    if not responses:
        raise SystemExit(f"no responses in {folder} (files response-*.json): nothing to sum up yet")
    rows, comments = summarize_survey(responses)
    print(f"{len(responses)} response(s) in {folder}\n")
    print(format_table(rows))
    for comment in comments:
        print(f"- {comment}")


if __name__ == "__main__":
    main()

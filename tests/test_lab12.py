"""Lab 12: the learner's runs read back, the recap per lab, and the survey saved and summed up."""

import subprocess
import sys

import pytest

from labs_lib.core.paths import lab_notebooks
from labs_lib.core.runs import append_metrics, write_json
from labs_lib.labs import lab12


def _run(folder, losses, mem=None):
    folder.mkdir(parents=True)
    for step, loss in enumerate(losses, 1):
        record = {"step": step, "loss": loss, "tokens_per_s": 1000.0 * step}
        if mem:
            record["mem_rank0"] = mem
        append_metrics(folder, record)


def test_your_runs_and_highlights(tmp_path):
    _run(tmp_path / "lab01_single", [5.0, 4.0, 3.5])
    _run(tmp_path / "lab01_ddp", [5.0, 4.0, 3.5001], mem={"params": 4e6, "grads": 4e6, "optimizer": 8e6})
    _run(tmp_path / "lab11" / "tuned", [2.0])
    write_json(tmp_path / "lab11" / "gaps.json", [
        dict(question="template", best="trained", worst="qa", difference=0.9, seed_spread=0.05),
        dict(question="order", best="random", worst="x", difference=0.01, seed_spread=0.05)])
    rows = {r["run"]: r for r in lab12.your_runs(tmp_path)}
    assert set(rows) == {"lab01_single", "lab01_ddp", "lab11/tuned"}
    assert rows["lab01_ddp"]["final loss"] == 3.5 and rows["lab01_ddp"]["MB held per rank"] == 16.0
    assert rows["lab01_ddp"]["tokens/s"] == 2500 and rows["lab11/tuned"]["lab"] == "11"
    said = dict(lab12.highlights(tmp_path))
    labs = [f"{n} {t}" for n, t, _ in lab_notebooks() if n != "12"]
    assert list(said) == labs
    first, eleventh = said[labs[1]], said[labs[11]]
    assert "largest difference 1.0e-04" in first
    assert "template moved accuracy by 0.90" in eleventh and "order" not in eleventh
    assert "not run yet: open notebooks/02_" in said[labs[2]]


def test_survey_saved_and_summed_up(tmp_path, capsys):
    form = lab12.survey_form()
    assert lab12.save_survey(form, tmp_path) is None and "nothing answered yet" in capsys.readouterr().out
    for overall, lab in ((5, 4), (3, 4), (4, 11)):
        lab12.save_survey(dict(form, overall=overall, most_useful_lab=lab, comments=f"c{overall}"), tmp_path)
    (tmp_path / "response-broken.json").write_text("{")
    responses = lab12.read_survey(tmp_path)
    assert len(responses) == 3 and "skipped" in capsys.readouterr().out
    rows, comments = lab12.summarize_survey(responses)
    table = {r["question"]: r for r in rows}
    assert table["overall"]["mean"] == "4.00" and table["overall"]["counts 1..5"] == "0 0 1 1 1"
    assert table["most_useful_lab"]["counts 1..5"].startswith("lab 04: 2") and table["pace"]["answers"] == 0
    assert sorted(comments) == ["c3", "c4", "c5"]
    result = subprocess.run([sys.executable, "-m", "labs_lib.labs.lab12", str(tmp_path)], capture_output=True,
                            text=True)
    assert result.returncode == 0 and "3 response(s)" in result.stdout and "- c5" in result.stdout


@pytest.mark.parametrize("answers, words", [(dict(overall=7), "overall: 7 is not a rating"),
                                            (dict(hardest_lab="three"), "hardest_lab: 'three' is not a lab"),
                                            (dict(comments=3), "comments: answer with text"),
                                            (dict(mood=3), "no such question")])
def test_bad_answers_are_refused_naming_the_fix(tmp_path, answers, words):
    with pytest.raises(ValueError, match=words):
        lab12.save_survey(answers, tmp_path)
    assert not list(tmp_path.iterdir())


def test_the_summary_command_fails_well(tmp_path):
    result = subprocess.run([sys.executable, "-m", "labs_lib.labs.lab12", str(tmp_path / "none")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and result.stderr.strip().startswith("no survey folder")
    assert "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "labs_lib.labs.lab12", str(tmp_path)], capture_output=True,
                            text=True)
    assert result.returncode != 0 and "no responses" in result.stderr

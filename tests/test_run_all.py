"""make run-all's engine: notebooks executed headless in order, executed copies and the timing table."""

import json
import subprocess
import sys

from labs_lib.labs import run_all


def test_runs_the_chosen_labs_and_writes_the_table(tmp_path, monkeypatch):
    monkeypatch.setenv("LABS_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("LABS_PROFILE", "ci")  # run_all sets it for its kernels: restored after the test
    rows = run_all.run_all("ci", only=["12"], out=tmp_path, progress=False)
    assert [r["notebook"] for r in rows] == ["12_final_review.ipynb", "total"]
    assert rows[0]["result"] == "ok" and rows[0]["budget"] == "ok" and rows[-1]["result"] == "1/1 ok"
    executed = json.loads((tmp_path / "12_final_review.ipynb").read_text())
    assert any(c.get("outputs") for c in executed["cells"] if c["cell_type"] == "code")
    table = (tmp_path / "timings.md").read_text()
    assert "| 12_final_review.ipynb |" in table and "| total |" in table
    assert json.loads((tmp_path / "timings.json").read_text())["profile"] == "ci"


def test_a_failing_notebook_is_reported_and_the_command_fails(tmp_path):
    result = subprocess.run([sys.executable, "-m", "labs_lib.labs.run_all", "--only", "99", "--out", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode != 0 and result.stderr.strip().startswith("error: no lab notebook numbered ['99']")


def test_stderr_lines_are_counted():
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x")])
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stderr", text="a\nb\n"),
                           nbformat.v4.new_output("stream", name="stdout", text="c\n")]
    assert run_all.stderr_lines(nb) == 2

"""Every lab notebook runs top to bottom under the ci profile without writing to stderr (no warning spam for a
learner to read past), and none is committed with outputs."""

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from labs_lib.labs.run_all import stderr_lines

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and (c.get("outputs")
                                                                                    or c.get("execution_count"))]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them before committing"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_runs_headless(path, tmp_path, monkeypatch):
    monkeypatch.setenv("LABS_PROFILE", "ci")
    monkeypatch.setenv("LABS_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend: figures become outputs
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails
    shows = sum("plt.show()" in c.source for c in nb.cells if c.cell_type == "code")
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert images >= shows, f"{path.name}: {shows} cells call plt.show() but only {images} figures were drawn"
    noisy = [(i, "".join(o["text"])[:300]) for i, c in enumerate(nb.cells) if c.cell_type == "code"
             for o in c.outputs if o.get("output_type") == "stream" and o.get("name") == "stderr"]
    assert stderr_lines(nb) == 0, f"{path.name} wrote to stderr (cell, text): {noisy}"

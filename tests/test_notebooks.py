"""The ablation notebooks execute (what CI runs), and each committed .ipynb is its jupytext
.py twin: the .py files are the source, the .ipynb files carry the outputs of a run."""

from __future__ import annotations

from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.py"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 3


@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(source, tmp_path):
    notebook = jupytext.read(source)
    client = nbclient.NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError naming the cell on any error
    images = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert images, f"{source.name} draws no plot"


@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_ipynb_matches_its_source(source):
    paired = source.with_suffix(".ipynb")
    assert paired.is_file(), f"{paired.name} is missing: run `make notebooks`"
    code = [c.source for c in jupytext.read(source).cells]
    assert code == [c.source for c in jupytext.read(paired).cells], (
        f"{paired.name} is out of date with {source.name}: run `make notebooks`"
    )

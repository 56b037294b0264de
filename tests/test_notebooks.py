"""The lecture notebooks run top to bottom, each in a fresh python3 kernel, and a cell that raises fails the test.

Notebooks live in notebooks/ as Jupytext "percent" scripts (NN_name.py): plain Python, so a diff shows code,
never outputs. jupytext turns each into a notebook in memory and nbclient executes it.
"""
from __future__ import annotations

import ast
import subprocess
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebooks extra (nbformat) runs the notebooks")
nbclient = pytest.importorskip("nbclient", reason="the notebooks extra (nbclient) runs the notebooks")
jupytext = pytest.importorskip("jupytext", reason="the notebooks extra (jupytext) reads the notebooks")
pytest.importorskip("ipykernel", reason="the notebooks extra (ipykernel) is the python3 kernel")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))
LIMIT_S = 180  # each notebook, start of kernel to last cell


def execute(nb, cwd: Path, timeout: int = LIMIT_S):
    """Run every cell in a new python3 kernel; raises nbclient's CellExecutionError at the first failing cell."""
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(cwd)}})
    return client.execute()


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 1, f"no NN_*.py notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, tmp_path):
    nb = jupytext.read(path)
    start = time.perf_counter()
    execute(nb, tmp_path)
    elapsed = time.perf_counter() - start
    assert elapsed < LIMIT_S, f"{path.name} took {elapsed:.0f} s (limit {LIMIT_S} s)"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "a code cell did not run"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors


def test_a_failing_cell_fails_the_run(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"),
                                         nbformat.v4.new_code_cell("raise ValueError('this cell fails')"),
                                         nbformat.v4.new_code_cell("y = 2")])
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="this cell fails"):
        execute(nb, tmp_path, timeout=60)
    assert nb.cells[2].execution_count is None  # nothing after the failing cell ran


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_a_plain_script_importing_minilora(path):
    """Stored as percent-format source (no outputs can hide in it); it uses the library, not a copy of it."""
    text = path.read_text(encoding="utf-8")
    assert "format_name: percent" in text and "# %%" in text
    nb = jupytext.read(path)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "start with a title"
    imports = set()
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, ast.Import):
                imports |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imports.add(node.module.split(".")[0])
    assert "minilora" in imports


def _stored_ipynb() -> list[Path]:
    """The .ipynb files the repository holds: git's tracked ones (local converted copies are ignored by
    notebooks/.gitignore), or every one under notebooks/ when there is no git checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", "*.ipynb"], cwd=NOTEBOOK_DIR, check=True,
                             capture_output=True, text=True).stdout
        return [NOTEBOOK_DIR / name for name in out.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        return [p for p in NOTEBOOK_DIR.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts]


def test_no_notebook_is_stored_with_outputs():
    """Any .ipynb kept in the repository is stripped: no outputs, no execution counts."""
    for path in _stored_ipynb():
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} holds outputs"

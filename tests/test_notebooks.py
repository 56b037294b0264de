"""The lecture notebooks run top to bottom, each in a fresh python3 kernel, and a cell that raises fails the test.

Notebooks live in notebooks/ as Jupytext "percent" scripts (NN_name.py): plain Python, so a diff shows code,
never outputs. jupytext turns each into a notebook in memory and nbclient executes it. Every claim a
notebook's prose makes is asserted by the cell after it, so a library change that makes a notebook say
something false fails here.

No wall-clock limit: a busy machine only makes the run slower. The cell timeout is a hang guard (30 min per
cell). The notebooks that need a pretrained base share the demo's cache (minilora.demos.get_base), which
tests/conftest.py points at one directory for the whole session, so the base is built at most once.

Each executed notebook is kept as NN_name.ipynb, outputs and figures included (also when a cell failed), in
site/executed/ (git-ignored; MINILORA_NOTEBOOK_OUT=DIR moves it), with the hash of the .py it came from and
whether every cell ran. tests/test_site.py renders those copies into the static site and opens each page in a
browser, so `make test` executes every notebook once and `make site` is this run plus the rendering.
"""
from __future__ import annotations

import ast
import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from minilora.runs.files import atomic_write_text

nbformat = pytest.importorskip("nbformat", reason="the notebooks extra (nbformat) runs the notebooks")
nbclient = pytest.importorskip("nbclient", reason="the notebooks extra (nbclient) runs the notebooks")
jupytext = pytest.importorskip("jupytext", reason="the notebooks extra (jupytext) reads the notebooks")
pytest.importorskip("ipykernel", reason="the notebooks extra (ipykernel) is the python3 kernel")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))
HANG_GUARD_S = 30 * 60  # per cell: only a cell that hangs hits it, not a slow machine


def execute(nb, cwd: Path, timeout: int = HANG_GUARD_S):
    """Run every cell in a new python3 kernel; raises nbclient's CellExecutionError at the first failing cell."""
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(cwd)}})
    return client.execute()


def executed_dir() -> Path:
    """Where executed copies are kept: $MINILORA_NOTEBOOK_OUT, or site/executed in this checkout."""
    return Path(os.environ.get("MINILORA_NOTEBOOK_OUT") or NOTEBOOK_DIR.parent / "site" / "executed")


def write_executed(nb, src: Path, out: Path, ok: bool, seconds: float) -> Path:
    """out/NN_name.ipynb: the executed notebook, with the sha256 of the .py it ran (so a stale copy is never
    published), whether every cell ran, and how long it took; an atomic write."""
    out.mkdir(parents=True, exist_ok=True)
    nb.metadata["minilora"] = {"source_sha256": hashlib.sha256(src.read_bytes()).hexdigest(), "ok": ok,
                               "seconds": round(seconds, 1)}
    return atomic_write_text(out / f"{src.stem}.ipynb", nbformat.writes(nb))


def run_and_keep(src: Path, out: Path, cwd: Path):
    """Execute notebook src in a fresh kernel (cwd: its working directory) and keep the executed copy in out,
    also when a cell failed (the error stays in its outputs); returns (notebook, seconds); raises what
    execute raises."""
    nb = jupytext.read(src)
    start, ok = time.perf_counter(), False
    try:
        execute(nb, cwd)
        ok = True
    finally:
        elapsed = time.perf_counter() - start
        print(f"{src.name}: {elapsed:.0f} s")  # shown with -s or -rP; informative, never asserted
        write_executed(nb, src, out, ok, elapsed)
    return nb, elapsed


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 1, f"no NN_*.py notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, tmp_path, record_property):
    nb, elapsed = run_and_keep(path, executed_dir(), tmp_path)
    record_property("seconds", round(elapsed, 1))
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "a code cell did not run"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors


def test_a_failing_cell_fails_the_run(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"),
                                         nbformat.v4.new_code_cell("raise ValueError('this cell fails')"),
                                         nbformat.v4.new_code_cell("y = 2")])
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="this cell fails"):
        execute(nb, tmp_path, timeout=600)
    assert nb.cells[2].execution_count is None  # nothing after the failing cell ran


def test_notebook_kernels_share_the_session_cache(tmp_path):
    """A notebook's kernel sees the MINILORA_CACHE that conftest set, so get_base builds one base per session."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import os; print(os.environ['MINILORA_CACHE'])")])
    execute(nb, tmp_path, timeout=600)
    assert nb.cells[0].outputs[0]["text"].strip() == os.environ["MINILORA_CACHE"]


def test_executed_copies_are_written(tmp_path):
    src = tmp_path / "00_check.py"
    src.write_text("# %% [markdown]\n# # A check\n\n# %%\nprint(6 * 7)\n", encoding="utf-8")
    run_and_keep(src, tmp_path / "executed", tmp_path)
    back = nbformat.read(tmp_path / "executed" / "00_check.ipynb", as_version=4)
    assert back.cells[1].outputs[0]["text"].strip() == "42"
    meta = back.metadata["minilora"]
    assert meta["ok"] is True and meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert not list((tmp_path / "executed").glob(".*.tmp")), "a temporary file was left behind"


def test_a_failed_run_is_kept_and_marked(tmp_path):
    """The copy of a failing notebook keeps the error and says it failed, so the site refuses to publish it."""
    src = tmp_path / "00_fails.py"
    src.write_text("# %%\nraise ValueError('this cell fails')\n", encoding="utf-8")
    with pytest.raises(nbclient.exceptions.CellExecutionError):
        run_and_keep(src, tmp_path, tmp_path)
    back = nbformat.read(tmp_path / "00_fails.ipynb", as_version=4)
    assert back.metadata["minilora"]["ok"] is False
    assert back.cells[0].outputs[-1]["output_type"] == "error"


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

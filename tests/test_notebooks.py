"""The lecture notebooks run top to bottom, each in a fresh python3 kernel, and a cell that raises fails the test.

Notebooks live in notebooks/ as Jupytext "percent" scripts (NN_name.py): plain Python, so a diff shows code,
never outputs. jupytext turns each into a notebook in memory and nbclient executes it. Every claim a
notebook's prose makes is asserted by the cell after it, so a library change that makes a notebook say
something false fails here.

No wall-clock limit: a busy machine only makes the run slower. The cell timeout is a hang guard (30 min per
cell). The notebooks that need a pretrained base share the demo's cache (minilora.demos.get_base), which
tests/conftest.py points at one directory for the whole session, so the base is built at most once.

With MINILORA_NOTEBOOK_OUT=DIR (what `make notebooks` sets) each executed notebook is also written there as
NN_name.ipynb, outputs and figures included, and rendered to NN_name.html when nbconvert is installed.
"""
from __future__ import annotations

import ast
import html
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


def plain_html(nb, title: str) -> str:
    """A self-contained HTML page of an executed notebook: markdown as text, code, and its outputs (printed text,
    figures as embedded PNGs). nbconvert renders it better when it is installed."""
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{max-width:60em;margin:auto;font-family:sans-serif} pre{background:#f6f6f6;padding:.5em;"
             "white-space:pre-wrap} pre.out{background:#fff;border-left:3px solid #ccc}</style>"]
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            parts.append(f"<pre style='background:none'>{html.escape(cell.source)}</pre>")
            continue
        parts.append(f"<pre><code>{html.escape(cell.source)}</code></pre>")
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if "image/png" in data:
                parts.append(f"<img src='data:image/png;base64,{data['image/png'].strip()}'>")
            text = out.get("text") or data.get("text/plain") or "\n".join(out.get("traceback", []))
            if text and "image/png" not in data:
                parts.append(f"<pre class='out'>{html.escape(text)}</pre>")
    return "\n".join(parts) + "\n"


def write_executed(nb, name: str, out: Path) -> list[Path]:
    """NN_name.ipynb (with outputs) and NN_name.html into out (nbconvert's HTML if it is installed, else
    plain_html); atomic writes."""
    out.mkdir(parents=True, exist_ok=True)
    written = [atomic_write_text(out / f"{name}.ipynb", nbformat.writes(nb))]
    try:
        import nbconvert
        page, _ = nbconvert.HTMLExporter().from_notebook_node(nb)
    except ImportError:
        page = plain_html(nb, name)
    written.append(atomic_write_text(out / f"{name}.html", page))
    return written


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 1, f"no NN_*.py notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, tmp_path, record_property):
    nb = jupytext.read(path)
    start = time.perf_counter()
    try:
        execute(nb, tmp_path)
    finally:
        elapsed = time.perf_counter() - start
        record_property("seconds", round(elapsed, 1))
        print(f"{path.name}: {elapsed:.0f} s")  # shown with -s or -rP; informative, never asserted
        if os.environ.get("MINILORA_NOTEBOOK_OUT"):  # the executed copy, also when a cell failed
            write_executed(nb, path.stem, Path(os.environ["MINILORA_NOTEBOOK_OUT"]))
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
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6 * 7)")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    execute(nb, tmp_path, timeout=600)
    written = write_executed(nb, "00_check", tmp_path / "executed")
    back = nbformat.read(written[0], as_version=4)
    assert back.cells[0].outputs[0]["text"].strip() == "42"
    page = written[1].read_text(encoding="utf-8")
    assert written[1].suffix == ".html" and "print(6 * 7)" in page and "42" in page
    assert not list((tmp_path / "executed").glob(".*.tmp")), "a temporary file was left behind"


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

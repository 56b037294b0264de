"""Machinery: the lecture as a static site to read without running anything (`make site`).

    python tools/build_site.py [--executed site/executed] [--out site]

Reads the executed notebooks that tests/test_notebooks.py writes (NN_name.ipynb, outputs and figures
included) and renders each with nbconvert's HTMLExporter: markdown, LaTeX, code, printed outputs and
figures (embedded PNGs). MathJax is served from the site itself (the copy PyPI's jupyter-server-mathjax
ships), so a page needs no network when it is read. index.html lists the notebooks in the lecture's order.
"""
from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import sys
import time
from pathlib import Path

import nbformat
from nbconvert import HTMLExporter

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
TEMPLATE = Path(__file__).resolve().parent / "site_page.html.j2"
INDEX_TITLE = "minilora: the lecture, executed"
MATHJAX_URL = "mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe"


def source_sha256(path: Path) -> str:
    """The hash an executed copy records of the .py it came from, so a stale copy is never published."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def title_of(nb) -> str:
    """The notebook's title: its first markdown cell's '# ' heading, without markdown emphasis."""
    first = nb.cells[0].source.splitlines()[0] if nb.cells else ""
    if not first.startswith("# "):
        raise ValueError(f"the notebook's first cell must start with a '# ' title, got {first[:60]!r}")
    return re.sub(r"[*_`]", "", first[2:]).strip()


def sources() -> list[Path]:
    """The lecture's notebooks, notebooks/NN_name.py, in its order."""
    return sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))


def executed_notebooks(executed: Path, srcs: list[Path] | None = None) -> list[tuple[Path, object]]:
    """(source .py, executed notebook) for every notebook (or those in srcs), in the lecture's order. Refuses a
    missing, failed or stale copy with one line naming it."""
    out = []
    for src in sources() if srcs is None else srcs:
        path = executed / f"{src.stem}.ipynb"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no executed copy of {src.name}; run `make site` (it executes them)")
        nb = nbformat.read(path, as_version=4)
        meta = nb.metadata.get("minilora", {})
        if meta.get("source_sha256") != source_sha256(src):
            raise ValueError(f"{path}: executed from another version of {src.name}; run `make site` again")
        if not meta.get("ok"):
            raise ValueError(f"{path}: a cell of {src.name} failed when it was executed; fix it and run again")
        out.append((src, nb))
    if not out:
        raise FileNotFoundError(f"no NN_*.py notebooks in {NOTEBOOK_DIR}")
    return out


def exporter() -> HTMLExporter:
    return HTMLExporter(template_file=str(TEMPLATE), mathjax_url=MATHJAX_URL)


def nav_cell(pages: list[tuple[str, str]], i: int):
    """A markdown line at the top of page i: back to the index, previous and next notebook."""
    links = ["[all notebooks](index.html)"]
    if i > 0:
        links.append(f"[← {pages[i - 1][1]}]({pages[i - 1][0]})")
    if i + 1 < len(pages):
        links.append(f"[{pages[i + 1][1]} →]({pages[i + 1][0]})")
    return nbformat.v4.new_markdown_cell(" · ".join(links))


def index_notebook(pages: list[tuple[str, str]], seconds: dict[str, float]):
    lines = [f"# {INDEX_TITLE}",
             "",
             "LoRA and QLoRA built by hand. Each page is one notebook of the lecture, run top to bottom by "
             "`make site` (the same run `make test` checks): every number and figure on it was computed in "
             "that run, and every sentence that states a result is followed by the cell that asserts it.",
             "",
             "| notebook | ran in |", "|---|---|"]
    for href, title in pages:
        lines.append(f"| [{title}]({href}) | {seconds[href]:.0f} s |")
    lines += ["", f"All {len(pages)} ran in {sum(seconds.values()) / 60:.1f} minutes on the machine that built this "
                  "site (each in a fresh kernel, the pretrained base taken from the cache)."]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("\n".join(lines))])
    nb.metadata["title"] = INDEX_TITLE
    return nb


def build(executed: Path, out: Path) -> list[Path]:
    """Render every executed notebook and the index into out; returns the pages written."""
    notebooks = executed_notebooks(executed)
    out.mkdir(parents=True, exist_ok=True)
    from jupyter_server_mathjax import __file__ as mathjax_pkg
    mathjax = Path(mathjax_pkg).parent / "static"
    if not (out / "mathjax" / "MathJax.js").is_file():
        shutil.copytree(mathjax, out / "mathjax", dirs_exist_ok=True)
    pages = [(f"{src.stem}.html", title_of(nb)) for src, nb in notebooks]
    ex, written = exporter(), []
    seconds = {}
    for i, (src, nb) in enumerate(notebooks):
        nb = nbformat.from_dict(nb)  # a copy: the nav line is for the page only
        nb.metadata["title"] = pages[i][1]
        seconds[pages[i][0]] = nb.metadata["minilora"].get("seconds", float("nan"))
        nb.cells.insert(0, nav_cell(pages, i))
        body, _ = ex.from_notebook_node(nb, resources={"metadata": {"name": src.stem}})
        written.append(_write(out / pages[i][0], body))
    body, _ = ex.from_notebook_node(index_notebook(pages, seconds), resources={"metadata": {"name": "index"}})
    written.insert(0, _write(out / "index.html", body))
    return written


def _write(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--executed", type=Path, default=ROOT / "site" / "executed",
                   help="executed NN_name.ipynb copies (default %(default)s)")
    p.add_argument("--out", type=Path, default=ROOT / "site", help="the site (default %(default)s)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        pages = build(a.executed, a.out)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(pages)} pages in {a.out} ({time.perf_counter() - t0:.1f} s); open {a.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

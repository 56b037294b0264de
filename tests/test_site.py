"""The static site (`make site`, tools/build_site.py) opened page by page in a real browser: headless Chromium.

Every page of the built site must show its notebook's title, load nothing from the network, log no console
error, decode every image, and leave no LaTeX unrendered (no `$...$`, no `\\frac` in the text a reader sees);
a screenshot of each page is kept beside the site (site/screenshots/NAME.png).

The pages are built from the executed copies tests/test_notebooks.py wrote in this session (`make test` runs
that file first), so CI executes each notebook once; a missing or stale copy is executed here. The browser is
the system's Chromium (Debian's `chromium`, which `make test` installs), driven by Playwright; the test skips,
saying so, only when no Chromium is installed. No wall-clock limits: the timeouts only catch a hang.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import time
from pathlib import Path

import pytest

playwright = pytest.importorskip("playwright.sync_api", reason="the dev extra (playwright) drives the browser")
nbformat = pytest.importorskip("nbformat", reason="the notebooks extra renders the site")
pytest.importorskip("nbconvert", reason="the notebooks extra (nbconvert) renders the site")
pytest.importorskip("jupyter_server_mathjax", reason="the notebooks extra (jupyter-server-mathjax) serves MathJax")

from test_notebooks import NOTEBOOKS, executed_dir, run_and_keep  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HANG_GUARD_MS = 10 * 60 * 1000
_spec = importlib.util.spec_from_file_location("build_site", ROOT / "tools" / "build_site.py")
build_site = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_site)

# Text a reader sees that is LaTeX source, not typeset math (code and printed outputs are left out).
RAW_MATH = re.compile(r"\$[^$\s][^$\n]*\$|\\(frac|sqrt|alpha|cdot|sum|mathrm|mathbf|left|right|approx|times)\b")


def chromium() -> str | None:
    for name in (os.environ.get("MINILORA_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built from this session's executed notebooks (executing any missing or stale one)."""
    executed = executed_dir()
    for src in NOTEBOOKS:
        try:
            build_site.executed_notebooks(executed, [src])
        except (OSError, ValueError):
            run_and_keep(src, executed, tmp_path_factory.mktemp(src.stem))
    out = executed.parent
    start = time.perf_counter()
    build_site.build(executed, out)
    print(f"site built in {time.perf_counter() - start:.1f} s")
    return out


def page_titles(site: Path) -> dict[str, str]:
    """page file -> the title it must show: every notebook's, and the index's."""
    titles = {"index.html": build_site.INDEX_TITLE}
    for src, nb in build_site.executed_notebooks(executed_dir()):
        titles[f"{src.stem}.html"] = build_site.title_of(nb)
    return titles


# Run in the page once MathJax has typeset it: what a reader would see, and the images.
INSPECT = """async () => {
  await new Promise(done => MathJax.Hub.Queue(done));  // after the typesetting queued at startup
  const images = Array.from(document.images);
  await Promise.all(images.map(img => img.decode().catch(() => null)));
  const prose = Array.from(document.querySelectorAll(".jp-RenderedMarkdown")).map(el => {
    const copy = el.cloneNode(true);
    copy.querySelectorAll("code, pre, script, .MJX_Assistive_MathML").forEach(c => c.remove());
    return copy.innerText;
  }).join("\\n");
  return {
    title: document.title,
    h1: Array.from(document.querySelectorAll("h1")).map(h => h.innerText.replace(/¶$/, "").trim()),
    images: images.map(img => ({src: img.src.slice(0, 40), ok: img.complete && img.naturalWidth > 0})),
    math: document.querySelectorAll(".MathJax, .MathJax_Display").length,
    mathErrors: document.querySelectorAll(".MathJax_Error, merror").length,
    prose: prose,
  };
}"""


def test_every_page_renders_in_chromium(site):
    browser_path = chromium()
    if browser_path is None:
        pytest.skip("no Chromium installed (Debian: apt-get install chromium; `make test` installs it)")
    titles = page_titles(site)
    shots = site / "screenshots"
    shots.mkdir(exist_ok=True)
    problems, seen_math, seen_images = [], 0, 0
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"], timeout=HANG_GUARD_MS)
        try:
            for name, title in titles.items():
                page = browser.new_page(viewport={"width": 1200, "height": 900})
                page.set_default_timeout(HANG_GUARD_MS)
                errors = []
                page.on("console", lambda m: m.type == "error" and errors.append(f"console: {m.text}"))
                page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
                page.on("requestfailed", lambda r: errors.append(f"failed to load {r.url[:80]}"))
                # a page must need no network: anything not in the site is refused, and counts as an error
                page.route(re.compile(r"^(?!file:)"), lambda route: (errors.append(f"network: {route.request.url[:80]}"),
                                                                    route.abort()))
                page.goto((site / name).as_uri(), wait_until="load")
                page.wait_for_function("() => window.MathJax && MathJax.isReady")
                seen = page.evaluate(INSPECT)
                page.screenshot(path=str(shots / f"{Path(name).stem}.png"), full_page=True)
                page.close()
                seen_math += seen["math"]
                seen_images += len(seen["images"])
                if seen["title"] != title:
                    errors.append(f"title {seen['title']!r}, expected {title!r}")
                if name != "index.html" and title not in seen["h1"]:
                    errors.append(f"no rendered '# {title}' heading (h1: {seen['h1']})")
                errors += [f"image {i['src']}... not decoded" for i in seen["images"] if not i["ok"]]
                if seen["mathErrors"]:
                    errors.append(f"{seen['mathErrors']} MathJax errors")
                errors += [f"unrendered LaTeX: {m.group(0)[:60]!r}" for m in RAW_MATH.finditer(seen["prose"])]
                problems += [f"{name}: {e}" for e in errors]
        finally:
            browser.close()
    assert not problems, "\n".join(problems)
    print(f"{len(titles)} pages, {seen_math} typeset formulas, {seen_images} images; screenshots in {shots}")
    assert seen_math > 0 and seen_images > 0, "the lecture has formulas and figures: none were found"


def test_a_stale_or_failed_copy_is_not_published(tmp_path):
    """The site shows only what ran: a copy of another version of the notebook, or of a failed run, is refused."""
    src = tmp_path / "00_check.py"
    src.write_text("# %% [markdown]\n# # A check\n\n# %%\nprint(6 * 7)\n", encoding="utf-8")
    run_and_keep(src, tmp_path / "executed", tmp_path)
    (nb_ok,) = [nb for _, nb in build_site.executed_notebooks(tmp_path / "executed", [src])]
    assert build_site.title_of(nb_ok) == "A check"
    src.write_text(src.read_text(encoding="utf-8") + "print(1)\n", encoding="utf-8")
    with pytest.raises(ValueError, match="another version"):
        build_site.executed_notebooks(tmp_path / "executed", [src])
    nb_ok.metadata["minilora"].update(ok=False, source_sha256=build_site.source_sha256(src))
    (tmp_path / "executed" / "00_check.ipynb").write_text(nbformat.writes(nb_ok), encoding="utf-8")
    with pytest.raises(ValueError, match="failed"):
        build_site.executed_notebooks(tmp_path / "executed", [src])

# Two commands for a new machine:  `make demo` (the end-to-end demo) and `make test`.
# Each creates .venv on first use and installs everything minilora needs into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# A CPU build of PyTorch is enough for everything here; on a CUDA machine set TORCH=torch.
TORCH ?= torch==2.13.0

export TRITON_DEFAULT_FP_FUSION ?= 1
# Keep the repository root off sys.path under `python -m`: its kernels/ folder (minilora.kernels) must not be
# found as a top-level `kernels` package, which transformers probes for.
export PYTHONSAFEPATH = 1

.PHONY: setup demo test bench site browser clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,triton,notebooks]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m minilora demo

test: $(STAMP) browser
	$(BIN)/pytest

bench: $(STAMP)
	for f in benchmarks/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

# The lecture as a static site to read without running anything: every notebook executed (the same run
# `make test` does, reusing the cached base), rendered by tools/build_site.py into site/ (git-ignored), and each
# page opened in headless Chromium (tests/test_site.py), which keeps a screenshot of it in site/screenshots/.
site: $(STAMP) browser
	$(BIN)/pytest -q -rP tests/test_notebooks.py tests/test_site.py -k "runs_top_to_bottom or renders_in_chromium"
	@echo "open site/index.html"

# The browser test needs a Chromium: Debian's package, installed with apt-get where it is missing (the test
# skips, saying so, where none can be installed).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { command -v apt-get >/dev/null 2>&1 && apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } || \
	  echo "no Chromium and none could be installed: tests/test_site.py will skip"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis

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

.PHONY: setup demo test bench notebooks clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,triton,notebooks]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m minilora demo

test: $(STAMP)
	$(BIN)/pytest

bench: $(STAMP)
	for f in benchmarks/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

# Executed copies for reading without running anything: notebooks/executed/NN_name.ipynb (outputs and figures)
# and NN_name.html (when nbconvert is installed). They are what tests/test_notebooks.py ran; git ignores them.
notebooks: $(STAMP)
	MINILORA_NOTEBOOK_OUT=$(CURDIR)/notebooks/executed $(BIN)/pytest -q -rP tests/test_notebooks.py -k runs_top_to_bottom
	@echo "executed copies (.ipynb and .html) are in notebooks/executed/"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis

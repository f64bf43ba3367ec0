# UltraMem Lab: one entry point for setup, the main job, tests, benchmarks and JupyterLab.
# Everything creates the environment first if needed (a .venv next to this file).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.labcore-installed
PYTEST_ARGS ?=
SWEEP ?= sweeps/quick.yaml
SWEEP_DIR ?= runs/standard
JOBS ?= 2

.PHONY: setup system-deps lab findings test test-fast lint bench jupyter clean-runs

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch first, pinned: its CPU wheel is local; an unpinned resolve would fetch a CUDA build.
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,bench]'
	@touch $(STAMP)

setup: $(STAMP) system-deps  ## create .venv and install labcore with its dev/bench extras
	@# the compiled top-k kernel (cached; without a compiler it says so in one line and is skipped);
	@# called, not run with -m: importing labcore.layers loads the module first (runpy would warn)
	@$(PY) -c 'from labcore.layers.fast.compiled import main; raise SystemExit(main(["--build"]))'

system-deps:  ## Debian chromium for kaleido (static figures) and the browser tests
	@bash scripts/system_deps.sh

lab: setup  ## the main job: quick ablation sweep of all notebooks + report
	$(VENV)/bin/labcore sweep $(SWEEP) --jobs $(JOBS) --results-root runs --reports-root reports

findings: setup  ## the published findings (docs/findings.md, CSVs, figures) of a finished sweep, then checked
	$(VENV)/bin/labcore findings $(SWEEP_DIR) --out docs
	$(VENV)/bin/labcore findings --check --out docs

test: setup  ## the whole test suite (unit, notebooks, sweeps, slow, real-browser UI)
	$(VENV)/bin/pytest -m "not gpu" $(PYTEST_ARGS)

test-fast: setup  ## the quick developer loop: no slow and no browser tests
	$(VENV)/bin/pytest -m "not slow and not ui and not gpu" -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

bench: setup  ## layer and inference benchmarks (print ratios measured in the same run)
	$(PY) -m labcore.bench layers
	$(PY) -m labcore.bench inference

jupyter: setup  ## JupyterLab on 127.0.0.1 with a token, opened on notebooks/
	$(VENV)/bin/jupyter lab --no-browser --ip 127.0.0.1 --notebook-dir notebooks $$( [ "$$(id -u)" = 0 ] && echo --allow-root )

clean-runs:
	rm -rf runs reports

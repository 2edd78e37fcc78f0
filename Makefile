# The two commands of the README:
#   make demo   set up .venv if needed, run the offline demo end to end, write figures/
#   make test   set up .venv if needed, run the package tests and the notebook checks
# Everything installs from the package registry; nothing else is downloaded.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export PYTHONHASHSEED ?= 0

.PHONY: setup demo test test-package test-notebooks lab sources benchmark clean-demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,parquet,lidc]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/sm run configs/demo.yaml

test: test-package test-notebooks

test-package: $(STAMP)
	$(BIN)/python -m pytest tests

test-notebooks: $(STAMP)
	$(BIN)/python -m pytest --nbval-lax --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:randomly notebooks

lab: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[lab]"
	$(BIN)/jupyter lab notebooks

sources: $(STAMP)
	$(BIN)/papermill notebooks/00_source_pretraining.ipynb /dev/null

benchmark: $(STAMP)
	$(BIN)/python benchmarks/phantom_learnability.py

# Two commands run everything (see README Quickstart):
#   make repro   create .venv, install, run the whole pipeline with `dvc repro` (the demo)
#   make test    create .venv, install, run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup repro test test-all lint bench clean

# The install is one step, the same as the Dockerfile's (minus the GPU wheels).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -e '.[test]'
	touch $@

setup: $(VENV)/.installed

repro: setup
	$(BIN)/dvc repro

test: setup
	$(BIN)/pytest -m "not slow and not gpu"

# Everything, the end-to-end runs of minutes included.
test-all: setup
	$(BIN)/pytest -m "not gpu"

bench: setup
	$(BIN)/python bench/preprocess.py
	$(BIN)/python bench/model.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/inference.py

clean:
	rm -rf $(VENV) .pytest_cache

# Two commands run everything (see README Quickstart):
#   make repro   create .venv, install, run the whole pipeline with `dvc repro` (the demo)
#   make test    create .venv, install, run the fast suite, then the slow end-to-end suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup repro test test-fast test-slow test-heavy lint bench clean

# The install is one step, the same as the Dockerfile's (minus the GPU wheels).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -e '.[test]'
	touch $@

setup: $(VENV)/.installed

repro: setup
	$(BIN)/dvc repro

# The fast suite first (it fails in a minute or two), then the end-to-end runs of minutes
# (dvc repro, kfp.local, torchrun, mlflow server, serving, the installed package).
test: test-fast test-slow

test-fast: setup
	$(BIN)/pytest -m "not slow and not gpu and not heavy"

test-slow: setup
	$(BIN)/pytest -m "slow and not gpu and not heavy" --durations=12

# Full-size forwards of the paper configurations other than AMOS (minutes each; not in CI).
test-heavy: setup
	$(BIN)/pytest -m "heavy and not gpu"

bench: setup
	$(BIN)/python bench/preprocess.py
	$(BIN)/python bench/model.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/inference.py

clean:
	rm -rf $(VENV) .pytest_cache

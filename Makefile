# NormBench — `make run` starts the embedded service and its demo; `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned so pip takes the matching wheel: a CPU build where one is provided locally, the
# CUDA build from PyPI on a GPU machine. Override with TORCH_SPEC='torch==x.y' if needed.
TORCH_SPEC ?= torch==2.13.0

.PHONY: run test lint audit services clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[worker,test]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/python -m app.devserver

services:
	bash scripts/ensure-services.sh

test: $(BIN)/.installed services
	$(BIN)/ruff check .
	$(BIN)/mypy app models
	$(BIN)/python -m pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy app models

# Known-vulnerability check of every installed distribution (the environment `make` built from
# pyproject.toml) against the PyPI advisory database; needs network access to pypi.org. The security
# floors for python-multipart, Pillow and torch live in pyproject.toml.
audit: $(BIN)/.installed
	$(BIN)/pip-audit --local --skip-editable --progress-spinner off

clean:
	rm -rf $(VENV) .normbench

# NormBench — `make run` starts the embedded service and its demo; `make test` runs every test;
# `make test-fast` runs the pure tests in seconds, with no services, system packages or root.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned so pip takes the matching wheel: a CPU build where one is provided locally, the
# CUDA build from PyPI on a GPU machine. Override with TORCH_SPEC='torch==x.y' if needed.
TORCH_SPEC ?= torch==2.14.1
# torchvision builds the ImageNet networks (models/torchvision_nets.py); its release is tied to torch's.
TORCHVISION_SPEC ?= torchvision==0.29.1
# Extra pytest arguments, e.g. `make test-fast PYTEST_ARGS='-k ingest'`. Exit status 5 (no test selected)
# counts as success, so a selection that matches nothing does not fail the build.
PYTEST_ARGS ?=
# One torch/OpenMP thread per test process: the suite runs pytest and several worker processes side by side
# on few cores, where a second spinning OpenMP thread per process made CPU training ~20x slower (measured).
PYTEST = OMP_NUM_THREADS=1 $(BIN)/python -m pytest $(PYTEST_ARGS)
# The pure tier leaves out what needs Postgres/Redis (marked by tests/conftest.py), system packages, worker
# processes, or minutes of CPU training; the services are pointed at a closed port, so an unmarked test that
# reaches them fails instead of passing.
FAST_ENV = NORMBENCH_TEST_PG=postgres@127.0.0.1:9 NORMBENCH_TEST_REDIS=redis://127.0.0.1:9/15
FAST_MARKS = not services and not system and not e2e and not slow
# Processes the pure tier runs in (pytest-xdist): two keep both cores of a small machine busy; each pays the
# imports (torch, torchvision, FastAPI: about 10 s of CPU), so more than the cores is slower. 0 runs in one.
FAST_WORKERS ?= 2
# test_fuzz_api (all of it `services`) is the only user of schemathesis and hypothesis: the fast tier neither
# imports it nor loads their pytest plugins (about 6 s of CPU per process).
FAST_SKIP = --ignore=tests/test_fuzz_api.py -p no:schemathesis -p no:hypothesispytest

.PHONY: run test test-fast lint deps audit services clean

# -qq: pip's errors only. A single -q still prints warnings, and a machine's pip configuration can add a
# hundred lines of them (an index location that does not exist, per package) that bury everything else.
PIP_INSTALL = $(BIN)/pip install -qq
# Arguments for the devserver, e.g. `make run RUN_ARGS=--no-demo` (the service alone) or `RUN_ARGS=--new-demo`.
RUN_ARGS ?=

$(BIN)/.installed: pyproject.toml
	@echo "installing NormBench, PyTorch and the test tools into $(VENV) (the first time: a few minutes)"
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) "$(TORCH_SPEC)" "$(TORCHVISION_SPEC)"
	$(PIP_INSTALL) -e '.[worker,test]'
	touch $@

# No shell around the devserver (no metacharacters in the line): make runs it directly, so Ctrl-C and SIGTERM
# reach it, and it stops the API and the worker and exits 0.
run: $(BIN)/.installed
	$(BIN)/python -m app.devserver $(RUN_ARGS)

# System packages the full suite uses (chromium, docker-compose); installs with apt as root when missing.
deps:
	bash scripts/install-deps.sh

services:
	bash scripts/ensure-services.sh

test: $(BIN)/.installed deps services lint
	$(PYTEST) || [ $$? -eq 5 ]

test-fast: $(BIN)/.installed
	$(FAST_ENV) $(PYTEST) -q -n $(FAST_WORKERS) $(FAST_SKIP) -m "$(FAST_MARKS)" || [ $$? -eq 5 ]

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy app models workers

# Known-vulnerability check of every installed distribution (the environment `make` built from
# pyproject.toml) against the PyPI advisory database; needs network access to pypi.org. The security
# floors for python-multipart, Pillow and torch live in pyproject.toml.
audit: $(BIN)/.installed
	$(BIN)/pip-audit --local --skip-editable --progress-spinner off

clean:
	rm -rf $(VENV) .normbench

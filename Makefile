# Two commands for a new user (see README):
#   make pipeline   create .venv, install, run the whole pipeline (dvc repro)
#   make test       create .venv if needed, install, run the test suite
# The first supported Python that runs (pyproject.toml's requires-python), else python3.
# 3.11 first: CI's, and the one whose torch wheels this project's machines keep on disk.
PYTHON ?= $(firstword $(foreach v,3.11 3.12 3.13,$(shell python$(v) -c 'import sys; print(sys.executable)' 2>/dev/null)) python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: pipeline test test-fast install lint

install: $(STAMP)

# Reinstall when the pinned inputs change. constraints.txt pins the whole tree.
$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) .ci/python_check.py || { echo "Install a supported Python (Debian/Ubuntu: apt install python3.12-venv; or pyenv install 3.12) and run: make $(MAKECMDGOALS) PYTHON=python3.12"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable ".[dev]"
	touch $(STAMP)

pipeline: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# Two workers: most of the suite waits on servers and single-threaded process start-up,
# which overlap well even on two cores. Each worker, and every process it starts, gets
# cores/workers torch threads (tests/conftest.py): more would oversubscribe the cores.
# The session's pipeline run is built once, in the background, while the tests that do
# not read it run (tests/pipeline_run.py).
# TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -n $(TEST_WORKERS) --durations=30

# The development loop: everything but the end-to-end tests (servers, training).
test-fast: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src pipelines tests benchmarks .ci

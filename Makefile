# Set-up, demo and tests. Everything runs from the virtual environment in .venv/.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.raylib-installed
# torch first and pinned: a looser spec would pull a multi-GB CUDA build on CPU machines
TORCH  ?= torch==2.13.0

.PHONY: setup demo test test-slow test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/raylib demo

# the suite: every test not marked slow (~15 min on 2 CPU cores)
test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow" --durations=15

# the long end-to-end tests (multi-node, fault tolerance, S3, job submission, ...; ~22 min)
test-slow: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow --durations=15

test-all: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --durations=15

bench: setup
	$(BIN)/python jobs/bench/train_overhead.py

clean:
	rm -rf $(VENV) models data runs .pytest_cache

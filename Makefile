# Two commands on a fresh machine with only Python 3.10+: `make train` and `make test`.
# Each creates .venv when missing and (re)installs when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: train test test-fast clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

train: $(VENV)/.installed
	$(BIN)/python scripts/train.py --config configs/recommended.yaml --trainer.max_epochs 40 $(ARGS)

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest --durations=15 $(ARGS)

# The inner loop: everything but the end-to-end tests.
test-fast: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

clean-venv:
	rm -rf $(VENV)

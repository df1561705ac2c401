# Two commands on a fresh machine with only Python 3.11+: `make train` and `make test`.
# Both install exactly what uv.lock pins (hashed, every platform and Python version) into .venv,
# with sync semantics: a changed lock or pyproject.toml changes the venv, extra packages go.
PYTHON ?= python3
SHELL  := bash
# A failing `uv export` must fail the pipe into check_env.py.
.SHELLFLAGS := -eo pipefail -c
VENV   := .venv
BIN    := $(VENV)/bin
# uv itself, hash-pinned in tools/uv-requirements.txt, in a venv of its own (syncing .venv
# exactly would uninstall a uv living there).
UV_DIR := .uv
UV     := $(UV_DIR)/bin/uv
ARGS   ?=
# Test processes (pytest-xdist): two on a 2-core machine (docs/testing.md has the timings).
# Whole files go to one process (--dist loadfile), so module fixtures are built once.
WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -n $(WORKERS) --dist loadfile

# uv reads neither pip's configuration files nor PIP_* variables, so a machine's pip caps or
# local wheel folders cannot change what is installed; it must not download a Python either.
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)
# pip compiles .pyc files at install; uv does not by default. Without them every process
# (and PYTHONDONTWRITEBYTECODE=1 machines never write them) recompiles torch and Lightning
# from source at import, which makes every start much slower (measured: docs/install.md, "What gets installed").
export UV_COMPILE_BYTECODE := 1

.PHONY: train test test-fast coverage test-latest check-env lock lock-upgrade clean-venv

$(UV): tools/uv-requirements.txt
	rm -rf $(UV_DIR)
	$(PYTHON) -m venv $(UV_DIR)
	$(UV_DIR)/bin/python -m pip install -q --require-hashes -r tools/uv-requirements.txt
	touch $@

# --locked: refuse (with uv's message naming `uv lock`) when uv.lock disagrees with pyproject.toml.
# The stamp names the interpreter: `make test PYTHON=python3.12` syncs a venv of that Python.
STAMP := $(VENV)/.synced-$(notdir $(PYTHON))
$(STAMP): pyproject.toml uv.lock $(UV)
	rm -f $(VENV)/.synced-*
	$(UV) sync --locked --extra dev --extra vocoder --python $(PYTHON)
	touch $@

train: $(STAMP)
	$(BIN)/python scripts/train.py --config configs/recommended.yaml --trainer.max_epochs 40 $(ARGS)

test: check-env
	$(PYTEST) --durations=15 $(ARGS)

# The inner loop: everything but the end-to-end tests (under 2 minutes: docs/testing.md).
test-fast: $(STAMP)
	$(PYTEST) -m "not slow" $(ARGS)

# Line coverage of musicvae/ by the whole suite, its subprocesses and forked children included
# (pyproject.toml's [tool.coverage.run]: the xdist workers are subprocesses too).
# The report comes even when a test fails; the target then fails with pytest's status.
coverage: $(STAMP)
	$(BIN)/python -m coverage erase
	status=0; $(BIN)/python -m coverage run -m pytest -n $(WORKERS) --dist loadfile -p no:cacheprovider $(ARGS) \
		|| status=$$?; \
	$(BIN)/python -m coverage combine -q && $(BIN)/python -m coverage report --skip-covered --sort=cover; \
	exit $$status

# The lock against pyproject.toml, the venv against the lock, and the stack loads (torchaudio's
# C++ extension included). Fails with one line per disagreement.
check-env: $(STAMP)
	$(UV) lock --check --python $(PYTHON)
	$(UV) export --frozen --no-hashes --extra dev --extra vocoder --no-emit-project --format requirements-txt -q \
		| $(BIN)/python tools/check_env.py

# The newest versions pyproject.toml's ranges allow, without the lock and without any pip
# configuration of this machine (uv reads none; --no-config skips uv's own), in .venv-latest:
# prints what it tested, then runs the fast tests. Finds the next upstream break before a user does.
test-latest: | $(UV)
	rm -rf .venv-latest
	$(UV) venv -q --no-config --python $(PYTHON) .venv-latest
	VIRTUAL_ENV=.venv-latest $(UV) pip install -q --no-config --refresh -e ".[dev,vocoder]"
	$(UV) export --frozen --no-hashes --extra dev --extra vocoder --no-emit-project --format requirements-txt -q \
		| .venv-latest/bin/python tools/check_env.py --newer-than-lock
	.venv-latest/bin/python -m pytest -n $(WORKERS) --dist loadfile -m "not slow" -p no:cacheprovider $(ARGS)

# After editing dependencies in pyproject.toml: the smallest change to uv.lock that fits them.
lock: | $(UV)
	$(UV) lock --python $(PYTHON)

# Every locked package to the newest version its range allows (then run `make test`).
lock-upgrade: | $(UV)
	$(UV) lock --upgrade --python $(PYTHON)

clean-venv:
	rm -rf $(VENV) .venv-latest

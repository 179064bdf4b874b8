# `make demo` and `make test` work on a fresh clone: they create .venv and install from this repo.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-out
# Test processes (pytest-xdist): one per core, at most 4; tests/conftest.py says which modules stay in one
# process (their module-scoped fixtures are built once) and which go first. TEST_WORKERS=0: this process.
TEST_WORKERS ?= auto
PYTEST := $(BIN)/python -m pytest -q --durations=20 -n $(TEST_WORKERS) --maxprocesses 4 --dist loadscope --no-loadscope-reorder

.PHONY: install demo test test-fast clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/wds-encode demo $(DEMO_DIR)

test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache

# `make demo` and `make test` work on a fresh clone: they create .venv and install from this repo.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-out
# Test processes (pytest-xdist): one per core, at most 4, each taking whole modules (their module-scoped
# fixtures are built once), the longest first (tests/conftest.py). TEST_WORKERS=0: in this process.
TEST_WORKERS ?= auto
PYTEST := $(BIN)/python -m pytest -q --durations=20 -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile

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

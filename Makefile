# dsv4 developer commands. `make test` and `make demo` create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --quiet --quiet
STAMP  := $(VENV)/.dsv4-installed
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup $(VENV) test test-slow lint format demo clean

help:
	@echo "make setup      create $(VENV) and install dsv4 with its test extras (done on demand)"
	@echo "make test       fast test suite (pytest -m 'not slow')"
	@echo "make test-slow  slow tests only (pytest -m slow)"
	@echo "make lint       ruff check + ruff format --check + mypy on model/ and infer/ (settings in pyproject.toml)"
	@echo "make format     ruff format + the safe ruff fixes"
	@echo "make demo       train tiny on the Python stdlib (240 steps, ~10 min), report, samples, bpb vs xz"
	@echo "make clean      remove caches and build output (keeps $(VENV))"
	@echo "variables: PYTHON=$(PYTHON) VENV=$(VENV) PYTEST_ARGS=..."

# torch is installed first and pinned: an unpinned resolve could pull a multi-GB CUDA build.
# The stamp makes repeated runs instant; editing pyproject.toml re-runs the install.
# -qq: pip still prints errors, but not the machine-config warnings about missing local index dirs.
$(STAMP): pyproject.toml
	@test -x $(PY) || { echo "==> creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@echo "==> installing torch==2.13.0"
	@$(PIP) install torch==2.13.0
	@echo "==> installing dsv4 (editable) with test extras"
	@$(PIP) install -e '.[test]'
	@touch $@

setup $(VENV): $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# pytest exits 5 when no test is selected; that is not a failure here.
test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q $(PYTEST_ARGS) || [ $$? -eq 5 ]

demo: $(STAMP)
	$(VENV)/bin/dsv4 demo

clean:
	rm -rf build dist .pytest_cache src/*.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

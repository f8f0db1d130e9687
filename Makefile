# `make demo` and `make test` install everything they need into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch goes in first and pinned: on this project's build machines the pin resolves to a local CPU wheel;
# left to the resolver, `torch` could pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export HF_HUB_DISABLE_TELEMETRY ?= 1

.PHONY: install demo test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install
	HF_HUB_OFFLINE=1 $(PY) -m flows.demo --workdir demo-output

# Two test processes by default: most slow tests wait on subprocesses and servers, so two halve the run
# even on two cores (each process starts its own Prefect test server). TEST_WORKERS=0 runs them in one.
TEST_WORKERS ?= 2

test: install
	$(PY) -m pytest -n $(TEST_WORKERS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf demo-output .pytest_cache

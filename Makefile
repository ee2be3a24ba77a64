# The two commands: `make demo` (set up and run a real backfill) and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test soak lint format ui bench bench-live db-stop clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/backfill-assets demo

test: setup lint
	$(BIN)/pytest $(PYTEST_ARGS)

# 300 random SIGKILLs of a writer (make test runs 30): every day old or new, the audit true.
soak: setup
	BACKFILL_SOAK_TRIALS=$${BACKFILL_SOAK_TRIALS:-300} $(BIN)/pytest -s tests/test_kill_soak.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/python benchmarks/backfill_speed.py $(BENCH_ARGS)

# The application's latency (pgbench) during a year's backfill and during naive updates.
bench-live: setup
	$(BIN)/python benchmarks/live_latency.py $(BENCH_ARGS)

ui: setup
	$(BIN)/backfill-assets dev

db-stop: setup
	$(BIN)/backfill-assets db stop

clean: db-stop
	rm -rf .pgdata .pgdata-test dagster_home/storage dagster_home/logs dagster_home/history logs

# The two commands: `make demo` (set up and run a real backfill) and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
CHROMIUM ?= /usr/bin/chromium

.PHONY: setup broker demo test soak lint format ui screenshots bench bench-scale bench-live bench-celery db-stop clean

setup: $(VENV)/.installed

# The UI test drives Debian's Chromium (Playwright cannot download a browser here).
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then apt-get install -y -qq chromium >/dev/null \
		|| { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }; \
	else echo "the UI test needs Chromium at $(CHROMIUM): sudo apt-get install -y chromium"; exit 1; fi

# The Celery tests' broker: RabbitMQ on 127.0.0.1:5672, the machine's when one listens there;
# else Debian's rabbitmq-server, installed (as Chromium is) and started.
PORT_OPEN = $(BIN)/python -c "import socket; socket.create_connection(('127.0.0.1', 5672), 2)" 2>/dev/null
broker: setup
	@$(PORT_OPEN) && exit 0; \
	if ! command -v rabbitmq-server >/dev/null; then \
		if [ "$$(id -u)" != 0 ]; then echo "the Celery tests need RabbitMQ on 127.0.0.1:5672: \
			sudo apt-get install -y rabbitmq-server && sudo rabbitmq-server -detached"; exit 1; fi; \
		apt-get install -y -qq rabbitmq-server >/dev/null 2>&1 \
			|| { apt-get update -qq && apt-get install -y -qq rabbitmq-server >/dev/null 2>&1; }; \
	fi; \
	$(PORT_OPEN) || rabbitmq-server -detached; \
	for i in $$(seq 120); do $(PORT_OPEN) && exit 0; sleep 1; done; \
	echo "RabbitMQ did not start listening on 127.0.0.1:5672"; exit 1

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/backfill-assets demo

# Tests run on TEST_WORKERS pytest-xdist workers side by side (each test has its own databases;
# the one that restarts its server has its own cluster), handed out one at a time, the longest
# first (tests/durations.json; BACKFILL_RECORD_DURATIONS=1 make test updates it). PYTEST_ARGS
# runs just what it names, in one process.
TEST_WORKERS ?= 2
test: setup $(CHROMIUM) broker lint
ifeq ($(strip $(PYTEST_ARGS)),)
	$(BIN)/pytest -n $(TEST_WORKERS) --maxschedchunk 1
else
	$(BIN)/pytest $(PYTEST_ARGS)
endif

# 300 random SIGKILLs of a writer (make test runs 30): every day old or new, the audit true;
# then 15 of CLI materializes, daemon-launched runs and dbt builds (make test: 3): the queue drains;
# then 20 pairs of plain `dbt build`s of the same days made to meet (make test: 4): no duplicate.
soak: setup
	BACKFILL_SOAK_TRIALS=$${BACKFILL_SOAK_TRIALS:-300} \
	BACKFILL_QUEUE_SOAK_TRIALS=$${BACKFILL_QUEUE_SOAK_TRIALS:-15} \
	BACKFILL_DBT_PAIRS=$${BACKFILL_DBT_PAIRS:-20} \
		$(BIN)/pytest -s tests/test_kill_soak.py tests/test_queue_soak.py \
		tests/test_dbt_model.py::test_two_dbt_builds_of_the_same_days_outside_dagster_never_duplicate_a_row

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/python benchmarks/backfill_speed.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/merge_vs_delete_insert.py
	$(BIN)/python benchmarks/dbt_in_process.py

# Over 20 M rows: 2,001 days of ~10,000 orders, end to end through the daemon (~1 h, ~15 GB).
bench-scale: setup
	$(BIN)/python benchmarks/backfill_speed.py --scale $(BENCH_ARGS)

# 1,000 days of ~2,400 orders (2.4 M rows) end to end in process, then with steps on 1, 2 and 4
# Celery workers over the machine's RabbitMQ; ends with the sizing table of docs/scale-out.md.
bench-celery: setup broker
	$(BIN)/python benchmarks/backfill_speed.py --from 2022-01-01 --days 1000 --sizes 2400 \
		--rounds 1 --per-run 25 --celery-workers 1 2 4 $(BENCH_ARGS)

# The application's latency (pgbench) during a year's backfill and during naive updates.
bench-live: setup
	$(BIN)/python benchmarks/live_latency.py $(BENCH_ARGS)

ui: setup
	$(BIN)/backfill-assets dev

# The UI test's screenshot of each step, and each page's load time, into docs/images/ui/.
screenshots: setup $(CHROMIUM)
	BACKFILL_UI_SCREENSHOTS=docs/images/ui $(BIN)/pytest -q tests/test_ui.py

db-stop: setup
	$(BIN)/backfill-assets db stop

clean: db-stop
	rm -rf .pgdata .pgdata-test dagster_home/storage dagster_home/logs dagster_home/history logs

"""The project's daemon: Dagster's daemons with a backfill pass every second, not every 30 s.

The first test pins what ``defs/daemon.py`` takes from Dagster's private daemon modules, so an
upgrade that moves it fails here by name rather than as a daemon that silently never passes.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from pathlib import Path

import yaml
from dagster import AssetKey, DagsterInstance, DagsterRun, DagsterRunStatus, RunsFilter
from support import failed_run_report, record_past_writes, wait_for

from backfill_assets.core import settings
from backfill_assets.core.registry import DEFAULT_TABLES_DIR, load_registry
from backfill_assets.defs import daemon as daemon_module
from backfill_assets.defs import dagster_internals
from backfill_assets.defs.daemon import (
    PromptBackfillDaemon,
    PromptRunQueueDaemon,
    daemon_assets,
    project_daemons,
)
from backfill_assets.defs.dagster_internals import WILL_RETRY_TAG
from backfill_assets.defs.definitions import build_definitions
from backfill_assets.tooling import cli
from backfill_assets.tooling.launch import (
    daemon_is_alive,
    launch_asset_backfill,
    running_daemon,
    wait_for_backfill,
)

FCT_ORDERS = AssetKey(["analytics", "fct_orders"])


def test_the_dagster_internals_the_daemon_relies_on_are_where_they_were(instance):
    """Dagster upgraded? Each assertion names what moved; fix ``defs/daemon.py`` to match."""
    iteration = inspect.signature(dagster_internals.execute_backfill_iteration).parameters
    for name in (
        "workspace_process_context",
        "logger",
        "threadpool_executor",
        "submit_threadpool_executor",
        "backfill_futures",
    ):
        assert name in iteration, f"execute_backfill_iteration lost its parameter {name!r}"
    stock_loop = inspect.getsource(
        inspect.getmodule(dagster_internals.execute_backfill_iteration)
    ).split("def execute_backfill_iteration_loop", 1)[1]
    assert "DEFAULT_DAEMON_INTERVAL_SECONDS" in stock_loop, (
        "Dagster's backfill loop no longer sleeps the fixed DEFAULT_DAEMON_INTERVAL_SECONDS: "
        "it may have a setting now; prefer it over PromptBackfillDaemon"
    )
    assert dagster_internals.DEFAULT_DAEMON_INTERVAL_SECONDS == 30

    daemons = project_daemons(instance, interval_s=1.0)
    try:
        stock = list(instance.get_required_daemon_types())
        assert [d.daemon_type() for d in daemons] == stock, "every daemon dagster-daemon starts"
        (backfill,) = [d for d in daemons if d.daemon_type() == "BACKFILL"]
        assert isinstance(backfill, PromptBackfillDaemon) and backfill.interval_s == 1.0
        (queue,) = [d for d in daemons if d.daemon_type() == "QUEUED_RUN_COORDINATOR"]
        assert isinstance(queue, PromptRunQueueDaemon)
        assert queue.interval_seconds == instance.run_coordinator.dequeue_interval_seconds
        assert queue.woken is backfill.passed, "a backfill pass wakes the run queue"
        # The loop PromptRunQueueDaemon replaces: Dagster's interval loop around run_iteration.
        stock_queue_loop = inspect.getsource(dagster_internals.QueuedRunCoordinatorDaemon.core_loop)
        assert "self.run_iteration(workspace_process_context)" in stock_queue_loop
        # The pass is handed the thread pools the stock BackfillDaemon builds from the settings.
        assert hasattr(backfill, "_threadpool_executor")
        assert hasattr(backfill, "_submit_threadpool_executor")
    finally:
        for daemon in daemons:
            daemon.__exit__(None, None, None)


def test_a_backfill_is_closed_within_seconds_of_its_last_run_ending(dagster_env, tmp_path):
    """Under dagster-daemon the backfill's first run waits for the next 30 s pass, and so does
    its closing after the last run; here both follow within a couple of passes."""
    log = tmp_path / "daemon.log"
    with running_daemon(dagster_env, log), DagsterInstance.get() as instance:
        started = time.time()
        while not daemon_is_alive(instance, within_s=time.time() - started):
            assert time.time() - started < 120, "the daemon never reported its backfill loop"
            time.sleep(0.2)
        backfill_id = launch_asset_backfill(instance, [FCT_ORDERS], "2024-05-01", "2024-05-02")
        backfill, runs = succeeded(instance, backfill_id, log)
        assert len(runs) == 1
        (run,) = runs
        first_run_wait = run.create_timestamp.timestamp() - backfill.backfill_timestamp
        closing_wait = backfill.backfill_end_timestamp - run.end_time
    assert first_run_wait < 10, f"first run submitted {first_run_wait:.1f}s after the launch"
    assert closing_wait < 10, f"backfill closed {closing_wait:.1f}s after its run ended"


def test_a_runs_end_wakes_the_backfill_pass_and_the_run_queue_before_their_intervals(
    dagster_env, tmp_path, conn
):
    """Backfill passes and run queue passes a minute apart: a backfill of three one-day runs,
    two at a time, still ends well within a minute of its first run. The third run starts when
    one of the first two ends (the queue woken by it), and the backfill is closed when the last
    one ends (the backfill pass woken by it), not at the next passes a minute later."""
    record_past_writes(conn, "analytics.fct_orders", seconds=600)  # one partition a run
    home = Path(dagster_env["DAGSTER_HOME"])
    config = yaml.safe_load((home / "dagster.yaml").read_text())
    config["run_coordinator"]["config"]["dequeue_interval_seconds"] = 60
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    env = {**dagster_env, settings.DAEMON_INTERVAL_ENV: "60"}
    log = tmp_path / "daemon.log"
    with DagsterInstance.get() as instance:
        # Launched before the daemon starts: its first backfill pass, at once, submits the runs.
        backfill_id = launch_asset_backfill(instance, [FCT_ORDERS], "2024-05-01", "2024-05-03")
        with running_daemon(env, log):
            backfill, runs = succeeded(instance, backfill_id, log)
        assert len(runs) == 3
        first_run = min(record.create_timestamp.timestamp() for record in runs)
        last_start = max(record.start_time for record in runs)
        took = backfill.backfill_end_timestamp - first_run
    assert last_start - first_run < 50, f"the third run started {last_start - first_run:.0f} s in"
    assert took < 50, f"the backfill ended {took:.0f} s after its first run was submitted"


def succeeded(instance: DagsterInstance, backfill_id: str, log: Path) -> tuple:
    """The backfill and the instance's run records once it has ended; fails, naming its failed
    runs, unless it completed successfully."""
    wait_for_backfill(instance, backfill_id, timeout_s=300, poll_s=0.2)
    backfill = instance.get_backfill(backfill_id)
    runs = instance.get_run_records()
    ids = [record.dagster_run.run_id for record in runs]
    assert backfill.status.value == "COMPLETED_SUCCESS", failed_run_report(instance, ids, log)
    return backfill, runs


def test_status_names_the_assets_a_backfill_wants_that_the_running_daemons_code_lacks(
    dagster_env, tmp_path, capsys
):
    """The daemon stores the asset keys of the code it runs; ``status`` compares a backfill's
    assets with them (not Dagster's error text): here a table declared after the daemon
    started (its code never loaded it)."""
    merged = AssetKey(["analytics", "fct_orders_merge"])
    newer = build_definitions(
        load_registry([DEFAULT_TABLES_DIR, Path(__file__).parent / "merge_tables"]),
        check_sql=False,
    )
    with running_daemon(dagster_env, tmp_path / "daemon.log"), DagsterInstance.get() as instance:
        wait_for(lambda: daemon_assets(instance), 120, "the daemon never stored its assets")
        loaded = daemon_assets(instance)
        assert "analytics/fct_orders" in loaded and "analytics/daily_revenue" in loaded
        assert "analytics/fct_orders_merge" not in loaded
        backfill_id = launch_asset_backfill(
            instance, [merged], "2024-05-01", "2024-05-01", definitions=newer
        )
        report = wait_for_backfill(instance, backfill_id, timeout_s=120, poll_s=0.2)
        assert report.daemon_status == "FAILED"
        capsys.readouterr()
        assert cli.main(["status", backfill_id]) == 1
    out = capsys.readouterr().out
    assert "the running daemon's code lacks analytics/fct_orders_merge of this backfill" in out


def test_the_retry_daemon_reads_a_failed_runs_status_once_it_is_stored(instance, monkeypatch):
    """Dagster stores a run's failure event before its status; a retry pass reading the run in
    between saw it STARTED, tagged "will retry", and gave the retry up for good. The pass now
    reads the runs of its events again until their status has landed, then retries as Dagster
    does (whose retry needs a code location: here it is recorded instead)."""
    run = instance.add_run(
        DagsterRun(
            job_name="backfill", status=DagsterRunStatus.STARTED, tags={WILL_RETRY_TAG: "true"}
        )
    )
    stale = instance.get_run_records(filters=RunsFilter(run_ids=[run.run_id]))
    assert stale[0].dagster_run.status == DagsterRunStatus.STARTED
    handed: list = []
    monkeypatch.setattr(
        daemon_module,
        "consume_new_runs_for_automatic_reexecution",
        lambda context, records, logger: (
            handed.extend(r.dagster_run.status for r in records) or iter(())
        ),
    )
    failing = threading.Timer(0.5, instance.report_run_failed, [run])
    failing.start()

    context = type("Context", (), {"instance": instance})()
    retry = daemon_module.SettledRetryDaemon()
    try:
        (handler,) = retry.handle_updated_runs_fns
        list(handler(context, stale, logging.getLogger("test")))
    finally:
        failing.join()
        retry.__exit__(None, None, None)

    assert handed == [DagsterRunStatus.FAILURE]

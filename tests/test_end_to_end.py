"""The whole path: `dagster job backfill` records a backfill, the real daemon runs it.

The instance is configured by the repository's own dagster_home/dagster.yaml (PostgreSQL storage,
queued run coordinator), pointed at this test's databases through the environment.
"""

from __future__ import annotations

import subprocess

import pytest
from dagster import AssetKey, DagsterInstance, DagsterRunStatus, RunsFilter
from support import (
    FCT_ORDERS,
    dbt_models,
    failed_run_report,
    latest_check,
    record_past_writes,
)

from backfill_assets.core import settings
from backfill_assets.core.partitioning import UnknownPartitionError
from backfill_assets.core.writer import insert_statement
from backfill_assets.defs.checks import CHECKS
from backfill_assets.defs.dagster_internals import AssetCheckExecutionRecordStatus
from backfill_assets.defs.partitions import WRITES_POOL
from backfill_assets.tooling.launch import (
    launch_asset_backfill,
    launch_job_backfill,
    running_daemon,
    summarize_backfill,
    wait_for_backfill,
)

DAYS = ["2024-05-01", "2024-05-02", "2024-05-03"]
JOB = "backfill__analytics__fct_orders__with_downstream"
FCT_ORDERS_KEY = AssetKey(["analytics", "fct_orders"])
DAILY_REVENUE_KEY = AssetKey(["analytics", "daily_revenue"])


def source_counts(conn) -> dict[str, int]:
    counts = {}
    for key in DAYS:
        query = insert_statement(FCT_ORDERS).as_string(conn).split(" SELECT ", 1)[1]
        counts[key] = conn.execute(
            f"SELECT count(*) FROM (SELECT {query}) AS q",
            FCT_ORDERS.partitioning.window(key).as_params(),
        ).fetchone()[0]
    return counts


def test_a_cli_backfill_is_executed_by_the_daemon_and_every_partition_ends_materialized(
    dagster_env, conn, tmp_path
):
    with (
        DagsterInstance.get() as instance,
        running_daemon(dagster_env, tmp_path / "daemon.log"),
    ):
        backfill_id = launch_job_backfill(
            dagster_env, JOB, FCT_ORDERS.partitioning, DAYS[0], DAYS[-1]
        )
        progress = wait_for_backfill(instance, backfill_id, timeout_s=600)

        assert len(progress.runs) == len(DAYS), "a job backfill runs one partition per run"
        assert set(progress.runs.values()) == {DagsterRunStatus.SUCCESS}, failed_run_report(
            instance, progress.runs, tmp_path / "daemon.log"
        )
        for key in (FCT_ORDERS_KEY, DAILY_REVENUE_KEY):
            assert instance.get_materialized_partitions(key) == set(DAYS)
        summary = summarize_backfill(instance, backfill_id)

    written = dict(
        conn.execute(
            "SELECT order_day::text, count(*) FROM analytics.fct_orders GROUP BY 1"
        ).fetchall()
    )
    assert written == source_counts(conn)
    assert summary.rows_written == sum(written.values())
    per_day = len(CHECKS) + len(dbt_models.check_keys)  # fct_orders' checks and the dbt tests
    assert summary.checks_passed == per_day * len(DAYS) and summary.checks_failed == 0
    revenue_days = conn.execute("SELECT order_day::text FROM analytics.daily_revenue").fetchall()
    assert sorted(day for (day,) in revenue_days) == DAYS


def test_the_dagster_cli_refuses_an_unknown_partition_and_queues_nothing(dagster_env):
    command = ["dagster", "job", "backfill", "-w", str(settings.WORKSPACE_FILE)]
    command += ["-j", JOB, "--from", "2023-12-30", "--to", "2024-01-02", "--noprompt"]
    completed = subprocess.run(
        command,
        env=dagster_env,
        capture_output=True,
        text=True,
        check=False,
    )

    assert completed.returncode != 0
    assert "2023-12-30" in completed.stderr
    with DagsterInstance.get() as instance:
        assert instance.get_runs(filters=RunsFilter(job_name=JOB)) == []
        assert instance.get_backfills() == []


def test_the_launcher_names_the_valid_range_for_an_unknown_partition(dagster_env):
    with pytest.raises(UnknownPartitionError, match="2024-01-01 to 2024-12-31"):
        launch_job_backfill(dagster_env, JOB, FCT_ORDERS.partitioning, "2023-12-30", "2024-01-02")


def test_an_asset_backfill_sizes_its_runs_from_the_measured_cost_of_a_partition(
    dagster_env, conn, tmp_path
):
    # Writes of 10 s each: a run aiming at 60 s of writing takes 6 days.
    record_past_writes(conn, FCT_ORDERS.qualified_name, seconds=10)
    days = FCT_ORDERS.partitioning.keys_between("2024-06-01", "2024-06-10")
    with (
        DagsterInstance.get() as instance,
        running_daemon(dagster_env, tmp_path / "daemon.log"),
    ):
        backfill_id = launch_asset_backfill(
            instance, [FCT_ORDERS_KEY, DAILY_REVENUE_KEY], days[0], days[-1]
        )
        progress = wait_for_backfill(instance, backfill_id, timeout_s=600)
        runs = instance.get_runs(filters=RunsFilter(tags={"dagster/backfill": backfill_id}))
        assert set(progress.runs.values()) == {DagsterRunStatus.SUCCESS}, failed_run_report(
            instance, progress.runs, tmp_path / "daemon.log"
        )
        for key in (FCT_ORDERS_KEY, DAILY_REVENUE_KEY):
            assert instance.get_materialized_partitions(key) == set(days)
        summary = summarize_backfill(instance, backfill_id)
        engine_messages = [
            record.user_message
            for run in runs
            for record in instance.all_logs(run.run_id)
            if "Executing steps" in record.user_message
        ]

    # Both steps of a run (the table, its dbt models) in the run's own process, not one each.
    assert engine_messages and all("in process" in m for m in engine_messages), engine_messages
    ranges = sorted(
        (
            run.tags["dagster/asset_partition_range_start"],
            run.tags["dagster/asset_partition_range_end"],
        )
        for run in runs
    )
    assert ranges == [("2024-06-01", "2024-06-06"), ("2024-06-07", "2024-06-10")]
    revenue_checks = [k for k in dbt_models.check_keys if k.asset_key == DAILY_REVENUE_KEY]
    per_day = len(CHECKS) + len(revenue_checks)
    assert summary.checks_passed == per_day * len(days) and summary.checks_failed == 0
    with DagsterInstance.get() as instance:
        for day in days:
            for check in CHECKS:
                record = latest_check(instance, check.name, day)
                assert record.status == AssetCheckExecutionRecordStatus.SUCCEEDED
                assert record.partition == day and record.run_id in progress.runs


def test_the_writes_pool_keeps_writing_runs_from_overlapping(dagster_env, conn, tmp_path):
    """Two runs of one backfill, two run slots, a pool of one: the second waits for the first."""
    record_past_writes(conn, FCT_ORDERS.qualified_name, seconds=10)  # 6 days a run
    days = FCT_ORDERS.partitioning.keys_between("2024-07-01", "2024-07-10")
    with (
        DagsterInstance.get() as instance,
        running_daemon(dagster_env, tmp_path / "daemon.log"),
    ):
        # A pool's limit as users set it (`dagster instance concurrency set postgres_writes 1`).
        # Left to dagster.yaml's default_limit, Dagster 1.13 initializes a pool in the same queue
        # pass that first meets it and does not count it there, so two runs can start at once.
        instance.event_log_storage.set_concurrency_slots(WRITES_POOL, 1)
        backfill_id = launch_asset_backfill(instance, [FCT_ORDERS_KEY], days[0], days[-1])
        progress = wait_for_backfill(instance, backfill_id, timeout_s=600)
        records = instance.get_run_records(
            filters=RunsFilter(tags={"dagster/backfill": backfill_id})
        )
        assert set(progress.runs.values()) == {DagsterRunStatus.SUCCESS}, failed_run_report(
            instance, progress.runs, tmp_path / "daemon.log"
        )

    spans = sorted((r.start_time, r.end_time) for r in records)
    assert len(spans) == 2
    assert spans[1][0] >= spans[0][1], f"the runs overlapped: {spans}"
    assert instance.get_materialized_partitions(FCT_ORDERS_KEY) == set(days)

"""The dbt model, built per partition through dagster-dbt against a real PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import time

from dagster import materialize

from backfill_assets.database import connect
from backfill_assets.defs.dbt import dbt_models, dbt_resource
from backfill_assets.defs.partitioned_tables import fct_orders

DAYS = ["2024-04-01", "2024-04-02", "2024-04-03", "2024-04-04"]


def daily_revenue(conn) -> dict:
    rows = conn.execute(
        "SELECT order_day::text, order_count, net_revenue, xmin::text FROM analytics.daily_revenue"
    ).fetchall()
    return {day: (count, revenue, xmin) for day, count, revenue, xmin in rows}


def build(assets, postgres, instance, first, last):
    return materialize(
        assets,
        resources={"postgres": postgres, "dbt": dbt_resource},
        instance=instance,
        tags={
            "dagster/asset_partition_range_start": first,
            "dagster/asset_partition_range_end": last,
        },
    )


def test_the_dbt_model_builds_the_partitions_of_a_run_downstream_of_fct_orders(
    postgres, instance, conn
):
    result = build([fct_orders, dbt_models], postgres, instance, DAYS[0], DAYS[-1])

    assert result.success
    built = sorted(m.partition for m in result.asset_materializations_for_node("dbt_models"))
    assert built == DAYS
    expected = dict(
        conn.execute(
            "SELECT order_day::text, count(*) FROM analytics.fct_orders GROUP BY 1"
        ).fetchall()
    )
    assert {day: v[0] for day, v in daily_revenue(conn).items()} == expected


def test_rebuilding_one_partition_changes_only_that_partitions_rows(postgres, instance, conn):
    assert build([fct_orders, dbt_models], postgres, instance, DAYS[0], DAYS[-1]).success
    before = daily_revenue(conn)
    # Every day's facts change, but only 2024-04-02 is rebuilt in the dbt model.
    conn.execute("UPDATE analytics.fct_orders SET net_amount = net_amount + 1")

    assert build([dbt_models], postgres, instance, "2024-04-02", "2024-04-02").success
    after = daily_revenue(conn)

    assert after["2024-04-02"][1] > before["2024-04-02"][1]
    assert after["2024-04-02"][2] != before["2024-04-02"][2]
    assert {d: v for d, v in after.items() if d != "2024-04-02"} == {
        d: v for d, v in before.items() if d != "2024-04-02"
    }


def test_a_day_whose_facts_vanished_disappears_from_the_model(postgres, instance, conn):
    assert build([fct_orders, dbt_models], postgres, instance, DAYS[0], DAYS[-1]).success
    conn.execute("DELETE FROM analytics.fct_orders WHERE order_day = '2024-04-03'")

    assert build([dbt_models], postgres, instance, "2024-04-03", "2024-04-03").success

    assert sorted(daily_revenue(conn)) == ["2024-04-01", "2024-04-02", "2024-04-04"]


BUILD_IN_ITS_OWN_PROCESS = """
import sys
from dagster import materialize
from backfill_assets.database import connect
from backfill_assets.defs.dbt import dbt_models, dbt_resource
from backfill_assets.resources import PostgresResource

url, first, last = sys.argv[1:]
result = materialize(
    [dbt_models],
    resources={"postgres": PostgresResource(url=url), "dbt": dbt_resource},
    tags={"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last},
    raise_on_error=False,
)
sys.exit(0 if result.success else 1)
"""


def test_two_runs_building_the_model_for_the_first_time_at_once_both_succeed(
    postgres, instance, conn, data_url
):
    """A backfill's runs reach the dbt step together; the table must be created by one of them.

    Without the first-build lock both find no table and one fails: relation already exists. The
    test makes the runs meet for sure: it locks the model's source, so each run stops at its
    first statement that reads it (or at the first-build lock) until both are waiting.
    Runs are separate processes, as the daemon launches them.
    """
    assert build([fct_orders], postgres, instance, "2024-06-01", "2024-06-10").success
    with connect(data_url) as blocker:
        blocker.execute("BEGIN")
        blocker.execute("LOCK TABLE analytics.fct_orders IN ACCESS EXCLUSIVE MODE")
        runs = [
            subprocess.Popen(
                [sys.executable, "-c", BUILD_IN_ITS_OWN_PROCESS, data_url, first, last],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for first, last in [("2024-06-01", "2024-06-07"), ("2024-06-08", "2024-06-10")]
        ]
        waiting = wait_for_lock_waiters(conn, len(runs), timeout_s=120)
        blocker.execute("COMMIT")
    outputs = [run.communicate(timeout=300)[0] for run in runs]

    assert waiting == len(runs), "the runs never met at the lock"
    assert [run.returncode for run in runs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert sorted(daily_revenue(conn)) == [f"2024-06-{day:02d}" for day in range(1, 11)]


def wait_for_lock_waiters(conn, count: int, *, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        waiting = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()[0]
        if waiting >= count or time.monotonic() > deadline:
            return waiting
        time.sleep(0.2)

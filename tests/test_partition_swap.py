"""``strategy: partition_swap``: a natively partitioned table, each partition rebuilt aside and
swapped in with DETACH/ATTACH.

The table is the demo's ``fct_orders`` again, declared as a partitioned twin with the very same
SQL (``tests/swap_tables/fct_orders_swap.yaml``), so both strategies can be compared row by row.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg
from dagster import AssetKey
from support import (
    audit_rows,
    fingerprints,
    latest_check,
    materialize_days,
    other_session,
    step_failure_message,
)

from backfill_assets.core.fingerprint import partition_fingerprint
from backfill_assets.core.registry import DEFAULT_TABLES_DIR, TABLES_PATH_ENV, load_registry
from backfill_assets.defs.checks import CHECKS
from backfill_assets.defs.table_assets import table_asset
from backfill_assets.tooling import cli

TABLES = Path(__file__).parent / "swap_tables"
SWAPPED = load_registry([TABLES]).table("analytics.fct_orders_swap")
SWAPPED_KEY = AssetKey(["analytics", "fct_orders_swap"])
swapped = table_asset(SWAPPED)
DAYS = ["2024-04-01", "2024-04-02", "2024-04-03"]


def swapped_prints(conn, days):
    return {d: partition_fingerprint(conn, SWAPPED, SWAPPED.partitioning.window(d)) for d in days}


def children(conn) -> list[str]:
    return [
        name
        for (name,) in conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'analytics.fct_orders_swap'::regclass ORDER BY 1"
        )
    ]


def kept(conn) -> list[str]:
    return [
        name
        for (name,) in conn.execute(
            "SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'backfill_snapshots' AND relname LIKE 'analytics__fct_orders_swap%'"
        )
    ]


def test_partition_swap_and_delete_insert_give_identical_rows_and_check_outcomes(
    postgres, instance, conn
):
    assert materialize_days(postgres, instance, DAYS[0], DAYS[-1]).success
    assert materialize_days(postgres, instance, DAYS[0], DAYS[-1], assets=[swapped]).success
    # Source data changes (a late fix), then both strategies rewrite the days.
    conn.execute(
        "UPDATE app.orders SET net_amount = net_amount + 1 WHERE ordered_at >= '2024-04-02' "
        "AND ordered_at < '2024-04-03' AND order_id % 3 = 0"
    )
    assert materialize_days(postgres, instance, DAYS[0], DAYS[-1]).success
    assert materialize_days(postgres, instance, DAYS[0], DAYS[-1], assets=[swapped]).success

    assert swapped_prints(conn, DAYS) == fingerprints(conn, DAYS)
    for day in DAYS:
        for check in CHECKS:
            plain = latest_check(instance, check.name, day)
            swap = latest_check(instance, check.name, day, SWAPPED_KEY)
            assert swap.status == plain.status, (check.name, day)
            assert swap.event.asset_check_evaluation.metadata == (
                plain.event.asset_check_evaluation.metadata
            ), (check.name, day)
    assert children(conn) == [f"fct_orders_swap__p{d.replace('-', '')}" for d in DAYS]
    assert len(kept(conn)) == len(DAYS), "each replaced partition is kept, not copied"
    writes = audit_rows(conn, table_name="analytics.fct_orders_swap", status="succeeded")
    assert [w["strategy"] for w in writes] == ["partition_swap"] * 6
    assert [w["rows_deleted"] for w in writes[3:]] == [w["rows_inserted"] for w in writes[:3]]


def test_a_failed_blocking_check_leaves_the_partition_and_no_staging_table(
    postgres, instance, conn, tmp_path
):
    assert materialize_days(postgres, instance, DAYS[0], assets=[swapped]).success
    before = swapped_prints(conn, DAYS[:1])
    # One order twice: unique_key_is_unique fails on the staging table.
    query = (DEFAULT_TABLES_DIR / "fct_orders.sql").read_text().strip()
    (tmp_path / "fct_orders_swap.sql").write_text(
        f"({query}) UNION ALL (SELECT * FROM ({query}) AS d LIMIT 1)"
    )
    (tmp_path / "fct_orders_swap.yaml").write_text(
        (TABLES / "fct_orders_swap.yaml")
        .read_text()
        .replace("../../tables/fct_orders.sql", "")
        .replace("sql: \n", "")
    )
    broken = table_asset(load_registry([tmp_path]).table("analytics.fct_orders_swap"))

    result = materialize_days(postgres, instance, DAYS[0], assets=[broken])

    assert not result.success
    assert swapped_prints(conn, DAYS[:1]) == before
    assert children(conn) == ["fct_orders_swap__p20240401"]
    leftovers = conn.execute(
        "SELECT count(*) FROM pg_class WHERE relkind = 'r' AND relname LIKE 'fct_orders_swap__s%'"
    ).fetchone()[0]
    assert leftovers == 0, "the staging table rolled back with the rest"
    record = latest_check(instance, "unique_key_is_unique", DAYS[0], SWAPPED_KEY)
    assert record.status.value == "FAILED"


def test_the_swap_never_queues_readers_longer_than_the_lock_timeout(
    postgres, instance, conn, data_url, tmp_path
):
    assert materialize_days(postgres, instance, DAYS[0], assets=[swapped]).success
    (tmp_path / "fct_orders_swap.yaml").write_text(
        (TABLES / "fct_orders_swap.yaml").read_text().replace("../../tables/", "")
        + "timeouts: {lock: 300ms, lock_retries: 8}\n"
    )
    (tmp_path / "fct_orders.sql").write_text((DEFAULT_TABLES_DIR / "fct_orders.sql").read_text())
    limited = table_asset(load_registry([tmp_path]).table("analytics.fct_orders_swap"))
    # A long report reads the table for 2 s: DETACH must wait for it. Meanwhile the application
    # keeps reading; a DETACH queued without a lock timeout would hold every read the whole 2 s.
    report = other_session(data_url, "BEGIN; SELECT count(*) FROM analytics.fct_orders_swap", 2)
    results = []
    run = threading.Thread(
        target=lambda: results.append(
            materialize_days(postgres, instance, DAYS[0], assets=[limited])
        )
    )
    run.start()
    slowest = 0.0
    with psycopg.connect(data_url, autocommit=True) as app:
        while report.is_alive():
            started = time.monotonic()
            app.execute("SELECT count(*) FROM analytics.fct_orders_swap").fetchone()
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.05)
    run.join(timeout=120)

    assert results[0].success, "it retried until the report ended"
    assert slowest < 0.9, f"a reader waited {slowest:.2f}s (lock timeout 300 ms)"
    logs = [r.user_message for r in instance.all_logs(results[0].run_id)]
    assert any("a lock was not granted within 300 ms" in line for line in logs)


def test_a_swap_is_rolled_back_by_swapping_the_kept_partition_back_and_can_be_undone(
    postgres, instance, conn, dagster_env, monkeypatch
):
    monkeypatch.setenv(TABLES_PATH_ENV, f"{DEFAULT_TABLES_DIR}:{TABLES}")
    assert materialize_days(postgres, instance, DAYS[0], assets=[swapped]).success
    before = swapped_prints(conn, DAYS[:1])
    conn.execute(
        "DELETE FROM app.orders WHERE ordered_at >= '2024-04-01' AND order_id % 4 = 0 "
        "AND ordered_at < '2024-04-02'"
    )
    assert materialize_days(postgres, instance, DAYS[0], assets=[swapped]).success
    after = swapped_prints(conn, DAYS[:1])
    assert after != before

    table = ["--table", "analytics.fct_orders_swap", "--partition", DAYS[0]]
    assert cli.main(["rollback", *table]) == 0
    assert swapped_prints(conn, DAYS[:1]) == before
    assert cli.main(["rollback", *table]) == 0
    assert swapped_prints(conn, DAYS[:1]) == after
    assert children(conn) == ["fct_orders_swap__p20240401"]
    rollbacks = audit_rows(conn, strategy="rollback")
    assert [r["status"] for r in rollbacks] == ["succeeded", "succeeded"]


def test_a_plain_table_declared_partition_swap_is_refused_with_what_to_do(
    postgres, instance, conn, dagster_env, monkeypatch, capsys
):
    monkeypatch.setenv(TABLES_PATH_ENV, f"{DEFAULT_TABLES_DIR}:{TABLES}")
    conn.execute(
        "CREATE SCHEMA analytics; CREATE TABLE analytics.fct_orders_swap (order_id bigint)"
    )

    result = materialize_days(postgres, instance, DAYS[0], assets=[swapped])

    assert not result.success
    message = step_failure_message(result)
    assert "exists and is not partitioned" in message and "Nothing was written" in message
    span = ["--from", DAYS[0], "--to", DAYS[0]]
    assert cli.main(["plan", "--select", "analytics/fct_orders_swap", *span]) == 2
    assert "exists and is not partitioned" in capsys.readouterr().err, "the plan says so too"


def test_the_demos_partitioned_table_equals_its_query_after_each_swap(postgres, instance, conn):
    table = load_registry([DEFAULT_TABLES_DIR]).table("analytics.order_status_daily")
    asset = table_asset(table)
    recompute = (
        "SELECT order_day, country, status, orders, net_amount FROM analytics.order_status_daily "
        f"EXCEPT ALL SELECT * FROM ({table.query.strip()}) AS q"
    )
    window = {"start": "2024-04-01", "end": "2024-04-03"}

    assert materialize_days(postgres, instance, "2024-04-01", "2024-04-02", assets=[asset]).success
    conn.execute("UPDATE app.orders SET status = 'returned' WHERE order_id % 5 = 0")
    assert materialize_days(postgres, instance, "2024-04-01", "2024-04-02", assets=[asset]).success

    assert conn.execute(recompute, window).fetchall() == []
    counts = conn.execute(
        "SELECT count(*), sum(orders) FROM analytics.order_status_daily"
    ).fetchone()
    expected = conn.execute(
        f"SELECT count(*), sum(orders) FROM ({table.query.strip()}) AS q", window
    ).fetchone()
    assert counts == expected
    assert (
        conn.execute(
            "SELECT relkind FROM pg_class WHERE oid = 'analytics.order_status_daily'::regclass"
        ).fetchone()[0]
        == "p"
    )


def test_rolling_back_a_partitions_first_swap_leaves_it_empty_and_can_be_undone(
    postgres, instance, conn, dagster_env, monkeypatch
):
    monkeypatch.setenv(TABLES_PATH_ENV, f"{DEFAULT_TABLES_DIR}:{TABLES}")
    assert materialize_days(postgres, instance, DAYS[0], assets=[swapped]).success
    written = swapped_prints(conn, DAYS[:1])

    table = ["--table", "analytics.fct_orders_swap", "--partition", DAYS[0]]
    assert cli.main(["rollback", *table]) == 0
    assert swapped_prints(conn, DAYS[:1])[DAYS[0]].rows == 0
    assert cli.main(["rollback", *table]) == 0
    assert swapped_prints(conn, DAYS[:1]) == written


def test_sql_yielding_rows_of_another_partition_is_refused_saying_so(
    postgres, instance, conn, tmp_path
):
    query = (DEFAULT_TABLES_DIR / "fct_orders.sql").read_text().strip()
    leaky = query.replace(
        "(o.ordered_at AT TIME ZONE 'UTC')::date AS order_day",
        "(o.ordered_at AT TIME ZONE 'UTC')::date + 1 AS order_day",
    )
    assert leaky != query
    (tmp_path / "fct_orders_swap.sql").write_text(leaky)
    (tmp_path / "fct_orders_swap.yaml").write_text(
        (TABLES / "fct_orders_swap.yaml")
        .read_text()
        .replace("sql: ../../tables/fct_orders.sql\n", "")
    )
    asset = table_asset(load_registry([tmp_path]).table("analytics.fct_orders_swap"))

    result = materialize_days(postgres, instance, DAYS[0], assets=[asset])

    assert not result.success
    assert "yields rows outside the partition 2024-04-01" in step_failure_message(result)
    assert children(conn) == []

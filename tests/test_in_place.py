"""``strategy: batched_update``: a live table's new column filled in place, batch by batch.

The table is the demo shop's own ``app.orders``, given a nullable ``total_price`` as a schema
change would add it (``tests/in_place_tables/orders_total.yaml``; batches of 10 rows, so a day of
40 orders takes several). Real runs on the real PostgreSQL; the application is another session.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from dagster import AssetKey, materialize
from support import (
    audit_rows,
    dbt_resource,
    latest_check,
    other_session,
    step_failure_message,
    wait_for,
)

from backfill_assets.core import control
from backfill_assets.core.audit import ensure_audit_table
from backfill_assets.core.registry import DEFAULT_TABLES_DIR, TABLES_PATH_ENV, load_registry
from backfill_assets.core.tables import TableSpec
from backfill_assets.defs.table_assets import table_asset
from backfill_assets.tooling import cli

TABLES = Path(__file__).parent / "in_place_tables"
ORDERS = load_registry([TABLES]).table("app.orders")
ORDERS_KEY = AssetKey(["app", "orders"])
orders = table_asset(ORDERS)
DAYS = ["2024-04-01", "2024-04-02", "2024-04-03"]
WRITER = Path(__file__).with_name("in_place_writer.py")


@pytest.fixture
def live(conn):
    """``app.orders`` as a schema change leaves it: a new nullable column to fill."""
    conn.execute("ALTER TABLE app.orders ADD COLUMN total_price numeric(12, 2)")
    ensure_audit_table(conn)
    return conn


def variant(directory: Path, extra: str = "", replace: tuple[str, str] = ("", "")) -> TableSpec:
    """The test declaration with ``extra`` YAML appended and ``replace`` applied, in its own
    table folder."""
    text = (TABLES / "orders_total.yaml").read_text()
    assert replace[0] in text
    (directory / "orders_total.yaml").write_text(text.replace(*replace) + extra + "\n")
    return load_registry([directory]).table("app.orders")


def fill(postgres, instance, first: str, last: str | None = None, tags=None, asset=orders):
    return materialize(
        [asset],
        resources={"postgres": postgres, "dbt": dbt_resource},
        instance=instance,
        tags={
            "dagster/asset_partition_range_start": first,
            "dagster/asset_partition_range_end": last or first,
            **(tags or {}),
        },
        raise_on_error=False,
    )


def day_rows(conn, day: str) -> dict[int, tuple]:
    """order_id -> (total_price, net + tax, xmin) of the day's orders."""
    return {
        row[0]: row[1:]
        for row in conn.execute(
            "SELECT order_id, total_price, net_amount + tax_amount, xmin::text::bigint "
            "FROM app.orders WHERE ordered_at >= %s::date AND ordered_at < %s::date + 1",
            [day, day],
        )
    }


def committed_batches(conn, day: str) -> int:
    """Batches of the day's unfinished in-place write committed so far (its cursor)."""
    if not conn.execute("SELECT to_regclass('backfill_control.cursors')").fetchone()[0]:
        return 0
    row = conn.execute(
        "SELECT batches FROM backfill_control.cursors WHERE partition_key = %s", [day]
    ).fetchone()
    return row[0] if row else 0


def test_batched_update_fills_every_row_of_the_range_with_its_expression_and_passes_its_checks(
    live, postgres, instance
):
    result = fill(postgres, instance, DAYS[0], DAYS[-1])

    assert result.success
    for day in DAYS:
        rows = day_rows(live, day)
        assert rows and all(total == expected for total, expected, _ in rows.values())
        for check in ("rows_match_source", "required_columns_not_null", "measures_reconcile"):
            record = latest_check(instance, check, day, ORDERS_KEY)
            assert record.status.value == "SUCCEEDED", (check, day)
    untouched = live.execute(
        "SELECT count(*) FROM app.orders WHERE total_price IS NOT NULL AND NOT "
        "(ordered_at >= %s::date AND ordered_at < %s::date + 1)",
        [DAYS[0], DAYS[-1]],
    ).fetchone()[0]
    assert untouched == 0, "rows outside the range are not touched"
    audits = audit_rows(live, strategy="batched_update")
    assert [a["partition_key"] for a in audits] == DAYS
    assert all(a["status"] == "succeeded" for a in audits)
    assert [a["rows_updated"] for a in audits] == [len(day_rows(live, d)) for d in DAYS]
    assert all(a["rows_deleted"] == 0 and a["rows_inserted"] == 0 for a in audits)
    materialization = instance.get_latest_materialization_event(ORDERS_KEY)
    metadata = materialization.asset_materialization.metadata
    assert metadata["batches"].value >= 4, "40 rows in batches of 10 or so"


def test_batched_update_never_overwrites_a_value_the_application_writes_during_the_run(
    live, postgres, instance, tmp_path
):
    backfill = "inplace-app"
    day = DAYS[0]
    keys = sorted(day_rows(live, day))
    # The run waits 1.5 s between batches: after its first, the pause switch holds it at that
    # batch boundary, and the application writes its own total_price for rows not reached yet.
    slow = table_asset(variant(tmp_path, "throttle: {pause: 1500ms}"))
    results = []
    run = threading.Thread(
        target=lambda: results.append(
            fill(postgres, instance, day, tags={"dagster/backfill": backfill}, asset=slow)
        )
    )
    run.start()
    wait_for(lambda: committed_batches(live, day), 60, "the first batch never committed")
    control.pause(live, backfill, by="tester")
    time.sleep(3)
    assert committed_batches(live, day) == 1, "paused at the batch boundary"
    assert run.is_alive(), "the run waits; it does not fail"
    done_before = {k for k, (total, _, _) in day_rows(live, day).items() if total is not None}
    app_written = [k for k in keys if k not in done_before][-5:]
    live.execute(
        "UPDATE app.orders SET total_price = 777.77 WHERE order_id = ANY(%s)", [app_written]
    )
    control.resume(live, backfill)
    run.join(timeout=120)

    assert results[0].success
    metadata = instance.get_latest_materialization_event(ORDERS_KEY).asset_materialization.metadata
    assert metadata["held_back_s"].value >= 3, "the pause and the 1.5 s pauses, per partition"
    rows = day_rows(live, day)
    assert all(rows[k][0] == Decimal("777.77") for k in app_written), (
        "the application's values are kept"
    )
    others = [k for k in keys if k not in app_written]
    assert all(rows[k][0] == rows[k][1] for k in others)
    kept = live.execute("SELECT order_id FROM backfill_snapshots.app__orders").fetchall()
    assert {k for (k,) in kept} == set(others), "the snapshot holds exactly the rows it changed"
    (audit,) = audit_rows(live, strategy="batched_update")
    assert audit["rows_updated"] == len(others) and audit["snapshot_rows"] == len(others)


def test_a_killed_in_place_write_resumes_after_its_last_committed_batch(
    live, postgres, instance, data_url, tmp_path
):
    day = DAYS[1]
    variant(tmp_path, replace=("max: 1000", "max: 10"))  # batches of 10: four for the day
    writer = subprocess.Popen(
        [sys.executable, str(WRITER), data_url, str(tmp_path), day],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for _ in range(2):
        line = writer.stdout.readline()
        assert line.startswith("batch"), line + writer.stderr.read()
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    batches, rows_done = live.execute(
        "SELECT batches, rows_updated FROM backfill_control.cursors WHERE partition_key = %s",
        [day],
    ).fetchone()
    before = day_rows(live, day)
    done = {k: xmin for k, (total, _, xmin) in before.items() if total is not None}
    assert 0 < len(done) == rows_done < len(before), "killed mid-way, its batches committed"

    result = fill(postgres, instance, day)

    assert result.success
    after = day_rows(live, day)
    assert all(total == expected for total, expected, _ in after.values())
    assert all(after[k][2] == xmin for k, xmin in done.items()), "no committed batch redone"
    (audit,) = audit_rows(live, strategy="batched_update", status="succeeded")
    assert audit["rows_updated"] == len(before), "one write, counting the batches before the kill"
    metadata = instance.get_latest_materialization_event(ORDERS_KEY).asset_materialization.metadata
    assert metadata["resumed_after_batches"].value == batches
    assert not live.execute("SELECT count(*) FROM backfill_control.cursors").fetchone()[0]


def test_an_expression_yielding_null_for_a_required_column_is_refused_before_any_batch(
    live, postgres, instance, tmp_path
):
    day = DAYS[0]
    broken = table_asset(
        variant(tmp_path, replace=("net_amount + tax_amount", "net_amount + tax_amount + NULL"))
    )
    result = fill(postgres, instance, day, asset=broken)

    assert not result.success
    assert all(total is None for total, _, _ in day_rows(live, day).values()), "nothing updated"
    guard = latest_check(instance, "source_guard", day, ORDERS_KEY)
    message = guard.event.asset_check_evaluation.metadata["message"].value
    assert "would get a NULL in total_price" in message and "Nothing was updated" in message
    (audit,) = audit_rows(live, strategy="batched_update")
    assert audit["status"] == "guard_failed"


def test_a_row_the_application_holds_locked_is_skipped_then_filled_once_released(
    live, postgres, instance, data_url
):
    day = DAYS[2]
    held = min(day_rows(live, day))
    # The application holds one row of the day for 2 s: the first pass skips it (SKIP LOCKED),
    # the second waits for it within the 500 ms lock timeout and retries until it is released.
    app = other_session(
        data_url, f"BEGIN; SELECT * FROM app.orders WHERE order_id = {held} FOR UPDATE", 2
    )
    started = time.monotonic()
    result = fill(postgres, instance, day)
    app.join()

    assert result.success
    assert time.monotonic() - started >= 1.5, "it waited for the row, not around it"
    rows = day_rows(live, day)
    assert all(total == expected for total, expected, _ in rows.values())
    logs = [r.user_message for r in instance.all_logs(result.run_id)]
    assert any("a lock was not granted within 500 ms" in line for line in logs)


def test_a_rollback_restores_only_values_the_in_place_write_left_and_can_be_undone(
    live, postgres, instance, dagster_env, monkeypatch
):
    monkeypatch.setenv(TABLES_PATH_ENV, f"{DEFAULT_TABLES_DIR}:{TABLES}")
    day = DAYS[0]
    app_row = min(day_rows(live, day))
    live.execute("UPDATE app.orders SET total_price = 1.00 WHERE order_id = %s", [app_row])
    assert fill(postgres, instance, day).success
    # After the fill, the application changes one of the rows the fill wrote.
    changed = max(day_rows(live, day))
    live.execute("UPDATE app.orders SET total_price = 2.00 WHERE order_id = %s", [changed])
    apps = {app_row: Decimal("1.00"), changed: Decimal("2.00")}

    assert cli.main(["rollback", "--table", "app.orders", "--partition", day]) == 0
    rows = day_rows(live, day)
    assert {k: rows[k][0] for k in apps} == apps, "values it did not write are not touched"
    assert all(total is None for k, (total, _, _) in rows.items() if k not in apps)

    assert cli.main(["rollback", "--table", "app.orders", "--partition", day]) == 0
    rows = day_rows(live, day)
    assert {k: rows[k][0] for k in apps} == apps
    assert all(total == expected for k, (total, expected, _) in rows.items() if k not in apps)
    assert [(a["strategy"], a["rows_updated"]) for a in audit_rows(live)] == [
        ("batched_update", len(rows) - 1),
        ("rollback", len(rows) - 2),
        ("rollback", len(rows) - 2),
    ]


def test_finish_column_makes_the_filled_column_not_null_and_refuses_while_nulls_remain(
    live, postgres, instance, dagster_env, monkeypatch, capsys
):
    monkeypatch.setenv(TABLES_PATH_ENV, f"{DEFAULT_TABLES_DIR}:{TABLES}")
    assert fill(postgres, instance, DAYS[0]).success
    live.execute(  # an order from before the declared partitions
        "INSERT INTO app.orders SELECT order_id + 10000000, customer_id, "
        "'2023-12-31 12:00+00', arrived_at, status, net_amount, tax_amount, sales_channel "
        "FROM app.orders ORDER BY order_id LIMIT 1"
    )

    assert cli.main(["finish-column", "app.orders", "total_price"]) == 2
    error = capsys.readouterr().err
    assert "still hold NULL in total_price" in error and "Nothing was changed" in error
    assert "--select app/orders --from 2024-01-01 --to 2024-12-31" in error
    assert "1 of them lie outside the declared partitions" in error
    assert cli.main(["finish-column", "app.orders", "net_amount"]) == 2
    assert "'net_amount' is not a column app.orders fills in place" in capsys.readouterr().err
    assert not_null(live) is False
    assert not live.execute(
        "SELECT count(*) FROM pg_constraint WHERE conrelid = 'app.orders'::regclass "
        "AND contype = 'c'"
    ).fetchone()[0], "no constraint left behind"

    # The rest of history, as earlier backfills would have left it.
    live.execute(
        "UPDATE app.orders SET total_price = net_amount + tax_amount WHERE total_price IS NULL"
    )
    assert cli.main(["finish-column", "app.orders", "total_price"]) == 0
    assert "is NOT NULL now" in capsys.readouterr().out
    assert not_null(live) is True
    assert cli.main(["finish-column", "app.orders", "total_price"]) == 0
    assert "already NOT NULL" in capsys.readouterr().out


def not_null(conn) -> bool:
    return conn.execute(
        "SELECT attnotnull FROM pg_attribute WHERE attrelid = 'app.orders'::regclass "
        "AND attname = 'total_price'"
    ).fetchone()[0]


def test_finish_column_never_queues_the_application_longer_than_the_lock_timeout(
    live, dagster_env, monkeypatch, data_url
):
    monkeypatch.setenv(TABLES_PATH_ENV, f"{DEFAULT_TABLES_DIR}:{TABLES}")
    live.execute("UPDATE app.orders SET total_price = net_amount + tax_amount")
    # A long report holds ACCESS SHARE for 2 s: every ALTER must wait for it. Meanwhile the
    # application keeps reading; a DDL statement queued without a lock timeout would make each
    # of its reads wait the whole 2 s behind it.
    report = other_session(data_url, "BEGIN; SELECT count(*) FROM app.orders", 2)
    finished = []
    ddl = threading.Thread(
        target=lambda: finished.append(cli.main(["finish-column", "app.orders", "total_price"]))
    )
    ddl.start()
    slowest = 0.0
    with psycopg.connect(data_url, autocommit=True) as app:
        while report.is_alive():
            started = time.monotonic()
            app.execute("SELECT total_price FROM app.orders WHERE order_id = 1").fetchone()
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.05)
    ddl.join(timeout=60)

    assert finished == [0], "it retried until the report ended"
    assert not_null(live) is True
    assert slowest < 1.0, f"the application waited {slowest:.2f}s (lock timeout 500 ms)"


def test_triggers_fire_for_backfilled_rows_unless_the_declaration_says_replica(
    live, postgres, instance, tmp_path
):
    live.execute(
        "CREATE TABLE app.order_changes (order_id bigint); "
        "CREATE FUNCTION app.log_change() RETURNS trigger LANGUAGE plpgsql AS "
        "$$BEGIN INSERT INTO app.order_changes VALUES (NEW.order_id); RETURN NEW; END$$; "
        "CREATE TRIGGER orders_changed AFTER UPDATE ON app.orders "
        "FOR EACH ROW EXECUTE FUNCTION app.log_change()"
    )
    changes = "SELECT count(*) FROM app.order_changes"

    assert fill(postgres, instance, DAYS[0]).success
    assert live.execute(changes).fetchone()[0] == len(day_rows(live, DAYS[0])), "kept: fired"

    quiet = table_asset(variant(tmp_path, replace=("batch: {", "triggers: replica\n  batch: {")))
    assert fill(postgres, instance, DAYS[1], asset=quiet).success
    assert live.execute(changes).fetchone()[0] == len(day_rows(live, DAYS[0])), "replica: not"
    assert all(t == e for t, e, _ in day_rows(live, DAYS[1]).values())


def test_a_declared_type_unlike_the_tables_own_is_refused_before_anything_is_written(
    live, postgres, instance, tmp_path
):
    wrong = table_asset(variant(tmp_path, replace=("order_id: bigint", "order_id: integer")))

    result = fill(postgres, instance, DAYS[0], asset=wrong)

    assert not result.success
    message = step_failure_message(result)
    assert "gives order_id the type 'integer', the table has bigint" in message
    assert "Nothing was written" in message
    assert all(total is None for total, _, _ in day_rows(live, DAYS[0]).values())

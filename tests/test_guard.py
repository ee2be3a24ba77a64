"""The guard before the write: a broken source never wipes good data."""

from __future__ import annotations

from dagster import AssetCheckKey
from support import (
    FCT_ORDERS_KEY,
    fingerprints,
    latest_check,
    materialize_days,
    step_failure_message,
)

from backfill_assets.defs.dagster_internals import AssetCheckExecutionRecordStatus

DAY = "2024-04-03"
DAY_FILTER = "ordered_at >= '2024-04-03' AND ordered_at < '2024-04-04'"


def test_an_empty_source_does_not_wipe_the_partition(postgres, instance, conn):
    assert materialize_days(postgres, instance, DAY).success
    before = fingerprints(conn, [DAY])
    conn.execute(f"DELETE FROM app.orders WHERE {DAY_FILTER}")

    result = materialize_days(postgres, instance, DAY)

    assert not result.success
    assert "the source is empty but the partition holds" in step_failure_message(result)
    assert "Nothing was deleted" in step_failure_message(result)
    assert fingerprints(conn, [DAY]) == before
    guard = latest_check(instance, "source_guard", DAY)
    assert guard.status == AssetCheckExecutionRecordStatus.FAILED


def test_a_refused_day_shows_its_failed_guard_in_the_partition_status_the_ui_reads(
    postgres, instance, conn
):
    """Dagster clears a partition's check status when the result is not linked to the
    partition's latest materialization; the refusal is linked to the rows the day still holds,
    so the UI's per-partition view of ``source_guard`` reads Failed, not Missing."""
    assert materialize_days(postgres, instance, "2024-04-02", DAY).success
    conn.execute(f"DELETE FROM app.orders WHERE {DAY_FILTER}")

    assert not materialize_days(postgres, instance, "2024-04-02", DAY).success

    key = AssetCheckKey(FCT_ORDERS_KEY, "source_guard")
    infos = instance.event_log_storage.get_asset_check_partition_info([key])
    by_day = {i.partition_key: i for i in infos}
    refused = by_day[DAY]
    assert refused.latest_execution_status == AssetCheckExecutionRecordStatus.FAILED
    assert refused.is_current, "linked to the materialization the day still holds"
    assert by_day["2024-04-02"].latest_execution_status == AssetCheckExecutionRecordStatus.SUCCEEDED
    assert by_day["2024-04-02"].is_current


def test_a_truncated_source_does_not_wipe_the_partition(postgres, instance, conn):
    assert materialize_days(postgres, instance, DAY).success
    before = fingerprints(conn, [DAY])
    conn.execute(f"DELETE FROM app.orders WHERE {DAY_FILTER} AND order_id % 5 <> 0")

    result = materialize_days(postgres, instance, DAY)

    assert not result.success
    assert "fewer than 50% of the" in step_failure_message(result)
    assert fingerprints(conn, [DAY]) == before


def test_the_allow_shrink_tag_lets_an_intended_shrink_through_and_says_so(postgres, instance, conn):
    assert materialize_days(postgres, instance, DAY).success
    conn.execute(f"DELETE FROM app.orders WHERE {DAY_FILTER} AND order_id % 5 <> 0")

    result = materialize_days(
        postgres, instance, DAY, tags={"backfill_assets/allow_shrink": "true"}
    )

    assert result.success
    source = conn.execute(f"SELECT count(*) FROM app.orders WHERE {DAY_FILTER}").fetchone()[0]
    assert fingerprints(conn, [DAY])[DAY].rows == source
    guard = latest_check(instance, "source_guard", DAY)
    assert guard.status == AssetCheckExecutionRecordStatus.SUCCEEDED
    assert "allowed by backfill_assets/allow_shrink=true" in str(
        guard.event.dagster_event.asset_check_evaluation_data.metadata["override"].value
    )


def test_null_keys_in_the_source_are_refused(postgres, instance, conn):
    assert materialize_days(postgres, instance, DAY).success
    before = fingerprints(conn, [DAY])
    # A legacy source without its primary key lets a NULL id through.
    conn.execute("ALTER TABLE app.orders DROP CONSTRAINT orders_pkey")
    conn.execute("ALTER TABLE app.orders ALTER COLUMN order_id DROP NOT NULL")
    conn.execute(
        f"UPDATE app.orders SET order_id = NULL WHERE order_id = "
        f"(SELECT min(order_id) FROM app.orders WHERE {DAY_FILTER})"
    )

    result = materialize_days(postgres, instance, DAY)

    assert not result.success
    assert "1 source rows have a NULL in order_id" in step_failure_message(result)
    assert fingerprints(conn, [DAY]) == before


def test_a_malformed_tag_fails_the_run_before_anything_is_written(postgres, instance, conn):
    assert materialize_days(postgres, instance, DAY).success
    before = fingerprints(conn, [DAY])
    conn.execute("UPDATE app.orders SET net_amount = net_amount + 1")

    result = materialize_days(postgres, instance, DAY, tags={"backfill_assets/max_shrink": "lots"})

    assert not result.success
    assert "backfill_assets/max_shrink='lots' must be a fraction" in step_failure_message(result)
    assert fingerprints(conn, [DAY]) == before


def test_a_day_whose_sql_fails_is_refused_alone_and_the_other_days_are_written(
    postgres, instance, conn, dagster_env, tmp_path, monkeypatch, capsys
):
    """The guard measures every day of a run in one statement; when the table's SQL fails on one
    day (here a division by zero), that day is refused with the database's error and the others
    are written, as with any other refusal."""

    from support import audit_rows

    from backfill_assets.core.registry import DEFAULT_TABLES_DIR, TABLES_PATH_ENV, load_registry
    from backfill_assets.defs.table_assets import table_asset
    from backfill_assets.tooling import cli

    folder = tmp_path / "tables"
    folder.mkdir()
    declaration = (DEFAULT_TABLES_DIR / "fct_orders.yaml").read_text()
    (folder / "fct_orders_checked.yaml").write_text(
        declaration.replace("table: analytics.fct_orders", "table: analytics.fct_orders_checked")
        .replace("subject_column: customer_id\n", "")
        .replace("owners: [team:analytics]\n", "")
    )
    query = (DEFAULT_TABLES_DIR / "fct_orders.sql").read_text()
    (folder / "fct_orders_checked.sql").write_text(
        query.replace(
            "o.net_amount,\n",
            "o.net_amount * (1 / (extract(day FROM o.ordered_at AT TIME ZONE 'UTC')::int - 2)"
            " + 1 - 1 / (extract(day FROM o.ordered_at AT TIME ZONE 'UTC')::int - 2))"
            " AS net_amount,\n",
        )
    )
    monkeypatch.setenv(TABLES_PATH_ENV, f"{DEFAULT_TABLES_DIR}:{folder}")
    table = load_registry().table("analytics.fct_orders_checked")

    span = ["--select", "analytics/fct_orders_checked", "--from", "2024-04-01"]
    span += ["--to", "2024-04-03"]
    assert cli.main(["plan", *span]) == 0, capsys.readouterr().err
    assert "2024-04-02: its SQL fails (division by zero)" in capsys.readouterr().out

    result = materialize_days(
        postgres, instance, "2024-04-01", "2024-04-03", assets=(table_asset(table),)
    )
    assert not result.success
    rows = {a["partition_key"]: a for a in audit_rows(conn, table_name=table.qualified_name)}
    assert rows["2024-04-01"]["status"] == rows["2024-04-03"]["status"] == "succeeded"
    assert rows["2024-04-02"]["status"] == "guard_failed"
    error = rows["2024-04-02"]["error"]
    assert "the table's SQL fails for this partition (division by zero)" in error
    assert "2024-04-02 keeps its previous rows" in step_failure_message(result)

"""After-write checks: each fails when its condition is broken and passes on correct data.

They run inside the partition's transaction; a blocking failure rolls the partition back, so the
partition keeps its previous rows. Results are read back per partition, as the UI reads them.
"""

from __future__ import annotations

import pytest
from dagster import AssetKey
from support import (
    dbt_models,
    fct_orders,
    fingerprints,
    latest_check,
    materialize_days,
    step_failure_message,
)

from backfill_assets.defs.checks import CHECKS
from backfill_assets.defs.dagster_internals import AssetCheckExecutionRecordStatus

DAY = "2024-04-03"
DAY_FILTER = "ordered_at >= '2024-04-03' AND ordered_at < '2024-04-04'"
PASSED = AssetCheckExecutionRecordStatus.SUCCEEDED
FAILED = AssetCheckExecutionRecordStatus.FAILED


def duplicate_a_customer_with_orders_on_day(conn) -> None:
    """A duplicated customer row fans out the join: that customer's orders appear twice."""
    conn.execute("ALTER TABLE app.customers DROP CONSTRAINT customers_pkey")
    conn.execute(
        "INSERT INTO app.customers SELECT * FROM app.customers WHERE customer_id = "
        f"(SELECT customer_id FROM app.orders WHERE {DAY_FILTER} ORDER BY order_id LIMIT 1)"
    )


def check_evaluation(instance, name, partition):
    record = latest_check(instance, name, partition)
    return record.status, record.event.dagster_event.asset_check_evaluation_data


def assert_rejected_and_untouched(result, instance, conn, before, check_name):
    assert not result.success
    assert check_name in step_failure_message(result)
    assert f"{DAY} keeps its previous rows" in step_failure_message(result)
    assert fingerprints(conn, [DAY]) == before
    assert check_evaluation(instance, check_name, DAY)[0] == FAILED


def test_every_check_passes_on_correct_data_with_one_result_per_partition_of_a_run(
    postgres, instance, conn
):
    days = ["2024-04-01", "2024-04-02", "2024-04-03"]
    assert materialize_days(postgres, instance, days[0], days[-1]).success
    result = materialize_days(postgres, instance, days[0], days[-1])

    assert result.success
    materializations = {
        m.partition: m for m in result.asset_materializations_for_node("analytics__fct_orders")
    }
    storage_ids = {
        record.asset_materialization.partition: record.storage_id
        for record in instance.fetch_materializations(
            AssetKey(["analytics", "fct_orders"]), limit=10
        ).records
        if record.run_id == result.run_id
    }
    for day in days:
        for check in CHECKS:
            status, evaluation = check_evaluation(instance, check.name, day)
            assert status == PASSED, (check.name, day, evaluation.metadata)
            assert evaluation.partition == day
            assert evaluation.target_materialization_data.run_id == result.run_id
            assert evaluation.target_materialization_data.storage_id == storage_ids[day]
        assert day in materializations


def test_a_duplicated_key_fails_the_uniqueness_check_and_rolls_the_partition_back(
    postgres, instance, conn
):
    assert materialize_days(postgres, instance, DAY).success
    before = fingerprints(conn, [DAY])
    duplicate_a_customer_with_orders_on_day(conn)

    result = materialize_days(postgres, instance, DAY)

    assert_rejected_and_untouched(result, instance, conn, before, "unique_key_is_unique")
    assert (
        check_evaluation(instance, "unique_key_is_unique", DAY)[1].metadata["duplicated_keys"].value
        >= 1
    )


def test_a_null_from_the_source_in_a_required_column_fails_the_write_and_rolls_it_back(
    postgres, instance, conn
):
    # The target is its declaration (an existing one differing from it is refused before any
    # write: test_existing_targets.py), so its NOT NULL stops the row in the write itself.
    assert materialize_days(postgres, instance, DAY).success
    before = fingerprints(conn, [DAY])
    conn.execute("ALTER TABLE app.orders ALTER COLUMN status DROP NOT NULL")
    conn.execute(
        f"UPDATE app.orders SET status = NULL WHERE order_id = "
        f"(SELECT min(order_id) FROM app.orders WHERE {DAY_FILTER})"
    )

    result = materialize_days(postgres, instance, DAY)

    assert not result.success
    message = step_failure_message(result)
    assert '"status"' in message and "not-null" in message, message
    assert f"{DAY} keeps its previous rows" in message
    assert fingerprints(conn, [DAY]) == before


def test_a_sum_that_does_not_reconcile_fails_and_rolls_the_partition_back(postgres, instance, conn):
    assert materialize_days(postgres, instance, DAY).success
    before = fingerprints(conn, [DAY])
    # The source gained sub-cent precision; the target's numeric(12,2) rounds it away.
    conn.execute("ALTER TABLE app.orders ALTER COLUMN net_amount TYPE numeric(14,4)")
    conn.execute(
        "UPDATE app.orders SET net_amount = net_amount + 0.0049 WHERE order_id IN "
        f"(SELECT order_id FROM app.orders WHERE {DAY_FILTER} ORDER BY order_id LIMIT 10)"
    )

    result = materialize_days(postgres, instance, DAY)

    assert_rejected_and_untouched(result, instance, conn, before, "measures_reconcile")
    assert "sum(net_amount) differs from the source by 0.0490" in step_failure_message(result)


def test_rows_lost_on_the_way_in_fail_the_row_count_check(postgres, instance, conn):
    assert materialize_days(postgres, instance, DAY).success
    before = fingerprints(conn, [DAY])
    # A forgotten legacy trigger silently discards cancelled orders.
    conn.execute(
        "CREATE FUNCTION analytics.drop_cancelled() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN IF NEW.status = 'cancelled' THEN RETURN NULL; END IF; RETURN NEW; END $$"
    )
    conn.execute(
        "CREATE TRIGGER drop_cancelled BEFORE INSERT ON analytics.fct_orders "
        "FOR EACH ROW EXECUTE FUNCTION analytics.drop_cancelled()"
    )
    cancelled = conn.execute(
        f"SELECT count(*) FROM app.orders WHERE {DAY_FILTER} AND status = 'cancelled'"
    ).fetchone()[0]
    assert cancelled > 0

    result = materialize_days(postgres, instance, DAY)

    assert_rejected_and_untouched(result, instance, conn, before, "rows_match_source")
    metadata = check_evaluation(instance, "rows_match_source", DAY)[1].metadata
    assert metadata["source_rows"].value - metadata["target_rows"].value == cancelled


def test_a_large_shift_is_written_but_raises_a_warning_with_the_diff(postgres, instance, conn):
    assert materialize_days(postgres, instance, DAY).success
    rows = fingerprints(conn, [DAY])[DAY].rows
    conn.execute(f"UPDATE app.orders SET net_amount = net_amount * 1.5 WHERE {DAY_FILTER}")

    result = materialize_days(postgres, instance, DAY)

    assert result.success
    status, evaluation = check_evaluation(instance, "change_within_threshold", DAY)
    assert status == FAILED
    assert evaluation.severity.value == "WARN"
    assert evaluation.metadata["rows_changed"].value == rows
    assert evaluation.metadata["rows_added"].value == 0
    assert evaluation.metadata["net_amount_delta"].value > 0
    assert check_evaluation(instance, "rows_match_source", DAY)[0] == PASSED


def test_a_blocking_check_failure_prevents_the_downstream_dbt_model(postgres, instance, conn):
    days = ["2024-04-02", "2024-04-03"]
    both = (fct_orders, dbt_models)
    assert materialize_days(postgres, instance, days[0], days[-1], assets=both).success
    revenue_before = conn.execute("SELECT * FROM analytics.daily_revenue ORDER BY 1").fetchall()
    conn.execute("UPDATE app.orders SET net_amount = net_amount + 1")
    duplicate_a_customer_with_orders_on_day(conn)

    result = materialize_days(postgres, instance, days[0], days[-1], assets=both)

    assert not result.success
    failed_blocking = [
        check_evaluation(instance, check.name, day)
        for check in CHECKS
        for day in days
        if check.blocking and check_evaluation(instance, check.name, day)[0] == FAILED
    ]
    assert failed_blocking, "a blocking check failed"
    assert all(evaluation.blocking for _, evaluation in failed_blocking), "and was stored as such"
    assert result.asset_materializations_for_node(dbt_models.node_def.name) == []
    started = [e.step_key for e in result.all_events if e.event_type_value == "STEP_START"]
    assert started == ["analytics__fct_orders"]
    after = conn.execute("SELECT * FROM analytics.daily_revenue ORDER BY 1").fetchall()
    assert after == revenue_before


def empty_the_source_of_day(conn) -> None:
    conn.execute(f"DELETE FROM app.orders WHERE {DAY_FILTER}")


@pytest.mark.parametrize(
    ("break_day", "check_name", "audit_status"),
    [
        (empty_the_source_of_day, "source_guard", "guard_failed"),
        (duplicate_a_customer_with_orders_on_day, "unique_key_is_unique", "failed"),
    ],
    ids=["refused-by-its-guard", "failing-a-blocking-check"],
)
def test_a_bad_day_of_a_five_day_run_fails_alone_and_the_other_four_are_written(
    postgres, instance, conn, break_day, check_name, audit_status
):
    days = ["2024-04-01", "2024-04-02", DAY, "2024-04-04", "2024-04-05"]
    good = [day for day in days if day != DAY]
    assert materialize_days(postgres, instance, days[0], days[-1]).success
    before = fingerprints(conn, days)
    conn.execute("UPDATE app.orders SET net_amount = net_amount + 1")
    break_day(conn)

    result = materialize_days(postgres, instance, days[0], days[-1])

    assert not result.success
    after = fingerprints(conn, days)
    assert after[DAY] == before[DAY]
    assert all(after[day] != before[day] for day in good), "the good days hold the new rows"
    written = result.asset_materializations_for_node(fct_orders.node_def.name)
    assert sorted(m.partition for m in written) == good
    assert check_evaluation(instance, check_name, DAY)[0] == FAILED
    for day in good:
        for check in CHECKS:
            record = latest_check(instance, check.name, day)
            assert record.run_id == result.run_id, (check.name, day)
            assert record.status == PASSED or not check.blocking, (check.name, day)
    message = step_failure_message(result)
    assert "4 of 5 partition(s) of analytics.fct_orders were written" in message
    assert f"{DAY} keeps its previous rows" in message
    assert f"--select analytics/fct_orders --from {DAY} --to {DAY}" in message, "how to re-run it"
    statuses = conn.execute(
        "SELECT partition_key, status FROM backfill_audit.backfill_runs "
        "WHERE id > 5 ORDER BY partition_key"
    ).fetchall()
    assert statuses == [(day, audit_status if day == DAY else "succeeded") for day in days]

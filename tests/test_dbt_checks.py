"""dbt tests as Dagster asset checks: one result per test and day, also in multi-day runs."""

from __future__ import annotations

from dagster import AssetKey, AssetSelection, materialize
from support import dbt_models, dbt_resource, fct_orders, latest_check, materialize_days

from backfill_assets.defs.dagster_internals import AssetCheckExecutionRecordStatus

DAYS = ["2024-05-06", "2024-05-07", "2024-05-08"]
PASSED = AssetCheckExecutionRecordStatus.SUCCEEDED
FAILED = AssetCheckExecutionRecordStatus.FAILED


def build(assets, postgres, instance):
    return materialize_days(postgres, instance, DAYS[0], DAYS[-1], assets=assets)


def results_by_day(instance, check_key):
    records = {
        day: latest_check(instance, check_key.name, day, check_key.asset_key) for day in DAYS
    }
    return {day: (r.status, r.evaluation) if r else (None, None) for day, r in records.items()}


def test_every_dbt_test_reports_one_passing_result_per_day_of_a_multi_day_run(postgres, instance):
    result = build([fct_orders, dbt_models], postgres, instance)

    assert result.success
    assert len(dbt_models.check_keys) == 6
    for check_key in dbt_models.check_keys:
        by_day = results_by_day(instance, check_key)
        assert {status for status, _ in by_day.values()} == {PASSED}, check_key
        for day, (_, evaluation) in by_day.items():
            assert evaluation.partition == day
            assert evaluation.metadata["dbt_status"].value == "pass"
            assert evaluation.target_materialization_data.run_id == result.run_id


def test_a_row_naming_an_unknown_customer_fails_the_relationship_check_on_its_day_only(
    postgres, instance, conn
):
    assert build([fct_orders], postgres, instance).success
    # A broken row on the middle day: an order whose customer the application does not know.
    conn.execute(
        "INSERT INTO analytics.fct_orders (order_id, order_day, customer_id, sales_channel, status,"
        " net_amount, tax_amount, gross_amount)"
        " VALUES (-1, %s, 987654321, 'web', 'paid', 10, 2, 12)",
        [DAYS[1]],
    )

    result = build([dbt_models], postgres, instance)

    assert result.success, "the relationship test has severity warn: reported, not blocking"
    key = next(k for k in dbt_models.check_keys if k.name.endswith("customer_exists"))
    by_day = results_by_day(instance, key)
    assert {day: status for day, (status, _) in by_day.items()} == {
        DAYS[0]: PASSED,
        DAYS[1]: FAILED,
        DAYS[2]: PASSED,
    }
    failed = by_day[DAYS[1]][1]
    assert failed.severity.value == "WARN" and not failed.blocking
    assert failed.metadata["failed_row_count"].value == 1
    revenue = next(k for k in dbt_models.check_keys if k.name == "revenue_reconciles")
    assert {status for status, _ in results_by_day(instance, revenue).values()} == {PASSED}


def test_a_failing_blocking_dbt_test_fails_the_run_and_every_day_it_cannot_place(
    postgres, instance, conn
):
    assert build([fct_orders, dbt_models], postgres, instance).success
    # A row with no day at all: it belongs to no partition, so every day of the run reports it.
    conn.execute("INSERT INTO analytics.daily_revenue (order_day, order_count) VALUES (NULL, 1)")

    result = build([dbt_models], postgres, instance)

    assert not result.success
    key = next(k for k in dbt_models.check_keys if k.name == "revenue_day_not_null")
    by_day = results_by_day(instance, key)
    assert {status for status, _ in by_day.values()} == {FAILED}
    assert all(evaluation.blocking for _, evaluation in by_day.values())
    other = next(k for k in dbt_models.check_keys if k.name == "revenue_one_row_per_day")
    assert {status for status, _ in results_by_day(instance, other).values()} == {PASSED}
    assert instance.get_materialized_partitions(AssetKey(["analytics", "daily_revenue"])) == set(
        DAYS
    )


REVENUE = AssetKey(["analytics", "daily_revenue"])


def run_checks_alone(postgres, instance, day: str | None = None):
    """daily_revenue's checks without its model, as the UI's *Execute all* launches them: with
    no partition, or for ``day``."""
    days = {"start": day, "end": day} if day else {}
    return materialize(
        [fct_orders, dbt_models],
        selection=AssetSelection.checks_for_assets(REVENUE),
        resources={"postgres": postgres, "dbt": dbt_resource},
        instance=instance,
        tags={f"dagster/asset_partition_range_{edge}": key for edge, key in days.items()},
        raise_on_error=False,
    )


def test_checks_launched_without_a_partition_run_once_per_built_day_of_their_model(
    postgres, instance, conn
):
    """The UI's "Execute all" on a mart's checks starts a run with no partition: each check is
    evaluated on every day the model holds (the days Dagster saw it materialized), day by day."""
    assert build([fct_orders, dbt_models], postgres, instance).success
    conn.execute(
        "UPDATE analytics.daily_revenue SET order_count = order_count + 1 WHERE order_day = %s",
        [DAYS[2]],
    )

    result = run_checks_alone(postgres, instance)

    key = next(k for k in dbt_models.check_keys if k.name == "revenue_reconciles")
    by_day = {day: latest_check(instance, key.name, day, REVENUE) for day in DAYS}
    assert {day: r.run_id == result.run_id for day, r in by_day.items()} == dict.fromkeys(
        DAYS, True
    )
    assert {day: r.status for day, r in by_day.items()} == {
        DAYS[0]: PASSED,
        DAYS[1]: PASSED,
        DAYS[2]: FAILED,
    }
    built_by = {r.evaluation.target_materialization_data.run_id for r in by_day.values()}
    assert result.run_id not in built_by, "each result points at the day's own materialization"
    assert not result.success, "a failed blocking test still fails the run"


def test_checks_launched_alone_for_one_day_judge_that_days_latest_materialization(
    postgres, instance
):
    built = build([fct_orders, dbt_models], postgres, instance)
    assert built.success

    result = run_checks_alone(postgres, instance, day=DAYS[1])

    assert result.success
    for key in (k for k in dbt_models.check_keys if k.asset_key == REVENUE):
        record = latest_check(instance, key.name, DAYS[1], REVENUE)
        assert record.run_id == result.run_id and record.status == PASSED
        assert record.evaluation.target_materialization_data.run_id == built.run_id, key.name

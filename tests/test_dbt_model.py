"""The dbt model, built per partition through dagster-dbt against a real PostgreSQL."""

from __future__ import annotations

from dagster import materialize

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

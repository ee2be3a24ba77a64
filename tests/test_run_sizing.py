"""Partitions per backfill run: from a partition's measured cost, bounded, shared along lineage."""

from __future__ import annotations

from dataclasses import replace

from support import FCT_ORDERS, REGISTRY
from test_end_to_end import record_past_writes

from backfill_assets.core import settings
from backfill_assets.core.registry import Registry
from backfill_assets.core.run_sizing import (
    MAX_PER_RUN,
    UNMEASURED_PER_RUN,
    partitions_per_run,
    seconds_per_partition,
    sizes,
)
from backfill_assets.defs.definitions import build_definitions


def test_runs_aim_at_a_minute_of_writing_within_bounds():
    assert partitions_per_run(None) == UNMEASURED_PER_RUN
    assert partitions_per_run(2.0) == 30
    assert partitions_per_run(0.001) == MAX_PER_RUN
    assert partitions_per_run(600.0) == 1


def test_the_cost_of_a_partition_is_the_median_of_the_tables_recent_successful_writes(conn):
    assert seconds_per_partition(conn) == {}
    record_past_writes(conn, FCT_ORDERS.qualified_name, seconds=4, count=5)
    record_past_writes(conn, FCT_ORDERS.qualified_name, seconds=100, count=2)
    conn.execute(
        "UPDATE backfill_audit.backfill_runs SET status = 'failed' WHERE ended_at - started_at"
        " > interval '50 seconds' AND id = (SELECT max(id) FROM backfill_audit.backfill_runs)"
    )
    assert seconds_per_partition(conn) == {FCT_ORDERS.qualified_name: 4.0}


def test_tables_read_by_the_same_models_share_the_smallest_size_and_others_keep_their_own():
    slow = replace(FCT_ORDERS, name="slow_orders")
    new = replace(FCT_ORDERS, name="new_orders")
    fixed = replace(FCT_ORDERS, name="fixed_orders", partitions_per_run=3)
    registry = Registry((FCT_ORDERS, slow, new, fixed))
    measured = {FCT_ORDERS.qualified_name: 0.5, slow.qualified_name: 5.0}
    names = [t.qualified_name for t in (FCT_ORDERS, slow, new, fixed)]

    assert sizes(registry, measured) == dict(
        zip(names, [120, 12, UNMEASURED_PER_RUN, 3], strict=True)
    )
    # Linked through two groups of models (fct_orders with slow_orders, slow_orders with the
    # fixed one): all three take the smallest; the unmeasured table, linked to none, its own.
    together = [{names[0], names[1]}, {names[1], names[3]}]
    assert sizes(registry, measured, together) == dict(
        zip(names, [3, 3, UNMEASURED_PER_RUN, 3], strict=True)
    )
    # A table reading another declared table of its calendar shares its size, as one read by
    # the same models does.
    reads = replace(new, upstream=(*new.upstream, slow.qualified_name))
    assert sizes(Registry((FCT_ORDERS, slow, reads)), measured)[reads.qualified_name] == 12


def test_a_table_and_the_dbt_models_built_from_it_get_the_same_measured_run_size(
    conn, data_url, monkeypatch
):
    """The daemon puts a table and its models in one run only when their policies are equal."""
    record_past_writes(conn, FCT_ORDERS.qualified_name, seconds=10)
    monkeypatch.setenv(settings.DATA_URL_ENV, data_url)

    graph = build_definitions(REGISTRY).resolve_asset_graph()

    policies = {
        key.to_user_string(): graph.get(key).backfill_policy.max_partitions_per_run
        for key in graph.get_all_asset_keys()
        if graph.get(key).partitions_def is not None
    }
    # order_status_daily, on the same calendar but read by no model of fct_orders', is sized on
    # its own (unmeasured): it does not hold fct_orders' runs to its size.
    assert policies == {
        "analytics/fct_orders": 6,
        "analytics/daily_revenue": 6,
        "analytics/customer_daily_orders": 6,
        "analytics/order_status_daily": UNMEASURED_PER_RUN,
    }

"""Dagster's event log as dagster.yaml configures it: one kept connection, events stored by the
batch, the same events and check results as Dagster's stock storage."""

from __future__ import annotations

import time

from conftest import DAGSTER_TEMPLATE, DATA_TEMPLATE, clone_database
from dagster import (
    AssetKey,
    AssetMaterialization,
    AssetRecordsFilter,
    DagsterInstance,
    instance_for_test,
)
from sqlalchemy import event
from sqlalchemy.engine import make_url
from support import FCT_ORDERS, FCT_ORDERS_KEY, fct_orders, latest_check, materialize_days

from backfill_assets.core import settings
from backfill_assets.core.database import connect
from backfill_assets.defs.event_storage import PooledPostgresEventLogStorage
from backfill_assets.defs.resources import PostgresResource

EVENTS = 50


def _sessions_opened_storing_events(instance: DagsterInstance, cluster: str, url: str) -> int:
    """Connections PostgreSQL accepted into the storage database while ``EVENTS`` were stored."""
    database = make_url(url).database
    query = "SELECT sessions FROM pg_stat_database WHERE datname = %s"
    with connect(cluster) as conn:
        instance.report_runless_asset_event(AssetMaterialization("warm_up"))
        time.sleep(0.5)  # a closed session is counted as its server process exits
        before = conn.execute(query, [database]).fetchone()[0]
        for number in range(EVENTS):
            instance.report_runless_asset_event(
                AssetMaterialization("probe", partition=f"p{number}")
            )
        time.sleep(0.5)
        return conn.execute(query, [database]).fetchone()[0] - before


def test_storing_many_events_opens_a_connection_once_not_per_statement(
    cluster, dagster_env, dagster_storage_url
):
    with DagsterInstance.get() as instance:  # the repository's dagster.yaml
        assert isinstance(instance.event_log_storage, PooledPostgresEventLogStorage)
        opened = _sessions_opened_storing_events(instance, cluster, dagster_storage_url)
        records = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=AssetKey("probe")), limit=EVENTS + 1
        ).records
    assert opened <= 2, f"{opened} sessions for {EVENTS} events"
    assert sorted(r.partition_key for r in records) == sorted(f"p{n}" for n in range(EVENTS))

    # The same count under Dagster's stock PostgreSQL storage: a connection per statement.
    stock = {"storage": {"postgres": {"postgres_url": dagster_storage_url}}}
    with instance_for_test(overrides=stock) as instance:
        assert _sessions_opened_storing_events(instance, cluster, dagster_storage_url) >= EVENTS


DAYS = ("2024-04-01", "2024-04-05")


def _statements(storage) -> list[str]:
    """Every statement the storage sends to PostgreSQL from now on (its engine's own events)."""
    sent: list[str] = []
    event.listen(
        storage._engine, "before_cursor_execute", lambda *args: sent.append(args[2].split()[0])
    )
    return sent


def _check_results(instance: DagsterInstance) -> dict[tuple[str, str], tuple]:
    """Every check's result per partition, read the way the UI reads them."""
    results = {}
    for key in fct_orders.check_keys:
        for day in FCT_ORDERS.partitioning.keys_between(*DAYS):
            record = latest_check(instance, key.name, day)
            evaluation = record.evaluation
            results[key.name, day] = (
                record.status,
                evaluation.passed,
                sorted(evaluation.metadata),
                record.event.dagster_event.event_specific_data.partition,
                evaluation.target_materialization_data is not None,
            )
    return results


def _materialized_days(instance: DagsterInstance) -> list[str]:
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=FCT_ORDERS_KEY), limit=100
    ).records
    return sorted(r.partition_key for r in records)


def test_a_runs_events_are_stored_by_the_batch_and_read_as_if_stored_one_by_one(
    cluster, postgres, instance, monkeypatch
):
    """The same run of 5 partitions (each on its own copy of the shop) under the project's
    storage and under Dagster's stock one: the same materializations and check results per
    partition; the project's in a few statements."""
    batched = _statements(instance.event_log_storage)
    assert materialize_days(postgres, instance, *DAYS).success
    ours = _check_results(instance)

    stock_url = settings.to_sqlalchemy(clone_database(cluster, DAGSTER_TEMPLATE, "stock"))
    stock = {"storage": {"postgres": {"postgres_url": stock_url}}}
    # Dagster's own defaults: no batches (the project's storage turns them on where it loads).
    monkeypatch.delenv("DAGSTER_EVENT_BATCH_SIZE", raising=False)
    with instance_for_test(overrides=stock) as stock_instance:
        assert not isinstance(stock_instance.event_log_storage, PooledPostgresEventLogStorage)
        one_by_one = _statements(stock_instance.event_log_storage)
        other_shop = PostgresResource(url=clone_database(cluster, DATA_TEMPLATE, "shop"))
        assert materialize_days(other_shop, stock_instance, *DAYS).success
        assert _check_results(stock_instance) == ours
        assert _materialized_days(stock_instance) == _materialized_days(instance)

    days = len(FCT_ORDERS.partitioning.keys_between(*DAYS))
    assert len(ours) == days * len(fct_orders.check_keys)
    assert all(status.value == "SUCCEEDED" and passed for status, passed, *_ in ours.values())
    # Stock: an INSERT per check evaluation and per planned materialization (7 a partition);
    # here those of the whole run in a few statements.
    saved = one_by_one.count("INSERT") - batched.count("INSERT")
    assert saved >= days * 7, (batched.count("INSERT"), one_by_one.count("INSERT"))

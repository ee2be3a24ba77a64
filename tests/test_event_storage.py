"""Dagster's event log as dagster.yaml configures it: one kept connection, the same events."""

from __future__ import annotations

import time

from dagster import (
    AssetKey,
    AssetMaterialization,
    AssetRecordsFilter,
    DagsterInstance,
    instance_for_test,
)
from sqlalchemy.engine import make_url

from backfill_assets.core.database import connect
from backfill_assets.defs.event_storage import PooledPostgresEventLogStorage

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

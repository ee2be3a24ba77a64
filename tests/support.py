"""Helpers shared by the tests: real materializations, and reading back what they recorded."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import psycopg
from dagster import AssetCheckKey, AssetKey, DagsterInstance, materialize
from dagster._core.event_api import PartitionKeyFilter
from psycopg.rows import dict_row

from backfill_assets import partitions
from backfill_assets.defs.dbt import dbt_resource
from backfill_assets.defs.partitioned_tables import fct_orders
from backfill_assets.fingerprint import Fingerprint, partition_fingerprint
from backfill_assets.tables import FCT_ORDERS

FCT_ORDERS_KEY = AssetKey(["analytics", "fct_orders"])


def materialize_days(
    postgres,
    instance: DagsterInstance,
    first: str,
    last: str | None = None,
    *,
    assets: Sequence = (fct_orders,),
    tags: Mapping[str, str] | None = None,
):
    """One run over ``first``..``last`` (inclusive), as a backfill run of that range would be."""
    range_tags = {
        "dagster/asset_partition_range_start": first,
        "dagster/asset_partition_range_end": last or first,
    }
    return materialize(
        list(assets),
        resources={"postgres": postgres, "dbt": dbt_resource},
        instance=instance,
        tags={**range_tags, **(tags or {})},
        raise_on_error=False,
    )


def fingerprints(conn: psycopg.Connection, keys: Sequence[str]) -> dict[str, Fingerprint]:
    return {key: partition_fingerprint(conn, FCT_ORDERS, partitions.window(key)) for key in keys}


def latest_check(instance: DagsterInstance, check_name: str, partition: str):
    """The latest execution of a check for one partition, read the way the UI reads it."""
    key = AssetCheckKey(FCT_ORDERS_KEY, check_name)
    records = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [key], partition_filter=PartitionKeyFilter(key=partition)
    )
    return records.get(key)


def audit_rows(conn: psycopg.Connection, **where: object) -> list[dict]:
    conditions = " AND ".join(f"{column} = %({column})s" for column in where) or "true"
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            f"SELECT * FROM backfill_audit.backfill_runs WHERE {conditions} ORDER BY id", where
        ).fetchall()


def step_failure_message(result) -> str:
    return "\n".join(
        str(event.event_specific_data.error) for event in result.all_events if event.is_step_failure
    )

"""Late-arriving data, noticed without anyone asking: a sensor per declared table.

Each evaluation compares, for every written partition, the checksum its latest write recorded
with what the table's SQL yields now (``core.staleness``, the same comparison as
``backfill-assets stale``) and, when some differ, requests one asset backfill of exactly those
partitions, the table and what is built from it, tagged with the reason. The UI shows the sensor
under Automation (off by default: turning it on is a decision), each tick's verdict, and the
backfill it requested under Runs > Backfills; "Test sensor" there shows what it would request.

It costs one statement per evaluation that runs the table's query once per partition (the
guard's measurement), hence the hourly default. While a backfill it requested still runs, it
requests nothing more.
"""

from __future__ import annotations

from dagster import (
    AssetSelection,
    DefaultSensorStatus,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SkipReason,
    sensor,
)

from backfill_assets.core import settings
from backfill_assets.core.database import connect
from backfill_assets.core.params import LAUNCHED_BY, REASON
from backfill_assets.core.session_limits import timed
from backfill_assets.core.staleness import staleness
from backfill_assets.core.tables import TableSpec
from backfill_assets.defs.dagster_internals import (
    AssetGraphSubset,
    AssetKeyPartitionKey,
    BulkActionsFilter,
    BulkActionStatus,
)
from backfill_assets.defs.table_assets import asset_key

INTERVAL_S = 3600


def sensor_name(table: TableSpec) -> str:
    return f"late_data__{table.schema}__{table.name}"


def late_data_sensor(table: TableSpec) -> SensorDefinition:
    """The table's late-data sensor (stopped until someone turns it on)."""
    name, key = sensor_name(table), asset_key(table)

    @sensor(
        name=name,
        asset_selection=AssetSelection.assets(key).downstream(),
        minimum_interval_seconds=INTERVAL_S,
        default_status=DefaultSensorStatus.STOPPED,
        description=(
            f"Backfills the written partitions of {table.qualified_name} whose source changed "
            "since they were written (late-arriving or corrected rows), and what is built from "
            "them. Off by default; checks hourly."
        ),
    )
    def _late_data(context: SensorEvaluationContext):
        in_flight = context.instance.get_backfills(
            filters=BulkActionsFilter(
                statuses=[BulkActionStatus.REQUESTED], tags={LAUNCHED_BY: name}
            )
        )
        if in_flight:
            return SkipReason(
                f"backfill {in_flight[0].backfill_id} of changed partitions still runs"
            )
        keys = table.partitioning.all_keys()
        limits = table.timeouts.session()
        with (
            timed(f"{table.qualified_name}'s written partitions and source", limits),
            connect(
                settings.data_url(), application_name=f"backfill_assets.{name}", limits=limits
            ) as conn,
        ):
            changed = [
                s.partition_key
                for s in staleness(conn, table, table.partitioning.windows(keys))
                if s.changed
            ]
        if not changed:
            return SkipReason(
                f"no written partition of {table.qualified_name} differs from its source"
            )
        graph = context.repository_def.asset_graph
        partitions = graph.get(key).partitions_def
        targets = [
            k
            for k in AssetSelection.assets(key).downstream().resolve(graph)
            if graph.get(k).partitions_def == partitions
        ]
        subset = AssetGraphSubset.from_asset_partition_set(
            {AssetKeyPartitionKey(k, p) for k in targets for p in changed}, graph
        )
        context.log.info(f"source changed since written: {', '.join(changed)}")
        return RunRequest.for_asset_graph_subset(
            subset,
            tags={
                LAUNCHED_BY: name,
                REASON: (
                    f"late data: the source of {len(changed)} partition(s) of "
                    f"{table.qualified_name} changed since written ({_listed(changed)})"
                ),
            },
        )

    return _late_data


def _listed(keys: list[str]) -> str:
    """The keys themselves when few, else the first and last (not a range: the ones between
    may be unchanged)."""
    return ", ".join(keys) if len(keys) <= 5 else f"{', '.join(keys[:3])}, … {keys[-1]}"

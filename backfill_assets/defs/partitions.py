"""Dagster partitions definitions, one per distinct table partitioning.

Built from the table's ``Partitioning`` (``core/partitioning.py``), so the keys the UI offers and
``dagster job backfill`` validates are the ones the writer accepts. Equal partitionings share one
definition object, which lets a table and the dbt models built from it share backfill runs.
"""

from functools import cache

from dagster import (
    BackfillPolicy,
    DailyPartitionsDefinition,
    HourlyPartitionsDefinition,
    MonthlyPartitionsDefinition,
    WeeklyPartitionsDefinition,
)
from dagster import TimeWindowPartitionsDefinition as PartitionsDef

from backfill_assets.core.partitioning import Partitioning


@cache
def _definition(granularity: str, start: str, end: str | None) -> PartitionsDef:
    if granularity == "week":  # weeks from Monday (day_offset 1), as core/partitioning.py has them
        return WeeklyPartitionsDefinition(start_date=start, end_date=end, day_offset=1)
    if granularity == "hour":  # UTC, keys 2024-03-01-13:00 (core/partitioning.py's HOUR_KEY_FORMAT)
        return HourlyPartitionsDefinition(start_date=start, end_date=end)
    kind = DailyPartitionsDefinition if granularity == "day" else MonthlyPartitionsDefinition
    return kind(start_date=start, end_date=end)


def partitions_def(partitioning: Partitioning) -> PartitionsDef:
    end = partitioning.end.strftime(partitioning.key_format) if partitioning.end else None
    start = partitioning.start.strftime(partitioning.key_format)
    return _definition(partitioning.granularity, start, end)


@cache
def backfill_policy(partitions_per_run: int) -> BackfillPolicy:
    """Runs of up to ``partitions_per_run`` partitions (``core/run_sizing.py`` picks the number)."""
    return BackfillPolicy.multi_run(max_partitions_per_run=partitions_per_run)


WRITES_POOL = "postgres_writes"
"""The Dagster concurrency pool of every asset that writes to PostgreSQL; its limit (dagster.yaml,
``concurrency.pools``) caps how many writing runs are in progress at once."""

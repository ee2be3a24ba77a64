"""How a run's partition window reaches dbt, whatever the partitions' granularity.

dbt builds a microbatch model in batches of an hour, a day, a month or a year (``batch_size``),
and one run hands it the window of its partitions as ``--event-time-start/--event-time-end``.
A batch must lie inside one partition: dbt widens the window to whole batches, so a model with
batches coarser than its table's partitions (a month's batch for a weekly table) would delete
and rebuild rows outside the run's partitions. Finer batches tile a partition (a week is seven
days' batches, each in its own transaction). Weeks are no dbt batch size: a model reading a
weekly table builds with ``batch_size='day'`` (or ``'hour'``); anything coarser is refused when
the definitions load, naming the model and the size to use.
"""

from collections.abc import Mapping, Sequence

from dagster import TimeWindowPartitionsDefinition

from backfill_assets.core.partitioning import Partitioning
from backfill_assets.core.registry import DeclarationError

BATCH_SIZES = {
    "hour": ("hour",),
    "day": ("day", "hour"),
    "week": ("day", "hour"),
    "month": ("month", "day", "hour"),
}
"""The dbt batch sizes that tile a partition of each granularity, the natural one first."""


def check_batch_sizes(manifest: Mapping, models: Sequence[str], partitioning: Partitioning) -> None:
    """Refuse a microbatch model among ``models`` whose batches would not fit its partitions."""
    allowed = BATCH_SIZES[partitioning.granularity]
    for node in manifest["nodes"].values():
        config = node.get("config") or {}
        if (
            node["resource_type"] != "model"
            or node["name"] not in models
            or config.get("incremental_strategy") != "microbatch"
            or config.get("batch_size") in allowed
        ):
            continue
        weeks = " (weeks are no dbt batch size)" if partitioning.granularity == "week" else ""
        raise DeclarationError(
            f"dbt model {node['name']} has batch_size={config.get('batch_size')!r}, but reads a "
            f"table with {partitioning.adjective} partitions: a batch must lie inside one "
            f"partition{weeks}; set batch_size='{allowed[0]}' in its config"
        )


def event_time_args(
    definition: TimeWindowPartitionsDefinition, first: str, last: str, granularity: str
) -> list[str]:
    """``--event-time-start/--event-time-end`` for the partitions ``first..last``: dates, or
    for hours UTC times (``2024-03-01T13:00:00``, as dbt reads them: in UTC)."""
    start = definition.time_window_for_partition_key(first).start
    end = definition.time_window_for_partition_key(last).end
    shown = "%Y-%m-%dT%H:%M:%S" if granularity == "hour" else "%Y-%m-%d"
    return ["--event-time-start", f"{start:{shown}}", "--event-time-end", f"{end:{shown}}"]

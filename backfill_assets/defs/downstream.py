"""A bad day fails alone, downstream too: the written days' downstream is built in their backfill.

A run that writes a table and builds its dbt marts runs them as steps of one process. When a guard
refuses one day, the table's step fails (so the backfill marks exactly that day failed and
*Re-execute from failure* re-runs it), and Dagster then skips the marts' step for *every* day of
the run: a step cannot build part of its range, nor can the table's step report part of its range
materialized and let the next step go on (Dagster 1.13 materializes an output for the whole range,
and a missing output skips what depends on it).

So the failing step queues, before it fails, one run per contiguous stretch of the days it wrote,
building what this run would have built from them, with the run's tags (the backfill's id among
them): the backfill waits for those runs, counts their days materialized, and keeps the refused
day's downstream failed, with the table step's reason. Measured against splitting every backfill
into a table run and a marts run (which Dagster would gate by itself): this costs nothing when no
day is refused; the split costs a daemon pass (30 s in Dagster 1.13) and a run's start-up on
every backfill.
"""

from __future__ import annotations

from collections.abc import Sequence

from dagster import AssetExecutionContext, AssetKey, AssetSelection, DagsterRunStatus

from backfill_assets.defs.dagster_internals import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    BACKFILL_ID_TAG,
    PARTITION_NAME_TAG,
    USER_TAG,
)

FOLLOWS_RUN_TAG = ".backfill_assets/downstream_of_run"
"""On a run queued for the written days' downstream: the run whose step refused a day. Hidden
(a leading dot, as Dagster's own bookkeeping tags), and no ``backfill_assets/`` parameter, which
a run checks against the known ones."""
_KEPT_SYSTEM_TAGS = {BACKFILL_ID_TAG, USER_TAG}


def downstream_in_run(context: AssetExecutionContext) -> set[AssetKey]:
    """The assets this run builds from the step's own (its downstream in the run's selection)."""
    own = set(context.assets_def.keys)
    graph = context.repository_def.asset_graph
    selected = context.run.asset_selection or context.job_def.asset_layer.selected_asset_keys
    return (AssetSelection.assets(*own).downstream().resolve(graph) & set(selected)) - own


def stretches(all_keys: Sequence[str], written: Sequence[str]) -> list[tuple[str, str]]:
    """``written`` as (first, last) stretches of partition keys that follow each other."""
    order = {key: i for i, key in enumerate(all_keys)}
    found: list[list[str]] = []
    for key in sorted(written, key=order.__getitem__):
        if found and order[key] == order[found[-1][1]] + 1:
            found[-1][1] = key
        else:
            found.append([key, key])
    return [(first, last) for first, last in found]


def queue_downstream_of_written(context: AssetExecutionContext, written: Sequence[str]) -> list:
    """Queue the runs that build, for the ``written`` partitions, what this run would have built
    from them; returns ``(run id, first, last)`` per run. None when the run builds nothing
    downstream, or was not launched through a code location (a CLI's in-process run: there is
    no code location to launch another run from)."""
    run = context.run
    keys = downstream_in_run(context)
    if not written or not keys or run.remote_job_origin is None:
        return []
    job = context.repository_def.get_job(run.job_name)
    all_keys = context.assets_def.partitions_def.get_partition_keys(
        dynamic_partitions_store=context.instance
    )
    tags = {
        name: value
        for name, value in run.tags.items()
        if name in _KEPT_SYSTEM_TAGS or not name.startswith(("dagster/", "."))
    }
    queued = []
    for first, last in stretches(all_keys, written):
        window = (
            {PARTITION_NAME_TAG: first}
            if first == last
            else {ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last}
        )
        follow_up = context.instance.create_run_for_job(
            job_def=job,
            run_config=run.run_config,
            status=DagsterRunStatus.NOT_STARTED,
            tags={**tags, **window, FOLLOWS_RUN_TAG: run.run_id},
            asset_selection=frozenset(keys),
            remote_job_origin=run.remote_job_origin,
            job_code_origin=run.job_code_origin,
            repository_load_data=context.repository_def.repository_load_data,
        )
        context.instance.submit_run(follow_up.run_id, workspace=None)
        queued.append((follow_up.run_id, first, last))
    return queued

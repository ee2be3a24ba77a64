"""Asset checks declared once for every partitioned table, with one result per partition.

The checks themselves run in ``guards`` (before the write) and ``reconcile`` (inside the write's
transaction); this module declares them to Dagster and reports their outcomes.

Dagster fills a check result's partition only when a step has a single partition key; in a run
that covers several partitions an ``AssetCheckResult`` is stored without one. So each outcome is
emitted as an ``AssetCheckEvaluation`` carrying its partition and pointing at that partition's
materialization: the UI then shows partition 2024-04-03's own results even when one run wrote
a month.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from dagster import (
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetRecordsFilter,
    DagsterEventType,
    EventLogRecord,
    Output,
)

from backfill_assets.core.outcomes import CheckDeclaration
from backfill_assets.core.strategies import PartitionOutcome, strategy_of
from backfill_assets.core.tables import TableSpec
from backfill_assets.defs.dagster_internals import AssetCheckEvaluationTargetMaterializationData
from backfill_assets.defs.partitions import partitions_def

CHECKS: tuple[CheckDeclaration, ...] = (
    CheckDeclaration(
        "source_guard",
        "Before the write: the source is not empty or sharply smaller than what the partition "
        "holds, and has no NULL keys. On failure nothing is deleted.",
        blocking=True,
    ),
    CheckDeclaration(
        "rows_match_source",
        "The partition holds as many rows as its source yields.",
        blocking=True,
    ),
    CheckDeclaration(
        "unique_key_is_unique",
        "No value of the table's unique key occurs twice in the partition, nor in another "
        "partition of the table.",
        blocking=True,
    ),
    CheckDeclaration(
        "required_columns_not_null",
        "Columns declared required hold no NULLs.",
        blocking=True,
    ),
    CheckDeclaration(
        "measures_reconcile",
        "Each measure's sum equals the source's within the table's tolerance.",
        blocking=True,
    ),
    CheckDeclaration(
        "change_within_threshold",
        "Before/after diff: rows added, removed, changed and measure deltas; WARN when the "
        "partition moved more than the threshold, so analysts know numbers shifted.",
        blocking=False,
    ),
)
BLOCKING = {check.name: check.blocking for check in CHECKS}


def check_specs_for(table: TableSpec, key: AssetKey) -> list[AssetCheckSpec]:
    described = strategy_of(table).check_descriptions
    return [
        AssetCheckSpec(
            check.name,
            asset=key,
            description=described.get(check.name, check.description),
            blocking=check.blocking,
            partitions_def=partitions_def(table.partitioning),
            metadata={"table": table.qualified_name},
        )
        for check in CHECKS
    ]


def evaluations(
    context: AssetExecutionContext,
    outcomes: Iterable[PartitionOutcome],
    *,
    materialized: bool,
) -> Iterator[AssetCheckEvaluation]:
    """One evaluation per check and partition, linked to the data it judged: this run's write
    (``materialized``), or else the rows the partition still holds, so a refused or rolled-back
    day shows its failed check in the UI's partition view instead of reading as never checked
    (not so a failed in-place update, whose committed batches changed those rows)."""
    outcomes = list(outcomes)
    key = context.assets_def.key
    if materialized:
        targets = this_runs_materializations(context)
    else:
        targets = latest_materializations(context, key, {o.window.key for o in outcomes})
    for outcome in outcomes:
        target = None if outcome.committed else targets.get((key, outcome.window.key))
        for name, result in outcome.check_outcomes().items():
            metadata = {"partition": outcome.window.key, **result.metadata}
            if result.message:
                metadata["message"] = result.message
            yield AssetCheckEvaluation(
                asset_key=key,
                check_name=name,
                passed=result.passed,
                metadata=metadata,
                severity=AssetCheckSeverity(result.severity),
                partition=outcome.window.key,
                blocking=BLOCKING[name],
                target_materialization_data=target,
            )


def check_outputs(context: AssetExecutionContext) -> Iterator[Output]:
    """The step must still yield each check's output once, after the per-partition evaluations."""
    for check in CHECKS:
        check_key = AssetCheckKey(context.assets_def.key, check.name)
        name = context.assets_def.get_output_name_for_asset_check_key(check_key)
        yield Output(None, output_name=name)


def this_runs_materializations(
    context: AssetExecutionContext,
) -> dict[tuple[AssetKey, str], AssetCheckEvaluationTargetMaterializationData]:
    """This run's materializations so far, by asset and partition: one storage query per step,
    not one per partition (each is a round trip to Dagster's event log)."""
    records = context.instance.get_records_for_run(
        context.run.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION
    ).records
    found = {}
    for record in records:
        event = record.event_log_entry.dagster_event
        if event is None or event.asset_key is None or event.partition is None:
            continue
        found[event.asset_key, event.partition] = _target(record)
    return found


def _target(record: EventLogRecord) -> AssetCheckEvaluationTargetMaterializationData:
    """A materialization's record as the target a check result points at."""
    return AssetCheckEvaluationTargetMaterializationData(
        storage_id=record.storage_id,
        run_id=record.event_log_entry.run_id,
        timestamp=record.event_log_entry.timestamp,
    )


def latest_materializations(
    context: AssetExecutionContext, key: AssetKey, partitions: set[str] | None = None
) -> dict[tuple[AssetKey, str], AssetCheckEvaluationTargetMaterializationData]:
    """The latest materialization of each materialized partition of ``key`` (of ``partitions``,
    if given), by asset and partition: what the partition holds now. Two storage queries,
    whatever the number of partitions."""
    if partitions is not None and not partitions:
        return {}
    latest = context.instance.event_log_storage.get_latest_storage_id_by_partition(
        key, DagsterEventType.ASSET_MATERIALIZATION, partitions
    )
    if not latest:
        return {}
    partition_of = {storage_id: partition for partition, storage_id in latest.items()}
    records = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=key, storage_ids=list(partition_of)), limit=len(partition_of)
    ).records
    return {(key, partition_of[record.storage_id]): _target(record) for record in records}

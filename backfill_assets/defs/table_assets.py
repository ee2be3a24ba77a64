"""Declared tables as Dagster assets: one asset, its checks and its sources per declaration.

An asset body says only *which* partitions to write and how Dagster hears of it: the run itself
(checks, guards, the writes through the table's strategy, the pause and the throttle) is
``core/run.py``'s, shared with every other driver. A run may cover several partitions (see
``core/run_sizing.py``): each partition still commits in its own transaction and reports its own
metadata and check results.
"""

import time
from collections.abc import Callable, Iterator

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    AssetsDefinition,
    AssetSpec,
    DagsterRunStatus,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from backfill_assets.core.audit import AuditTrail, RunInfo
from backfill_assets.core.change_report import markdown
from backfill_assets.core.params import params_for
from backfill_assets.core.registry import Registry
from backfill_assets.core.run import RunHooks, RunRefused, RunResult, expire_snapshots, run_table
from backfill_assets.core.run_sizing import UNMEASURED_PER_RUN
from backfill_assets.core.strategies import PartitionOutcome
from backfill_assets.core.tables import TableSpec
from backfill_assets.defs.checks import check_outputs, check_specs_for, evaluations
from backfill_assets.defs.dagster_internals import (
    BACKFILL_ID_TAG,
    DagsterExecutionInterruptedError,
)
from backfill_assets.defs.downstream import queue_downstream_of_written
from backfill_assets.defs.partitions import WRITES_POOL, backfill_policy, partitions_def
from backfill_assets.defs.resources import PostgresResource, in_celery_task

CANCEL_READ_S = 1.0
"""A step on a Celery worker reads its run's status at most this often (``cancel_checkpoint``)."""


def asset_key(table: TableSpec) -> AssetKey:
    return AssetKey(list(table.asset_path))


def source_specs(registry: Registry) -> list[AssetSpec]:
    """An external asset for every upstream table that no declaration builds."""
    built = set(registry.by_asset_path())
    readers: dict[str, list[str]] = {}
    for table in registry:
        for upstream in table.upstream:
            readers.setdefault(upstream, []).append(table.qualified_name)
    return [
        AssetSpec(
            key=AssetKey(upstream.split(".")),
            description=f"Read by {', '.join(names)}; written outside Dagster (a source).",
            group_name=upstream.split(".")[0],
            kinds={"postgres"},
        )
        for upstream, names in readers.items()
        if tuple(upstream.split(".")) not in built
    ]


def table_asset(table: TableSpec, partitions_per_run: int = UNMEASURED_PER_RUN) -> AssetsDefinition:
    """The table's asset; a backfill run writes up to ``partitions_per_run`` of its partitions
    (one transaction each), sized by ``core/run_sizing.py``."""
    key = asset_key(table)

    @asset(
        key=key,
        description=table.description or None,
        partitions_def=partitions_def(table.partitioning),
        backfill_policy=backfill_policy(partitions_per_run),
        pool=WRITES_POOL,
        code_version=table.sql_hash,
        deps=[AssetKey(upstream.split(".")) for upstream in table.upstream],
        check_specs=check_specs_for(table, key),
        group_name=table.schema,
        owners=list(table.owners),
        kinds={"postgres"},
        metadata={
            "table": table.qualified_name,
            "partition_column": table.partition_column,
            "partitions": table.partitioning.describe(),
            "sql": table.sql_source,
            "strategy": table.strategy,
            "partitions_per_run": partitions_per_run,
        },
    )
    def _partitioned_table(
        context: AssetExecutionContext, postgres: PostgresResource
    ) -> Iterator[object]:
        windows = table.partitioning.windows(context.partition_keys)
        params = params_for(table, context.run.tags)
        run = RunInfo(
            dagster_run_id=context.run.run_id,
            backfill_id=context.run.tags.get(BACKFILL_ID_TAG),
            launched_by=params.launched_by,
            parameters={**params.as_json(), "partitions_in_run": len(windows)},
            reason=params.reason,
        )
        hooks = RunHooks(
            context.log.info, context.log.warning, context.log.error, cancel_checkpoint(context)
        )
        with (
            postgres.connect(table.timeouts.session()) as conn,
            AuditTrail(postgres.resolved_url(), warn=context.log.warning) as audit,
        ):
            try:
                result = run_table(conn, audit, run, table, windows, params, hooks)
            except RunRefused as exc:
                raise Failure(description=str(exc)) from None
            if not result.complete:
                yield from _partial_run(context, run, table, result)
                return
            for outcome in result.outcomes:
                context.add_asset_metadata(
                    report_metadata(outcome, table, run), partition_key=outcome.window.key
                )
            yield MaterializeResult()
            yield from evaluations(context, result.outcomes, materialized=True)
            yield from check_outputs(context)
            expire_snapshots(conn, table, hooks)

    return _partitioned_table


def cancel_checkpoint(context: AssetExecutionContext) -> Callable[[], None]:
    """In a run's own process a cancel is a signal that interrupts the step (the launcher's
    SIGINT). A step on a Celery worker is another process, on another host maybe, which the
    signal never reaches (dagster-celery only revokes steps not yet started): it reads its run's
    status instead, at most once a second, and stops as an interrupted step does once the run is
    no longer in progress: canceled, or failed by run monitoring (its process died with the
    daemon's host; a retry run writes these partitions), never writing beside that retry."""
    if not in_celery_task():
        return lambda: None
    read_at = [0.0]

    def checkpoint() -> None:
        if time.monotonic() - read_at[0] < CANCEL_READ_S:
            return
        read_at[0] = time.monotonic()
        run = context.instance.get_run_by_id(context.run.run_id)
        if run is not None and run.status != DagsterRunStatus.STARTED:
            context.log.warning(f"the run is {run.status.value.lower()}: this step stops here")
            raise DagsterExecutionInterruptedError()

    return checkpoint


def report_metadata(outcome: PartitionOutcome, table: TableSpec, run: RunInfo) -> dict:
    """The partition's numbers, plus ``changes``: what the write changed, why, by whom and with
    which code, as Markdown the UI renders (the same lines as ``backfill-assets report``)."""
    return outcome.as_metadata() | {
        "changes": MetadataValue.md(markdown([outcome.change(table, run)]))
    }


def _partial_run(
    context: AssetExecutionContext, run: RunInfo, table: TableSpec, result: RunResult
) -> Iterator[object]:
    """Report a run in which some partitions were not written, then fail its step.

    Every written partition committed alone: it is reported materialized, with its checks, so the
    UI's partition view and the backfill count it done. Refused and failed partitions report
    their checks' reasons; the step fails so that the backfill marks exactly those as failed and
    ``backfill-assets retry`` re-runs only them.
    """
    key = context.assets_def.key
    committed, failed, unattempted = result.committed, result.failed, result.unattempted
    for outcome in committed:
        yield AssetMaterialization(
            asset_key=key,
            partition=outcome.window.key,
            metadata=report_metadata(outcome, table, run),
        )
    yield from evaluations(context, committed, materialized=True)
    yield from evaluations(context, failed, materialized=False)
    lines = [
        f"{len(committed)} of {len(result.windows)} partition(s) of {table.qualified_name} were "
        "written and committed; these were not:"
    ]
    for outcome in failed:
        reason = outcome.guard.message if outcome.status == "guard_failed" else outcome.error
        lines.append(f"- {outcome.window.key} keeps its previous rows: {reason}")
    if unattempted:
        lines.append(
            f"- {', '.join(unattempted)} keep their previous rows: not attempted, {result.stopped}"
        )
    # This step's failure skips the run's downstream steps for every partition: the written
    # partitions' downstream is built by runs of its own, in the same backfill.
    try:
        follow_ups = queue_downstream_of_written(context, [o.window.key for o in committed])
    except Exception as exc:  # the failure below must still be raised, with its reasons
        follow_ups = []
        lines.append(
            f"- what is built from the written partitions was not queued ({exc}); the "
            "re-run below builds it"
        )
    for follow_up, first, last in follow_ups:
        span = first if first == last else f"{first}..{last}"
        lines.append(f"- what is built from {span} is built by run {follow_up}")
    lines.append(_how_to_rerun(run, table, [o.window.key for o in failed] + unattempted))
    raise Failure(
        description="\n".join(lines),
        metadata={
            "failed_partitions": ", ".join(o.window.key for o in failed) or "-",
            "unattempted_partitions": ", ".join(unattempted) or "-",
            "written_partitions": len(committed),
        },
    )


def _how_to_rerun(run: RunInfo, table: TableSpec, keys: list[str]) -> str:
    """What re-runs exactly the partitions a run did not write: its backfill's re-execution from
    failure, named by the backfill's id; or, for a run outside a backfill, a launch of them."""
    if run.backfill_id:
        return (
            "Fix the cause, then re-run only these partitions and what depends on them: the "
            "backfill page's menu > Re-execute from failure, or "
            f"`backfill-assets retry {run.backfill_id}`."
        )
    first, last = min(keys), max(keys)
    return (
        "Fix the cause, then launch them again: `backfill-assets launch --select "
        f"{table.asset_name} --from {first} --to {last}`."
    )

"""The rollback as a Dagster job, launchable from the UI's launchpad with config.

Restored partitions are recorded as materializations of their asset (metadata: which write was
undone), so the asset's partition history shows the rollback and downstream assets show as stale.
"""

from dagster import (
    AssetMaterialization,
    Config,
    Failure,
    JobDefinition,
    OpExecutionContext,
    Output,
    job,
    op,
)

from backfill_assets.core import rollback
from backfill_assets.core.audit import AuditTrail, RunInfo
from backfill_assets.core.params import launched_by, reason
from backfill_assets.core.registry import Registry
from backfill_assets.defs.resources import PostgresResource
from backfill_assets.defs.table_assets import asset_key


class RollbackConfig(Config):
    """Give ``backfill_id`` to undo a whole backfill, or ``table`` and ``partition`` for one
    (``table`` may stay empty when only one table is declared)."""

    backfill_id: str = ""
    table: str = ""
    partition: str = ""


def rollback_job(registry: Registry) -> JobDefinition:
    """The rollback as a job over every declared table."""

    @op(description="Restore partitions to the snapshots taken before they were overwritten.")
    def restore_snapshots(
        context: OpExecutionContext, config: RollbackConfig, postgres: PostgresResource
    ):
        yield from _restore(context, config, postgres, registry)

    @job(description="Undo a backfill (or one partition) from its snapshots; config says which.")
    def rollback_backfill():
        restore_snapshots()

    return rollback_backfill


def _restore(
    context: OpExecutionContext,
    config: RollbackConfig,
    postgres: PostgresResource,
    registry: Registry,
):
    if bool(config.backfill_id) == bool(config.partition):
        raise Failure(
            "set exactly one of backfill_id or partition in the run config (got backfill_id="
            f"{config.backfill_id!r}, partition={config.partition!r})"
        )
    run = RunInfo(
        dagster_run_id=context.run.run_id,
        backfill_id=config.backfill_id or None,
        launched_by=launched_by(context.run.tags),
        parameters=config.model_dump(),
        reason=reason(context.run.tags),
    )
    with (
        postgres.connect() as conn,
        AuditTrail(postgres.resolved_url(), warn=context.log.warning) as audit,
    ):
        try:
            refs = rollback.snapshots_to_restore(
                conn,
                registry,
                backfill_id=config.backfill_id,
                table_name=config.table or None,
                partition=config.partition,
            )
            results = rollback.restore(conn, audit, run, refs, context.log.warning)
        except (rollback.RollbackError, ValueError) as exc:
            raise Failure(str(exc)) from None
    for result in results:
        ref = result.snapshot
        context.log.info(
            f"restored {ref.table.qualified_name} {ref.partition_key} to the snapshot of write "
            f"{ref.audit_id}: {result.rows_restored} rows"
        )
        yield restored_materialization(result)
    yield Output(len(results), metadata={"partitions_restored": len(results)})


def restored_materialization(result: rollback.RollbackResult) -> AssetMaterialization:
    """A restored partition as its asset's newest materialization: what the partition holds now
    (the UI's partition view, the check results' target), whether the job or the CLI restored it."""
    ref = result.snapshot
    return AssetMaterialization(
        asset_key=asset_key(ref.table),
        partition=ref.partition_key,
        description=f"rolled back to the rows before write {ref.audit_id}",
        metadata={
            "rolled_back_write": ref.audit_id,
            "rows_restored": result.rows_restored,
            "rows_deleted": result.rows_deleted,
            "checksum_after": result.checksum_after,
            "audit_id": result.audit_id or -1,
        },
    )

"""``strategy: delete_insert`` (the default): a table the project builds from its SQL, each
partition replaced by DELETE + INSERT … SELECT in one transaction.

The write is ``partition_write.write_verified`` over ``writer.replace_partition``: the DELETE
moves the old rows into the table's snapshot table (``snapshots.kept_rows``), the INSERT reads
the SQL for the window, one statement verifies, the audit row joins the transaction. A rollback
is the same write with the snapshot as its source.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar
from uuid import UUID

import psycopg

from backfill_assets.core import contract, guards, rollback, snapshots
from backfill_assets.core.audit import AuditTrail, RunInfo
from backfill_assets.core.fingerprint import fingerprint_of
from backfill_assets.core.outcomes import CheckOutcome, SourceStats
from backfill_assets.core.params import BackfillParams
from backfill_assets.core.partition_write import write_verified
from backfill_assets.core.partitioning import PartitionWindow
from backfill_assets.core.strategies.base import (
    Declaration,
    PartitionOutcome,
    Record,
    RollbackResult,
    SnapshotRef,
    WriteHooks,
)
from backfill_assets.core.tables import TableSpec, ensure_table
from backfill_assets.core.writer import WriteResult, replace_partition


class DeleteInsert:
    name = "delete_insert"
    summary = "default: the project rebuilds the table"
    declaration_keys: ClassVar[Mapping[str, str]] = {}
    check_descriptions: ClassVar[Mapping[str, str]] = {}
    verb = "replace"
    contract_kept = "the SQL yields exactly the declared columns"
    late_data = True
    keeps_failed_writes = False
    declares_target = True

    def read_declaration(self, declared: Declaration) -> dict[str, object]:
        return {"sql_path": declared.sql_file()}

    def describe(self, table: TableSpec) -> list[str]:
        return [f"sql: {table.sql_path}"]

    def updated_tables(self, table: TableSpec) -> tuple[str, ...]:
        return ()

    def ensure_target(self, conn: psycopg.Connection, table: TableSpec) -> None:
        ensure_table(conn, table)

    def check_contract(self, conn: psycopg.Connection, table: TableSpec) -> None:
        contract.check_query(conn, table)

    def check_target_kind(self, table: TableSpec, partitioned: bool) -> None:
        contract.refuse_partitioned(table, partitioned)

    def refusal(self, table: TableSpec, window: PartitionWindow, problems: str) -> str:
        return guards.refused_replace(table, window, problems)

    def ensure_snapshots(self, conn: psycopg.Connection, table: TableSpec) -> None:
        snapshots.ensure_row_snapshots(
            conn,
            table,
            {c.name: c.type for c in table.columns},
            lambda: snapshots.row_statements(table),
        )

    def snapshot_tables(self, conn: psycopg.Connection, table: TableSpec) -> list[str]:
        return snapshots.existing_snapshot_table(conn, table)

    def expire_snapshots(self, conn: psycopg.Connection, table: TableSpec, days: int) -> int:
        return snapshots.expire_rows(conn, table, days)

    def write(
        self,
        conn: psycopg.Connection,
        audit: AuditTrail,
        run: RunInfo,
        table: TableSpec,
        window: PartitionWindow,
        params: BackfillParams,
        guarded: tuple[CheckOutcome, SourceStats],
        hooks: WriteHooks,
    ) -> PartitionOutcome:
        return write_verified(conn, audit, run, table, window, params, guarded, hooks.warn)

    def check_restorable(self, conn: psycopg.Connection, ref: SnapshotRef) -> None:
        rollback.check_kept_rows(conn, ref)

    def restore(
        self,
        conn: psycopg.Connection,
        ref: SnapshotRef,
        audit_id: int,
        write_id: UUID,
        record: Record,
    ) -> RollbackResult:
        return restore_rows(conn, ref, audit_id, write_id, record)


def restore_rows(
    conn: psycopg.Connection, ref: SnapshotRef, audit_id: int, write_id: UUID, record: Record
) -> RollbackResult:
    """Replace the partition with the rows ``ref``'s write kept, through the one write path: the
    rows replaced now are kept under the rollback's own ids, so it can be undone in turn."""
    window = ref.table.partitioning.window(ref.partition_key)
    kept_rows = snapshots.kept_rows(ref.table, audit_id, write_id)
    kept: dict[str, object] = {}

    def checksums_and_audit(connection: psycopg.Connection, write: WriteResult) -> None:
        kept["after"] = fingerprint_of(connection, ref.table, ref.table.identifier, window).checksum
        kept["before"] = fingerprint_of(
            connection, ref.table, kept_rows.relation(ref.table), window, kept_rows.params
        ).checksum
        record(
            ref,
            conn=connection,
            status="succeeded",
            rows_deleted=write.rows_deleted,
            rows_inserted=write.rows_inserted,
            rows_after=write.rows_inserted,
            checksum_before=kept["before"],
            checksum_after=kept["after"],
            snapshot_rows=write.rows_deleted,
        )

    result = replace_partition(
        conn,
        ref.table,
        window,
        source=snapshots.restore_source(ref.table),
        params={"snapshot_id": ref.audit_id, "write_id": ref.write_id},
        keep_previous=kept_rows,
        before_commit=checksums_and_audit,
    )
    return RollbackResult(
        ref,
        audit_id,
        result.rows_deleted,
        result.rows_inserted,
        checksum_before=kept["before"],
        checksum_after=kept["after"],
        snapshot_rows=result.rows_deleted,
    )


STRATEGY = DeleteInsert()

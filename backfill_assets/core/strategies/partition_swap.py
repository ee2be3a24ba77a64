"""``strategy: partition_swap``: a natively partitioned table the project builds, each
partition rebuilt aside, verified there and exchanged for the old one (DETACH/ATTACH).

The mechanics (staging table, swap, kept partitions' names) are in ``swap.py``. What this
strategy keeps of a write is the replaced child table itself, moved to ``backfill_snapshots``
under the write's id: expiry drops those tables, erasure deletes from each, and a rollback swaps
one back in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar
from uuid import UUID

import psycopg
from psycopg import sql

from backfill_assets.core import contract, guards, rollback, snapshots
from backfill_assets.core.audit import AuditTrail, RunInfo
from backfill_assets.core.fingerprint import fingerprint_of
from backfill_assets.core.outcomes import CheckOutcome, SourceStats
from backfill_assets.core.params import BackfillParams
from backfill_assets.core.partitioning import PartitionWindow
from backfill_assets.core.registry import DeclarationError
from backfill_assets.core.strategies.base import (
    Declaration,
    PartitionOutcome,
    Record,
    RollbackResult,
    SnapshotRef,
    WriteHooks,
)
from backfill_assets.core.strategies.swap import (
    build_staging,
    child_name,
    expire_kept,
    kept_name,
    kept_partitions,
    swap_in,
    swap_partition,
)
from backfill_assets.core.tables import TableSpec, ensure_table

NAME = "partition_swap"


class PartitionSwap:
    name = NAME
    summary = "natively partitioned"
    declaration_keys: ClassVar[Mapping[str, str]] = {}
    check_descriptions: ClassVar[Mapping[str, str]] = {}
    verb = "replace"
    contract_kept = "the SQL yields exactly the declared columns"
    late_data = True
    keeps_failed_writes = False
    declares_target = True

    def read_declaration(self, declared: Declaration) -> dict[str, object]:
        column = declared.partition_column
        if column not in [c.name for c in declared.columns if not c.nullable]:
            raise DeclarationError(
                f"partitions.column: {column} must be declared not null for partition_swap "
                "(a natively partitioned table has no partition for NULL)"
            )
        return {"sql_path": declared.sql_file()}

    def describe(self, table: TableSpec) -> list[str]:
        return [
            f"sql: {table.sql_path}",
            "strategy: partition_swap (natively partitioned, partitions swapped in)",
        ]

    def updated_tables(self, table: TableSpec) -> tuple[str, ...]:
        return ()

    def ensure_target(self, conn: psycopg.Connection, table: TableSpec) -> None:
        ensure_table(conn, table, partitioned=True)

    def check_contract(self, conn: psycopg.Connection, table: TableSpec) -> None:
        contract.check_query(conn, table)

    def check_target_kind(self, table: TableSpec, partitioned: bool) -> None:
        if not partitioned:
            raise contract.ContractError(
                f"table {table.qualified_name} exists and is not partitioned, but its declaration "
                f"({table.declared_in}) says strategy: partition_swap. Rename or drop the table to "
                "have it created partitioned (then backfill it), or keep strategy: delete_insert"
            )

    def refusal(self, table: TableSpec, window: PartitionWindow, problems: str) -> str:
        return guards.refused_replace(table, window, problems)

    def ensure_snapshots(self, conn: psycopg.Connection, table: TableSpec) -> None:
        # A swap keeps each replaced partition as a table of its own, moved into the schema.
        snapshots.ensure_schema(conn)

    def snapshot_tables(self, conn: psycopg.Connection, table: TableSpec) -> list[str]:
        return kept_partitions(conn, table)

    def expire_snapshots(self, conn: psycopg.Connection, table: TableSpec, days: int) -> int:
        return expire_kept(conn, table, days)

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
        return swap_partition(conn, audit, run, table, window, params, guarded, hooks.warn)

    def check_restorable(self, conn: psycopg.Connection, ref: SnapshotRef) -> None:
        check_kept_partition(conn, ref)

    def restore(
        self,
        conn: psycopg.Connection,
        ref: SnapshotRef,
        audit_id: int,
        write_id: UUID,
        record: Record,
    ) -> RollbackResult:
        return swap_back(conn, ref, audit_id, write_id, record)


def check_kept_partition(conn: psycopg.Connection, ref: SnapshotRef) -> None:
    """The partition a swap replaced is still kept, with the rows its audit row counted."""
    name = f"write {ref.audit_id} ({ref.table.qualified_name} {ref.partition_key})"
    kept = kept_name(ref.table, ref.write_id) if ref.write_id else None
    if ref.snapshot_rows == 0:
        return  # the partition's first write: rolling it back leaves the partition empty
    if kept is None or kept not in kept_partitions(conn, ref.table):
        raise rollback.RollbackError(
            f"the partition replaced by {name} is no longer kept (expired after "
            f"{ref.table.snapshot_retention_days} days, or snapshots were off)"
        )
    rows = conn.execute(
        sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(snapshots.SCHEMA, kept))
    ).fetchone()[0]
    if rows > ref.snapshot_rows:
        raise rollback.RollbackError(
            f"the kept partition of {name} holds {rows} rows, its audit row says "
            f"{ref.snapshot_rows}; nothing was restored"
        )


def swap_back(
    conn: psycopg.Connection, ref: SnapshotRef, audit_id: int, write_id: UUID, record: Record
) -> RollbackResult:
    """Undo a swap by swapping the kept partition back in; the partition it replaces is kept
    in turn (under the rollback's own id), so the rollback can be undone too."""
    table = ref.table
    window = table.partitioning.window(ref.partition_key)
    kept = kept_name(table, ref.write_id)
    child = sql.Identifier(table.schema, child_name(table, window))
    before = rollback.take_partition(conn, table, window)
    staging_name = f"{table.name[:40]}__r{window.tag}_{write_id.hex[:8]}"
    staging = sql.Identifier(table.schema, staging_name)
    if kept in kept_partitions(conn, table):
        # The kept table goes back to the table's schema under a staging name, then the swap.
        conn.execute(
            sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
                sql.Identifier(snapshots.SCHEMA, kept), sql.Identifier(table.schema)
            )
        )
        conn.execute(
            sql.SQL("ALTER TABLE {} RENAME TO {}").format(
                sql.Identifier(table.schema, kept), sql.Identifier(staging_name)
            )
        )
    else:
        # The partition's first write replaced nothing: its rollback leaves it empty.
        build_staging(conn, table, window, staging, fill=False)
    restored = fingerprint_of(conn, table, staging, window)
    had_child = bool(
        conn.execute(
            "SELECT count(*) FROM pg_inherits WHERE inhrelid = to_regclass(%s)",
            [child.as_string(conn)],
        ).fetchone()[0]
    )
    after: dict[str, object] = {}

    def checksums_and_audit() -> None:
        after["print"] = fingerprint_of(conn, table, table.identifier, window)
        record(
            ref,
            conn=conn,
            status="succeeded",
            rows_deleted=before.rows,
            rows_inserted=restored.rows,
            rows_after=after["print"].rows,
            checksum_before=before.checksum,
            checksum_after=after["print"].checksum,
            snapshot_rows=before.rows,
        )

    swap_in(
        conn,
        table,
        window,
        staging_name,
        kept_name(table, write_id),
        had_child,
        checksums_and_audit,
    )
    return RollbackResult(
        ref,
        audit_id,
        before.rows,
        restored.rows,
        checksum_before=before.checksum,
        checksum_after=after["print"].checksum,
        snapshot_rows=before.rows,
    )


STRATEGY = PartitionSwap()

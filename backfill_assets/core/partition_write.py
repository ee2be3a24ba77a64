"""A verified, audited, undoable write of one partition: guard, write, verify, snapshot, audit.

This is what a backfill does per partition; the Dagster asset only loops over its run's windows
and reports. The guards of every partition of a run run first, in two statements; a partition
refused by its guard is not touched, the run's other partitions are still written, each alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from uuid import UUID, uuid4

import psycopg
from psycopg import sql

from backfill_assets.core import snapshots
from backfill_assets.core.audit import AuditTrail, AuditUnavailable, RunInfo
from backfill_assets.core.guards import guard_all
from backfill_assets.core.outcomes import CheckOutcome, SourceStats
from backfill_assets.core.params import BackfillParams
from backfill_assets.core.partitioning import PartitionWindow
from backfill_assets.core.reconcile import Verification, verify
from backfill_assets.core.strategies.base import PartitionOutcome
from backfill_assets.core.table_keys import KeysHeldElsewhere
from backfill_assets.core.tables import TableSpec
from backfill_assets.core.writer import KeptRows, WriteResult, replace_partition, with_lock_retries

STRATEGY = "delete_insert"
ROLLED_BACK = "the write was rolled back: nothing changed in the partition, it keeps its rows"


class VerificationFailed(Exception):
    """A blocking check failed inside the transaction; raising it rolls the partition back."""

    def __init__(self, verification: Verification) -> None:
        self.verification = verification
        super().__init__(
            f"blocking check(s) failed, partition rolled back: {verification.failure_details()}"
        )


def run_guards(
    conn: psycopg.Connection,
    table: TableSpec,
    windows: list[PartitionWindow],
    params: BackfillParams,
) -> dict[str, tuple[CheckOutcome, SourceStats]]:
    """Every window's guard, in two statements (``guards.guard_all``), before the first write."""
    return guard_all(conn, table, windows, params)


def record_write(audit: AuditTrail, run: RunInfo, table: TableSpec, window, **fields) -> int | None:
    return audit.record(
        run,
        asset_key=table.asset_name,
        table=table.qualified_name,
        partition=window.key,
        strategy=table.strategy,
        sql_hash=table.sql_hash,
        **fields,
    )


def record_refusal(
    audit: AuditTrail, run: RunInfo, table: TableSpec, window, outcome
) -> int | None:
    return record_write(
        audit,
        run,
        table,
        window,
        status="guard_failed",
        started_at=datetime.now(UTC),
        rows_before=outcome.metadata.get("target_rows_before"),
        error=outcome.message,
        effect="the guard refused the partition before it was touched: it keeps its rows",
    )


@dataclass
class VerifiedWrite:
    """What every strategy that replaces a partition whole shares around its own write: the
    verification that raises to roll it back, the audit row that joins its transaction, and the
    failure recorded after a rollback. ``write_verified`` (DELETE-INSERT) and
    ``strategies/swap.swap_partition`` (a rebuilt child attached in place of the old one) differ
    only in how the rows are put there."""

    conn: psycopg.Connection
    audit: AuditTrail
    run: RunInfo
    table: TableSpec
    window: PartitionWindow
    params: BackfillParams
    guard: CheckOutcome
    stats: SourceStats
    keeps_snapshot: bool
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    audit_id: int = 0
    write_id: UUID = field(default_factory=uuid4)
    verification: Verification | None = None

    @classmethod
    def start(cls, conn, audit, run, table, window, params, guarded, *, keeps_snapshot: bool):
        guard, stats = guarded
        write = cls(conn, audit, run, table, window, params, guard, stats, keeps_snapshot)
        write.audit_id = audit.reserve_id(conn)
        return write

    @property
    def rows_before(self) -> int | None:
        return self.guard.metadata.get("target_rows_before")

    def verify(
        self,
        conn: psycopg.Connection,
        previous: sql.Composable,
        current: sql.Composable | None = None,
        bound: Mapping[str, object] | None = None,
    ) -> Verification:
        """Every after-write check on the uncommitted partition; a blocking failure raises
        ``VerificationFailed``, rolling the write back."""
        verification = verify(
            conn, self.table, self.window, self.stats, self.params, previous, current, bound
        )
        self.verification = verification
        if verification.failed_blocking:
            raise VerificationFailed(verification)
        return verification

    def record_success(self, conn: psycopg.Connection, deleted: int, inserted: int) -> None:
        """The audit row, inside the write's transaction (it commits with the write or not)."""
        verification = self.verification
        assert verification is not None, "verify before recording"
        record_write(
            self.audit,
            self.run,
            self.table,
            self.window,
            conn=conn,
            audit_id=self.audit_id,
            write_id=self.write_id,
            status="succeeded",
            started_at=self.started_at,
            rows_before=self.rows_before,
            rows_deleted=deleted,
            rows_inserted=inserted,
            rows_after=verification.after.rows,
            checksum_before=verification.before.checksum,
            checksum_after=verification.after.checksum,
            snapshot_rows=deleted if self.keeps_snapshot else None,
            changes=json.dumps(verification.changes()),
        )

    def _record_failure(self, error: str) -> None:
        record_write(
            self.audit,
            self.run,
            self.table,
            self.window,
            audit_id=self.audit_id,
            status="failed",
            started_at=self.started_at,
            rows_before=self.rows_before,
            checksum_before=self.verification.before.checksum if self.verification else None,
            error=error,
            effect=ROLLED_BACK,
        )

    def outcome(
        self, write: Callable[[], WriteResult], expected: tuple[type[BaseException], ...] = ()
    ) -> PartitionOutcome:
        """Run ``write`` (one transaction, rolled back on any failure) and say how it went; a
        failure is recorded after the rollback, through the audit's own connection."""
        try:
            result = write()
        except (
            VerificationFailed,
            KeysHeldElsewhere,
            AuditUnavailable,
            psycopg.Error,
            *expected,
        ) as exc:
            error = explained(exc, self.table)
            self._record_failure(error)
            found = (
                exc.found
                if isinstance(exc, KeysHeldElsewhere)
                else self.verification and self.verification.elsewhere
            )
            return PartitionOutcome(
                self.window,
                "failed",
                self.guard,
                verification=self.verification,
                audit_id=self.audit_id,
                error=error,
                held_by=found.partitions if found else (),
            )
        except BaseException as exc:
            # Interrupted (run terminated, Ctrl-C) or a bug: the partition rolled back; say so.
            self._record_failure(f"write not applied: {exc!r}")
            raise
        return PartitionOutcome(
            self.window,
            "succeeded",
            self.guard,
            write=result,
            verification=self.verification,
            snapshot_rows=result.rows_deleted if self.keeps_snapshot else None,
            audit_id=self.audit_id,
        )


def write_verified(
    conn: psycopg.Connection,
    audit: AuditTrail,
    run: RunInfo,
    table: TableSpec,
    window: PartitionWindow,
    params: BackfillParams,
    guarded: tuple[CheckOutcome, SourceStats],
    log: Callable[[str], None] | None = None,
) -> PartitionOutcome:
    """Replace one partition; snapshot, verify and audit it inside its transaction.

    One transaction per partition and no other commit: the DELETE fills the snapshot, one
    statement verifies, and the audit row joins the transaction as it commits.
    """
    job = VerifiedWrite.start(
        conn, audit, run, table, window, params, guarded, keeps_snapshot=params.snapshots
    )
    kept = (
        snapshots.kept_rows(table, job.audit_id, job.write_id) if params.snapshots else KeptRows()
    )

    def verify_and_record(connection: psycopg.Connection, write: WriteResult) -> None:
        job.verify(connection, kept.relation(table), bound=kept.params)
        job.record_success(connection, write.rows_deleted, write.rows_inserted)

    return job.outcome(
        lambda: with_lock_retries(
            lambda: replace_partition(
                conn, table, window, keep_previous=kept, before_commit=verify_and_record
            ),
            table,
            window.key,
            log,
        )
    )


def explained(exc: BaseException, table: TableSpec) -> str:
    """The error of a failed write, with what to change for the table's own limits."""
    error = str(exc).strip()
    where = f"timeouts in {table.declared_in}" if table.declared_in else "the table's timeouts"
    if isinstance(exc, psycopg.errors.LockNotAvailable):
        return (
            f"{error}: a lock was not granted within {table.timeouts.lock_ms} ms, "
            f"{table.timeouts.lock_retries + 1} times; find the session holding it in pg_locks, "
            f"or raise lock / lock_retries ({where})"
        )
    if isinstance(exc, psycopg.errors.QueryCanceled) and "statement timeout" in error:
        return (
            f"{error} (a statement ran over {table.timeouts.statement_ms} ms; raise statement "
            f"in {where} for partitions this big)"
        )
    return error

"""A verified, audited, undoable write of one partition: guard, write, verify, snapshot, audit.

This is what a backfill does per partition; the Dagster asset only loops over its run's windows
and reports. The guard runs for every partition of a run before the first write, so a bad source
anywhere in the run leaves the whole run's data untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from backfill_assets.core import snapshots
from backfill_assets.core.audit import AuditTrail, RunInfo
from backfill_assets.core.guards import SourceStats, guard
from backfill_assets.core.outcomes import CheckOutcome
from backfill_assets.core.params import BackfillParams
from backfill_assets.core.partitioning import PartitionWindow
from backfill_assets.core.reconcile import Verification, verify
from backfill_assets.core.tables import TableSpec
from backfill_assets.core.writer import WriteResult, replace_partition

STRATEGY = "delete_insert"


class VerificationFailed(Exception):
    """A blocking check failed inside the transaction; raising it rolls the partition back."""

    def __init__(self, verification: Verification) -> None:
        self.verification = verification
        failed = verification.failed_blocking
        details = "; ".join(f"{n}: {verification.outcomes[n].message}" for n in failed)
        super().__init__(f"blocking check(s) failed, partition rolled back: {details}")


@dataclass(frozen=True)
class PartitionOutcome:
    window: PartitionWindow
    status: str
    """succeeded | failed | guard_failed"""
    guard: CheckOutcome
    write: WriteResult | None = None
    verification: Verification | None = None
    snapshot_rows: int | None = None
    audit_id: int | None = None
    error: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    def check_outcomes(self) -> dict[str, CheckOutcome]:
        after = self.verification.outcomes if self.verification else {}
        return {"source_guard": self.guard, **after}

    def as_metadata(self) -> dict[str, object]:
        metadata: dict[str, object] = dict(self.write.as_metadata()) if self.write else {}
        if self.verification:
            metadata |= {
                "rows_before": self.verification.before.rows,
                "rows_after": self.verification.after.rows,
                "checksum_before": self.verification.before.checksum,
                "checksum_after": self.verification.after.checksum,
                **self.verification.diff.as_metadata(),
            }
        if self.audit_id is not None:
            metadata["audit_id"] = self.audit_id
        if self.snapshot_rows is not None:
            metadata["snapshot_rows"] = self.snapshot_rows
        return metadata


def run_guards(
    conn: psycopg.Connection,
    table: TableSpec,
    windows: list[PartitionWindow],
    params: BackfillParams,
) -> dict[str, tuple[CheckOutcome, SourceStats]]:
    return {window.key: guard(conn, table, window, params) for window in windows}


def _start_audit(audit: AuditTrail, run: RunInfo, table: TableSpec, window, guarded) -> int | None:
    return audit.start(
        run,
        asset_key=table.asset_name,
        table=table.qualified_name,
        partition=window.key,
        strategy=STRATEGY,
        sql_hash=table.sql_hash,
        rows_before=guarded.metadata.get("target_rows_before"),
    )


def record_refusal(
    audit: AuditTrail, run: RunInfo, table: TableSpec, window, outcome
) -> int | None:
    audit_id = _start_audit(audit, run, table, window, outcome)
    audit.finish(audit_id, "guard_failed", error=outcome.message)
    return audit_id


def write_verified(
    conn: psycopg.Connection,
    audit: AuditTrail,
    run: RunInfo,
    table: TableSpec,
    window: PartitionWindow,
    params: BackfillParams,
    guarded: tuple[CheckOutcome, SourceStats],
) -> PartitionOutcome:
    """Replace one partition; verify and snapshot it inside the transaction; audit it outside."""
    guard_outcome, stats = guarded
    audit_id = _start_audit(audit, run, table, window, guard_outcome)
    found: dict[str, object] = {}

    def verify_then_snapshot(connection: psycopg.Connection) -> None:
        verification = verify(connection, table, window, stats, params)
        found["verification"] = verification
        if verification.failed_blocking:
            raise VerificationFailed(verification)
        if params.snapshots and audit_id is not None:
            found["snapshot_rows"] = snapshots.store(connection, table, audit_id)

    try:
        result = replace_partition(
            conn, table, window, keep_previous=True, before_commit=verify_then_snapshot
        )
    except (VerificationFailed, psycopg.Error) as exc:
        verification = found.get("verification")
        error = str(exc).strip()
        audit.finish(
            audit_id,
            "failed",
            error=error,
            checksum_before=verification.before.checksum if verification else None,
        )
        return PartitionOutcome(
            window,
            "failed",
            guard_outcome,
            verification=verification,
            audit_id=audit_id,
            error=error,
        )
    except BaseException as exc:
        # Interrupted (run terminated, Ctrl-C) or a bug: the partition rolled back, and its audit
        # row must not stay 'running'.
        audit.finish(audit_id, "failed", error=f"write not applied: {exc!r}")
        raise
    verification = found["verification"]
    snapshot_rows = found.get("snapshot_rows")
    audit.finish(
        audit_id,
        "succeeded",
        rows_deleted=result.rows_deleted,
        rows_inserted=result.rows_inserted,
        rows_after=verification.after.rows,
        checksum_before=verification.before.checksum,
        checksum_after=verification.after.checksum,
        snapshot_rows=snapshot_rows,
    )
    return PartitionOutcome(
        window,
        "succeeded",
        guard_outcome,
        write=result,
        verification=verification,
        snapshot_rows=snapshot_rows,
        audit_id=audit_id,
    )

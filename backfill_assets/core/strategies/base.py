"""The one interface every write strategy implements, and the values that cross it.

A table's ``strategy:`` (``delete_insert``, ``partition_swap``, ``batched_update``, ...) decides
more than how a window's rows are written: what the target is (a table the project creates, a
natively partitioned one, the application's own table), what its SQL must yield, where the rows
it replaces are kept and for how long, how a write is undone, what an erasure must purge, what
the guard and the checks say. Each of those is a member of ``Strategy`` below, and each strategy
is one module under ``core/strategies/`` implementing all of them; ``core/strategies/__init__.py``
maps a declaration's name to its module. Everything else (the run in ``core/run.py``, the
contract, the guards, snapshots, rollback, erasure, the Dagster layer, the CLI) asks the table's
strategy and never tests which one it has: a new strategy is its module, its tests and docs, and
one line in that mapping.

This module imports nothing that asks for a strategy (those modules import it), so that the
interface, the outcome of a write and a rollback's references have one home below all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from uuid import UUID

import psycopg

from backfill_assets.core.audit import AuditTrail, RunInfo, code_version
from backfill_assets.core.change_report import PartitionChange
from backfill_assets.core.outcomes import CheckOutcome, SourceStats
from backfill_assets.core.params import BackfillParams
from backfill_assets.core.partitioning import PartitionWindow
from backfill_assets.core.reconcile import Verification
from backfill_assets.core.tables import Column, TableSpec
from backfill_assets.core.writer import WriteResult


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
    halt: bool = False
    """The run's remaining partitions should not be attempted (the throttle gave up)."""
    resumed_after: int = 0
    """Batches of an interrupted in-place write this one resumed after."""
    held_back_s: float = 0.0
    """Seconds the write waited inside itself for a pause or the throttle (between batches)."""
    committed: bool = False
    """Its changes are committed whatever its checks said (an in-place update's batches); a
    failed one does not hold its previous rows any more."""
    held_by: tuple[str, ...] = ()
    """Refused because these partitions hold keys of its new rows (``core/table_keys.py``):
    writing them first lets it pass."""

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    def check_outcomes(self) -> dict[str, CheckOutcome]:
        after = self.verification.outcomes if self.verification else {}
        return {"source_guard": self.guard, **after}

    def change(self, table: TableSpec, run: RunInfo) -> PartitionChange:
        """What this write changed, as the backfill report shows it (the audit row's numbers)."""
        verification = self.verification
        return PartitionChange.of(
            {
                "table_name": table.qualified_name,
                "partition_key": self.window.key,
                "status": self.status,
                "rows_before": verification.before.rows if verification else None,
                "rows_after": verification.after.rows if verification else None,
                "changes": verification.changes() if verification and self.succeeded else None,
                "reason": run.reason,
                "launched_by": run.launched_by,
                "sql_hash": table.sql_hash,
                "code_version": code_version(),
                "error": self.error,
            }
        )

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
        if self.resumed_after:
            metadata["resumed_after_batches"] = self.resumed_after
        if self.held_back_s:
            metadata["held_back_s"] = round(self.held_back_s, 1)
        return metadata


@dataclass(frozen=True)
class SnapshotRef:
    audit_id: int
    table: TableSpec
    partition_key: str
    snapshot_rows: int
    write_id: UUID | None = None
    """The write's random id (None for writes recorded before write ids existed)."""


@dataclass(frozen=True)
class RollbackResult:
    snapshot: SnapshotRef
    audit_id: int | None
    rows_deleted: int
    rows_restored: int
    checksum_before: str
    checksum_after: str
    snapshot_rows: int | None


@dataclass(frozen=True)
class WriteHooks:
    """What a write may call back into its driver for: its log lines (``info`` for progress,
    ``warn`` for retries and trouble) and ``hold_back``, the pause switch and the throttle. The
    run calls ``hold_back`` before every partition; a strategy whose partition is many
    transactions (``batched_update``) calls it between them too, so a pause or a stressed
    database stops it at the next boundary rather than after the partition."""

    info: Callable[[str], object]
    warn: Callable[[str], object]
    hold_back: Callable[[], None] = lambda: None


Record = Callable[..., "int | None"]
"""A rollback's audit row for one partition: ``record(ref, conn=..., status=..., rows_...)``, the
columns of ``AuditTrail.record``; given ``conn``, the row joins that connection's transaction."""


class Declaration(Protocol):
    """One table's YAML document as a strategy reads its own fields from it (``core/registry.py``
    builds it; a mistake is a ``registry.DeclarationError`` naming the field)."""

    path: Path
    doc: Mapping
    columns: tuple[Column, ...]
    partition_column: str
    unique_key: tuple[str, ...]

    def known_columns(self, field: str, names: list[str]) -> tuple[str, ...]:
        """``names``, refused unless each is a declared column."""

    def sql_file(self) -> Path:
        """The table's SQL file (``sql:``, default the YAML's name with ``.sql``), refused when
        missing."""

    def mapping(self, value: object, field: str, allowed: Container[str]) -> Mapping:
        """``value`` as a mapping with only ``allowed`` keys; ``field`` names it in messages."""

    def required(self, doc: Mapping, key: str) -> object:
        """``doc[key]``, refused when missing or empty."""

    def flag(self, doc: Mapping, key: str, default: bool) -> bool:
        """``doc[key]`` as true or false."""

    def duration(
        self, doc: Mapping, key: str, default_ms: int, low_ms: int, high_ms: int, block: str
    ) -> int:
        """``doc[key]`` (``250ms``, ``5s``, ``2min``, ``1h``) in milliseconds, within bounds."""

    def is_name(self, text: str) -> bool:
        """``text`` is a plain SQL name."""


class Strategy(Protocol):
    """How one kind of table is written, kept, checked and undone.

    Implement every member in one module under ``core/strategies/`` that ends with
    ``STRATEGY = YourStrategy()``, and add its name to ``MODULES`` in
    ``core/strategies/__init__.py``. The guarantees every strategy keeps, whatever its SQL:

    - **One window, one transaction** (or, like ``batched_update``, many short ones that resume):
      a failure leaves the window's old rows or its new rows, never a mix. Take
      ``writer.lock_partition`` first (two writers of one window take turns), then
      ``writer.apply_timeouts``; retry a lock timeout with ``writer.with_lock_retries``.
    - **Verified before it commits**: the guard ran before the run's first write (its verdict
      and the source's numbers are ``guarded``); the after-write checks run inside the write's
      transaction (``partition_write.VerifiedWrite.verify`` with the relation that holds the
      replaced rows; ``reconcile.verify`` computes the six checks in one statement), and a
      blocking failure rolls the write back.
    - **Keeps what it replaces**: exactly the rows (or values) it changed or removed, tagged with
      the write's audit id and random write id, in ``backfill_snapshots`` (``snapshots.SCHEMA``),
      inside the write's transaction.
    - **Audited inside the transaction**: the audit row (``strategy`` = ``name``) commits with
      the write; a failure is recorded after the rollback (``VerifiedWrite.outcome`` does both).
    - **Undoable**: ``restore`` puts a write's kept rows back in one transaction with the other
      partitions of the rollback, keeps what it replaces in turn and is audited.
    - **Erasable**: ``snapshot_tables`` names every relation that may hold a person's old rows.

    Identifiers go through ``psycopg.sql.Identifier``, values are bound parameters; messages
    name the table, the partition and what to do next.
    """

    name: str
    """The declaration's ``strategy:`` value and the audit rows' ``strategy``."""
    summary: str
    """A few words for the declaration's help text (``strategy: NAME (summary)``)."""
    declaration_keys: Mapping[str, str]
    """Top-level declaration keys of this strategy's own (``batched_update:``), with their help
    text; declaring one under another strategy is refused."""
    check_descriptions: Mapping[str, str]
    """What a check means for this strategy where it differs from ``defs/checks.CHECKS``."""
    verb: str
    """What a write does to a partition, in guard messages: ``replace``, ``update``."""
    contract_kept: str
    """``backfill-assets tables``' line for a table whose contract holds."""
    late_data: bool
    """Whether a late-data sensor watches the table's sources (its rows come from a query over
    other tables), to re-write a partition whose source rows arrived after it was written."""
    keeps_failed_writes: bool
    """A write that failed its checks may still have committed changes (and kept their old
    values), so a rollback can restore it: only for writes that commit before verifying."""
    declares_target: bool
    """The declaration is the whole definition of the target's columns (types, NOT NULL,
    CHECKs), so an existing target must match it in full; otherwise (an application's table
    filled in place, whose NOT NULL comes after the fill) only the types are compared."""

    def read_declaration(self, declared: Declaration) -> dict[str, object]:
        """Read and validate this strategy's own fields; returns ``TableSpec`` fields
        (``sql_path``, ``batched_update``)."""

    def describe(self, table: TableSpec) -> list[str]:
        """Lines ``backfill-assets tables`` prints about how the table is written."""

    def updated_tables(self, table: TableSpec) -> tuple[str, ...]:
        """Existing tables whose rows the strategy changes (they need SELECT and UPDATE); a
        strategy that creates its target needs CREATE only."""

    def ensure_target(self, conn: psycopg.Connection, table: TableSpec) -> None:
        """Create the target if the strategy creates it; no DDL (no lock) when it exists."""

    def check_contract(self, conn: psycopg.Connection, table: TableSpec) -> None:
        """Raise ``contract.ContractError`` when the table's SQL (or expressions) cannot yield
        the declared columns, ``contract.SourceNotReady`` when what it reads does not exist;
        described by PostgreSQL, no row read."""

    def check_target_kind(self, table: TableSpec, partitioned: bool) -> None:
        """Raise ``contract.ContractError`` when an existing target is of the wrong kind
        (natively ``partitioned`` or not)."""

    def refusal(self, table: TableSpec, window: PartitionWindow, problems: str) -> str:
        """The guard's message when it refuses the window: the problems, that nothing was
        changed, and what to fix."""

    def ensure_snapshots(self, conn: psycopg.Connection, table: TableSpec) -> None:
        """Create where the table's replaced rows are kept, or add columns it lacks."""

    def snapshot_tables(self, conn: psycopg.Connection, table: TableSpec) -> list[str]:
        """Names, in ``backfill_snapshots``, of the existing relations holding the table's kept
        rows (an erasure purges them)."""

    def expire_snapshots(self, conn: psycopg.Connection, table: TableSpec, days: int) -> int:
        """Drop what was kept by writes older than ``days``; returns the rows dropped."""

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
        """Write one window the guard passed: lock, write, verify, keep, audit, commit; a
        failure is an outcome (``failed``, with its error), not an exception, so the run's other
        windows go on. Interruptions (``BaseException``) are recorded and re-raised."""

    def check_restorable(self, conn: psycopg.Connection, ref: SnapshotRef) -> None:
        """Raise ``rollback.RollbackError`` when the write's kept rows are gone or not only its
        own; checked for every partition before the rollback's transaction starts."""

    def restore(
        self,
        conn: psycopg.Connection,
        ref: SnapshotRef,
        audit_id: int,
        write_id: UUID,
        record: Record,
    ) -> RollbackResult:
        """Put the partition back to what ``ref``'s write replaced, inside the rollback's open
        transaction (under ``writer.lock_partition`` and the table's timeouts), keeping what it
        replaces under ``audit_id``/``write_id`` and recording it with ``record(ref, conn=conn,
        ...)``."""

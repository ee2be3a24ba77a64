"""Rollback: put partitions back to the snapshot taken before a write, and audit it.

A rollback is a write like any other: the table's strategy puts the kept rows back its own way
(``Strategy.restore``: ``delete_insert`` through ``writer.replace_partition`` with the snapshot
as its source), keeps a snapshot of what it replaces (so a rollback can itself be undone) and
records its own audit row (strategy ``rollback``, ``restored_from`` = the write it undoes). This
module finds what to restore, checks it, and runs every partition in one transaction: either
every partition is restored or none.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from itertools import groupby
from uuid import uuid4

import psycopg
from psycopg import sql

from backfill_assets.core import snapshots
from backfill_assets.core.audit import TABLE as AUDIT_TABLE
from backfill_assets.core.audit import AuditTrail, AuditUnavailable, RunInfo
from backfill_assets.core.control import hold_back
from backfill_assets.core.fingerprint import Fingerprint, fingerprint_of
from backfill_assets.core.partition_write import explained
from backfill_assets.core.partitioning import PartitionWindow
from backfill_assets.core.registry import Registry
from backfill_assets.core.strategies import (
    RollbackResult,
    SnapshotRef,
    all_strategies,
    strategy_of,
)
from backfill_assets.core.table_keys import KeysHeldElsewhere, keys_elsewhere
from backfill_assets.core.tables import TableSpec
from backfill_assets.core.throttle import ThrottleTimeout
from backfill_assets.core.writer import apply_timeouts, lock_partition, with_lock_retries

STRATEGY = "rollback"
NOT_APPLIED = "the rollback was rolled back: nothing changed, every partition keeps its rows"


def kept_write() -> sql.Composed:
    """Audit rows of writes whose rows a rollback can restore: succeeded ones, and those of
    strategies that commit before verifying (``keeps_failed_writes``: an in-place update's
    batches) that kept a snapshot even though a check failed."""
    names = [s.name for s in all_strategies() if s.keeps_failed_writes]
    if not names:
        return sql.SQL("(status = 'succeeded')")
    return sql.SQL(
        "(status = 'succeeded' OR (strategy IN ({}) AND snapshot_rows IS NOT NULL))"
    ).format(sql.SQL(", ").join(sql.Literal(name) for name in names))


class RollbackError(RuntimeError):
    """The rollback cannot be done as asked; nothing was changed."""


def snapshots_of_backfill(
    conn: psycopg.Connection, registry: Registry, backfill_id: str
) -> list[SnapshotRef]:
    """For each partition the backfill wrote, its first write's snapshot: the pre-backfill rows."""
    rows = conn.execute(
        sql.SQL(
            "SELECT DISTINCT ON (table_name, partition_key) id, table_name, partition_key, "
            "snapshot_rows, write_id FROM {} WHERE backfill_id = %s "
            "AND strategy <> 'rollback' AND {} ORDER BY table_name, partition_key, id"
        ).format(AUDIT_TABLE, kept_write()),
        [backfill_id],
    ).fetchall()
    if not rows:
        raise RollbackError(
            f"backfill {backfill_id!r} wrote no partition (no succeeded rows in "
            "backfill_audit.backfill_runs); check the id with `backfill-assets audit`"
        )
    _refuse_newer_writes(conn, backfill_id)
    return [_ref(registry, *row) for row in rows]


def _refuse_newer_writes(conn: psycopg.Connection, backfill_id: str) -> None:
    """A partition written again after the backfill (by another backfill, a run, a rollback)
    would lose that newer write if its pre-backfill rows came back: refuse, naming it, so newer
    writes are undone first (newest first), or kept.

    Each partition's audit rows from the backfill's first write on are replayed: a write makes
    the partition hold its rows, a rollback gives back what it held before the write it undid.
    The rollback goes ahead only where the partition still holds the backfill's rows; one
    already rolled back is refused too.
    """
    rows = conn.execute(
        sql.SQL(
            "WITH ours AS (SELECT table_name, partition_key, min(id) AS first_id FROM {audit} "
            "WHERE backfill_id = %(id)s AND strategy <> 'rollback' AND {kept} GROUP BY 1, 2) "
            "SELECT table_name, partition_key, n.id, n.strategy, n.restored_from, "
            "coalesce(n.backfill_id = %(id)s AND n.strategy <> 'rollback', false), "
            "coalesce(n.backfill_id, 'run ' || n.dagster_run_id, 'the CLI') "
            "FROM ours JOIN {audit} n USING (table_name, partition_key) "
            "WHERE n.id >= ours.first_id AND {kept} ORDER BY table_name, partition_key, n.id"
        ).format(audit=AUDIT_TABLE, kept=kept_write()),  # ours has none of its columns
        {"id": backfill_id},
    ).fetchall()
    problems = []
    for (table, partition), history in groupby(rows, key=lambda row: row[:2]):
        held_before: dict[int, int | None] = {}
        holder: int | None = None  # None: the rows from before the backfill (or unknown)
        ours: set[int] = set()
        for _, _, audit_id, kind, restored_from, is_ours, by in history:
            held_before[audit_id] = holder
            holder = held_before.get(restored_from) if kind == STRATEGY else audit_id
            if is_ours:
                ours.add(audit_id)
            last = f"write {audit_id} ({kind}) by {by}"
        if holder not in ours:
            problems.append(f"- {table} {partition}: {last}")
    if not problems:
        return
    more = f"\n- and {len(problems) - 10} more" if len(problems) > 10 else ""
    raise RollbackError(
        f"backfill {backfill_id!r} no longer holds {len(problems)} of its partition(s): they "
        "were written or rolled back since, and restoring its pre-backfill rows would undo "
        "that:\n"
        + "\n".join(problems[:10])
        + more
        + "\nNothing was restored. Roll the newer writes back first (newest first: "
        "`backfill-assets rollback --backfill ID`, or `--partition DAY --table T` for one "
        "partition), then this one; a backfill already rolled back needs nothing more."
    )


def snapshot_of_partition(
    conn: psycopg.Connection, table: TableSpec, partition_key: str
) -> SnapshotRef:
    """The snapshot taken by the latest write of the partition: its rows before that write."""
    table.partitioning.window(partition_key)
    row = conn.execute(
        sql.SQL(
            "SELECT id, table_name, partition_key, snapshot_rows, write_id FROM {} "
            "WHERE table_name = %s AND partition_key = %s AND {} ORDER BY id DESC LIMIT 1"
        ).format(AUDIT_TABLE, kept_write()),
        [table.qualified_name, partition_key],
    ).fetchone()
    if row is None:
        raise RollbackError(f"{table.qualified_name} {partition_key} has no recorded write")
    return SnapshotRef(row[0], table, row[2], _snapshot_rows(*row[:4]), row[4])


def snapshots_to_restore(
    conn: psycopg.Connection,
    registry: Registry,
    *,
    backfill_id: str | None,
    table_name: str | None,
    partition: str | None,
) -> list[SnapshotRef]:
    """What to restore: every partition of ``backfill_id``, else the one ``partition`` of
    ``table_name`` (which may be left out when only one table is declared)."""
    if backfill_id:
        return snapshots_of_backfill(conn, registry, backfill_id)
    if not partition:
        raise RollbackError("name a backfill id or a partition to roll back")
    return [snapshot_of_partition(conn, registry.table(table_name), partition)]


def _snapshot_rows(audit_id: int, table_name: str, partition_key: str, rows: int | None) -> int:
    if rows is None:
        raise RollbackError(
            f"write {audit_id} of {table_name} {partition_key} kept no snapshot (snapshots were "
            "off); it cannot be rolled back"
        )
    return rows


def _ref(registry: Registry, audit_id: int, table_name: str, partition_key: str, rows, write_id):
    try:
        table = registry.table(table_name)
    except ValueError as exc:
        raise RollbackError(f"write {audit_id} cannot be rolled back: {exc}") from None
    return SnapshotRef(
        audit_id,
        table,
        partition_key,
        _snapshot_rows(audit_id, table_name, partition_key, rows),
        write_id,
    )


def check_kept_rows(conn: psycopg.Connection, ref: SnapshotRef) -> None:
    """``Strategy.check_restorable`` of the strategies that keep rows in the table's snapshot
    table: the snapshot is there and is only this write's: every row under the write's ids lies
    inside the partition's window, and there are no more of them than the audit row says the
    write kept (fewer is expected after an erasure purged a person's rows)."""
    window = ref.table.partitioning.window(ref.partition_key)
    tagged, inside = conn.execute(
        sql.SQL("SELECT count(*), count(*) FILTER (WHERE {}) FROM {} WHERE {}").format(
            ref.table.window_filter(), snapshots.snapshot_table(ref.table), snapshots.OF_WRITE
        ),
        {**window.as_params(), "snapshot_id": ref.audit_id, "write_id": ref.write_id},
    ).fetchone()
    name = f"write {ref.audit_id} ({ref.table.qualified_name} {ref.partition_key})"
    if ref.snapshot_rows and not tagged:
        raise RollbackError(
            f"the snapshot of {name} has expired "
            f"(retention {ref.table.snapshot_retention_days} days)"
        )
    if inside != tagged or tagged > ref.snapshot_rows:
        raise RollbackError(
            f"the snapshot of {name} does not match its audit row: the audit says it kept "
            f"{ref.snapshot_rows} rows, the snapshot table holds {tagged} under that write "
            f"({inside} inside the partition). Was the audit table recreated? Nothing was "
            "restored; compare backfill_audit.backfill_runs with backfill_snapshots by write_id."
        )


def restore(
    conn: psycopg.Connection,
    audit: AuditTrail,
    run: RunInfo,
    refs: list[SnapshotRef],
    log: Callable[[str], object] | None = None,
) -> list[RollbackResult]:
    """Restore every partition in ``refs`` to its snapshot, all in one transaction.

    Like a write, each restored partition's audit row is inserted complete inside that
    transaction: it commits with the restore or not at all (a killed rollback leaves no row
    claiming anything), and a refused audit insert rolls the restore back.
    """
    for ref in refs:
        strategy_of(ref.table).check_restorable(conn, ref)
    ids = {ref.audit_id: (audit.reserve_id(conn), uuid4()) for ref in refs}
    started_at = datetime.now(UTC)

    def record(ref: SnapshotRef, **fields: object) -> int | None:
        audit_id, write_id = ids[ref.audit_id]
        return audit.record(
            run,
            asset_key=ref.table.asset_name,
            table=ref.table.qualified_name,
            partition=ref.partition_key,
            strategy=STRATEGY,
            sql_hash=ref.table.sql_hash,
            started_at=started_at,
            audit_id=audit_id,
            write_id=write_id,
            restored_from=ref.audit_id,
            **fields,
        )

    def restore_all() -> list[RollbackResult]:
        # Like a write, before the transaction and before each retry: each restored table's
        # throttle, then the pause switch of the backfill undone (or --all).
        tables = {ref.table.qualified_name: ref.table for ref in refs}.values()
        hold_back(conn, tables, [run.backfill_id], log or (lambda _line: None))
        with conn.transaction():
            results = [
                strategy_of(ref.table).restore(conn, ref, *ids[ref.audit_id], record)
                for ref in refs
            ]
            for ref in refs:  # once all are back: a key the rollback restores held elsewhere
                refuse_keys_held_elsewhere(conn, ref)
            return results

    try:
        # A lock not granted within the table's timeout: the whole rollback is tried again.
        first = refs[0].table
        results = with_lock_retries(restore_all, first, refs[0].partition_key, log)
    except (
        psycopg.Error,
        AuditUnavailable,
        KeysHeldElsewhere,
        RollbackError,
        ThrottleTimeout,
    ) as exc:
        error = explained(exc, first)
        for ref in refs:
            record(
                ref,
                status="failed",
                error=f"rollback not applied: {error}".strip(),
                effect=NOT_APPLIED,
            )
        raise RollbackError(f"rollback failed and changed nothing: {error}") from exc
    except BaseException as exc:
        # Interrupted (a terminated run, Ctrl-C): the transaction rolled back; say so, go on.
        for ref in refs:
            record(ref, status="failed", error=f"rollback not applied: {exc!r}", effect=NOT_APPLIED)
        raise
    return results


def refuse_keys_held_elsewhere(conn: psycopg.Connection, ref: SnapshotRef) -> None:
    """Raise ``RollbackError`` when the partition, as restored, holds keys that another
    partition holds now (the source moved them after the write being undone)."""
    window = ref.table.partitioning.window(ref.partition_key)
    found = keys_elsewhere(conn, ref.table, window)
    if found:
        held = found.holders
        raise RollbackError(
            f"rolling back {ref.table.qualified_name} {ref.partition_key} would put back "
            f"{found.count} value(s) of ({', '.join(ref.table.unique_key)}) that {held} "
            f"hold(s) now (e.g. {', '.join(found.keys)}): the source moved them there after the "
            f"write being undone. Nothing was restored. Roll {held} back in the same rollback "
            f"(the whole backfill), or backfill {ref.partition_key} again instead"
        )


def take_partition(
    conn: psycopg.Connection, table: TableSpec, window: PartitionWindow
) -> Fingerprint:
    """Make this transaction the partition's only writer under the table's limits, and
    fingerprint what the partition holds before the rollback touches it."""
    with conn.cursor() as cur:
        lock_partition(cur, table, window)
        apply_timeouts(cur, table)
    return fingerprint_of(conn, table, table.identifier, window)

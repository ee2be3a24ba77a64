"""Rollback: put partitions back to the snapshot taken before a write, and audit it.

A rollback is a write like any other: it goes through ``writer.replace_partition`` with the
snapshot as its source, keeps a snapshot of what it replaces (so a rollback can itself be undone)
and gets its own audit row (strategy ``rollback``, ``restored_from`` = the write it undoes).
Rolling back a whole backfill is one transaction: either every partition is restored or none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import groupby
from uuid import UUID, uuid4

import psycopg
from psycopg import sql

from backfill_assets.core import snapshots
from backfill_assets.core.audit import TABLE as AUDIT_TABLE
from backfill_assets.core.audit import AuditTrail, AuditUnavailable, RunInfo
from backfill_assets.core.fingerprint import Fingerprint, fingerprint_of
from backfill_assets.core.partitioning import PartitionWindow
from backfill_assets.core.registry import Registry
from backfill_assets.core.swap import build_staging, child_name, swap_in
from backfill_assets.core.tables import TableSpec
from backfill_assets.core.writer import (
    apply_timeouts,
    lock_partition,
    replace_partition,
    with_lock_retries,
)

STRATEGY = "rollback"
NOT_APPLIED = "the rollback was rolled back: nothing changed, every partition keeps its rows"
KEPT_WRITE = sql.SQL(
    "(status = 'succeeded' OR (strategy = 'batched_update' AND snapshot_rows IS NOT NULL))"
)
"""Audit rows of writes whose rows a rollback can restore: succeeded ones, and in-place updates
whose committed batches kept a snapshot even though a check failed."""


class RollbackError(RuntimeError):
    """The rollback cannot be done as asked; nothing was changed."""


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


def snapshots_of_backfill(
    conn: psycopg.Connection, registry: Registry, backfill_id: str
) -> list[SnapshotRef]:
    """For each partition the backfill wrote, its first write's snapshot: the pre-backfill rows."""
    rows = conn.execute(
        sql.SQL(
            "SELECT DISTINCT ON (table_name, partition_key) id, table_name, partition_key, "
            "snapshot_rows, write_id FROM {} WHERE backfill_id = %s "
            "AND strategy <> 'rollback' AND {} ORDER BY table_name, partition_key, id"
        ).format(AUDIT_TABLE, KEPT_WRITE),
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
        ).format(audit=AUDIT_TABLE, kept=KEPT_WRITE),  # ours has none of its columns
        {"id": backfill_id},
    ).fetchall()
    problems = []
    for (table, partition), history in groupby(rows, key=lambda row: row[:2]):
        held_before: dict[int, int | None] = {}
        holder: int | None = None  # None: the rows from before the backfill (or unknown)
        ours: set[int] = set()
        for _, _, audit_id, strategy, restored_from, is_ours, by in history:
            held_before[audit_id] = holder
            holder = held_before.get(restored_from) if strategy == "rollback" else audit_id
            if is_ours:
                ours.add(audit_id)
            last = f"write {audit_id} ({strategy}) by {by}"
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
        ).format(AUDIT_TABLE, KEPT_WRITE),
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


def _check_available(conn: psycopg.Connection, ref: SnapshotRef) -> None:
    """The snapshot is there and is only this write's: every row under the write's ids lies
    inside the partition's window, and there are no more of them than the audit row says the
    write kept (fewer is expected after an erasure purged a person's rows)."""
    if ref.table.swapped:
        _check_swapped(conn, ref)
        return
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
        _check_available(conn, ref)
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
        with conn.transaction():
            return [_restore_one(conn, ref, *ids[ref.audit_id], record) for ref in refs]

    try:
        # A lock not granted within the table's timeout: the whole rollback is tried again.
        first = refs[0].table
        results = with_lock_retries(restore_all, first, refs[0].partition_key, log)
    except (psycopg.Error, AuditUnavailable) as exc:
        for ref in refs:
            record(
                ref,
                status="failed",
                error=f"rollback not applied: {exc}".strip(),
                effect=NOT_APPLIED,
            )
        raise RollbackError(f"rollback failed and changed nothing: {exc}") from exc
    except BaseException as exc:
        # Interrupted (a terminated run, Ctrl-C): the transaction rolled back; say so, go on.
        for ref in refs:
            record(ref, status="failed", error=f"rollback not applied: {exc!r}", effect=NOT_APPLIED)
        raise
    return results


def _restore_one(
    conn: psycopg.Connection, ref: SnapshotRef, audit_id: int, write_id: UUID, record
) -> RollbackResult:
    if ref.table.in_place:
        return _restore_columns(conn, ref, audit_id, write_id, record)
    if ref.table.swapped:
        return _swap_back(conn, ref, audit_id, write_id, record)
    window = ref.table.partitioning.window(ref.partition_key)
    kept_rows = snapshots.kept_rows(ref.table, audit_id, write_id)
    kept: dict[str, object] = {}

    def checksums_and_audit(connection: psycopg.Connection, write) -> None:
        kept["after"] = fingerprint_of(connection, ref.table, ref.table.identifier, window).checksum
        kept["before"] = fingerprint_of(
            connection, ref.table, kept_rows.relation(ref.table), window
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


def _take_partition(
    conn: psycopg.Connection, table: TableSpec, window: PartitionWindow
) -> Fingerprint:
    """Make this transaction the partition's only writer under the table's limits, and
    fingerprint what the partition holds before the rollback touches it."""
    with conn.cursor() as cur:
        lock_partition(cur, table, window)
        apply_timeouts(cur, table)
    return fingerprint_of(conn, table, table.identifier, window)


def _restore_columns(
    conn: psycopg.Connection, ref: SnapshotRef, audit_id: int, write_id: UUID, record
) -> RollbackResult:
    """Undo an in-place update: put back the old values of the columns it set, by key.

    Only rows that still hold the values the write gave them are restored: a value the
    application wrote since is kept (and so is a row it deleted). The values replaced now are
    kept under the rollback's own ids first, with the values restored as the ones it wrote, so
    the rollback can be undone like any write.
    """
    table, spec = ref.table, ref.table.batched_update
    assert spec is not None
    window = table.partitioning.window(ref.partition_key)
    kept = snapshots.snapshot_table(table)
    keys = [*table.unique_key]
    taken = [*keys, table.partition_column, *spec.columns]
    join = sql.SQL(" AND ").join(
        sql.SQL("{} = {}").format(sql.Identifier("t", k), sql.Identifier("s", k)) for k in keys
    )
    of_write = sql.SQL(
        "s.audit_id = %(snapshot_id)s AND s.write_id IS NOT DISTINCT FROM %(write_id)s::uuid "
        "AND ROW({current}) IS NOT DISTINCT FROM ROW({written})"
    ).format(
        current=sql.SQL(", ").join(sql.Identifier("t", c) for c in spec.columns),
        written=sql.SQL(", ").join(
            sql.Identifier("s", snapshots.written_column(c)) for c in spec.columns
        ),
    )
    bound = {
        **window.as_params(),
        "snapshot_id": ref.audit_id,
        "write_id": ref.write_id,
        "new_id": audit_id,
        "new_write": write_id,
    }
    before = _take_partition(conn, table, window)
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL(
                "INSERT INTO {kept} (audit_id, write_id, {columns}, {written}) "
                "SELECT %(new_id)s, %(new_write)s, {current}, {restoring} FROM {table} AS t "
                "JOIN {kept} AS s ON {join} WHERE {of_write}"
            ).format(
                kept=kept,
                columns=sql.SQL(", ").join(sql.Identifier(c) for c in taken),
                written=sql.SQL(", ").join(
                    sql.Identifier(snapshots.written_column(c)) for c in spec.columns
                ),
                current=sql.SQL(", ").join(sql.Identifier("t", c) for c in taken),
                restoring=sql.SQL(", ").join(sql.Identifier("s", c) for c in spec.columns),
                table=table.identifier,
                join=join,
                of_write=of_write,
            ),
            bound,
        )
        replaced = cur.rowcount
        cur.execute(
            sql.SQL(
                "UPDATE {table} AS t SET {assignments} FROM {kept} AS s WHERE {join} AND {of_write}"
            ).format(
                table=table.identifier,
                assignments=sql.SQL(", ").join(
                    sql.SQL("{} = {}").format(sql.Identifier(c), sql.Identifier("s", c))
                    for c in spec.columns
                ),
                kept=kept,
                join=join,
                of_write=of_write,
            ),
            bound,
        )
        restored = cur.rowcount
    after = fingerprint_of(conn, table, table.identifier, window)
    record(
        ref,
        conn=conn,
        status="succeeded",
        rows_deleted=0,
        rows_inserted=0,
        rows_updated=restored,
        rows_after=after.rows,
        checksum_before=before.checksum,
        checksum_after=after.checksum,
        snapshot_rows=replaced,
    )
    return RollbackResult(
        ref, audit_id, 0, restored, before.checksum, after.checksum, snapshot_rows=replaced
    )


def _check_swapped(conn: psycopg.Connection, ref: SnapshotRef) -> None:
    """The partition a swap replaced is still kept, with the rows its audit row counted."""
    name = f"write {ref.audit_id} ({ref.table.qualified_name} {ref.partition_key})"
    kept = snapshots.swapped_name(ref.table, ref.write_id) if ref.write_id else None
    if ref.snapshot_rows == 0:
        return  # the partition's first write: rolling it back leaves the partition empty
    if kept is None or kept not in snapshots.swapped_snapshots(conn, ref.table):
        raise RollbackError(
            f"the partition replaced by {name} is no longer kept (expired after "
            f"{ref.table.snapshot_retention_days} days, or snapshots were off)"
        )
    rows = conn.execute(
        sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(snapshots.SCHEMA, kept))
    ).fetchone()[0]
    if rows > ref.snapshot_rows:
        raise RollbackError(
            f"the kept partition of {name} holds {rows} rows, its audit row says "
            f"{ref.snapshot_rows}; nothing was restored"
        )


def _swap_back(
    conn: psycopg.Connection, ref: SnapshotRef, audit_id: int, write_id: UUID, record
) -> RollbackResult:
    """Undo a swap by swapping the kept partition back in; the partition it replaces is kept
    in turn (under the rollback's own id), so the rollback can be undone too."""
    table = ref.table
    window = table.partitioning.window(ref.partition_key)
    kept = snapshots.swapped_name(table, ref.write_id)
    child = sql.Identifier(table.schema, child_name(table, window))
    before = _take_partition(conn, table, window)
    staging_name = f"{table.name[:40]}__r{window.start:%Y%m%d}_{write_id.hex[:8]}"
    staging = sql.Identifier(table.schema, staging_name)
    if kept in snapshots.swapped_snapshots(conn, table):
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
        snapshots.swapped_name(table, write_id),
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

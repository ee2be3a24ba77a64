"""The writer of ``batched_update`` (``batched_update.py``): fill columns of a live table, one
partition at a time, in short key-ordered batches.

``strategy: batched_update`` is for a table the application writes (``app.orders`` gaining
``total_price``): the project must not rebuild it, and one big ``UPDATE`` would hold row locks on
a whole partition for as long as it runs. Instead, per partition:

- **Batches**: rows are taken in unique-key order, at most a batch at a time, each batch one short
  transaction under the table's ``timeouts``. Between batches the pause switch and the throttle are
  read, so a pause or a stressed database stops the writer at a batch boundary.
- **Never overwrite the application**: only rows for which ``needs_update`` holds are taken, and
  the condition is evaluated again on each row as it is locked, so a value the application wrote
  meanwhile is kept. The first pass skips rows the application holds locked (``SKIP LOCKED``); a
  second pass over the partition takes what is left, waiting for those locks within the lock
  timeout (retried with back-off like every write).
- **Resumable**: a cursor per (table, partition) in ``backfill_control.cursors`` holds the last
  key of the last committed batch, updated in that batch's transaction. A run killed mid-way
  leaves it; the next write of the partition starts after it and redoes no committed batch.
- **Adaptive batch size**: after each batch the size is scaled by target / duration (by at most
  2x either way), within ``[min, max]``, so each statement takes about ``target``.
- **Snapshot, checks, audit**: each batch keeps the old values of the columns it changes (one row
  per key and write, in ``backfill_snapshots``), so ``rollback`` restores them. The guard runs
  before the first batch (a required column's expression yielding NULL refuses the partition);
  after the last, one statement verifies the partition, and its audit row commits with that.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID, uuid4

import psycopg
from psycopg import sql

from backfill_assets.core import snapshots
from backfill_assets.core.audit import AuditTrail, AuditUnavailable, RunInfo
from backfill_assets.core.control import SCHEMA as CONTROL_SCHEMA
from backfill_assets.core.database import relation_exists, schema_changes, waiting_for_turn
from backfill_assets.core.fingerprint import ROW_HASH, Fingerprint, checksum_of, sums_of
from backfill_assets.core.outcomes import CheckOutcome, SourceStats
from backfill_assets.core.params import BackfillParams
from backfill_assets.core.partitioning import PartitionWindow
from backfill_assets.core.reconcile import (
    PartitionDiff,
    Verification,
    change_outcome,
    measures_outcome,
    not_null_outcome,
    unique_outcome,
)
from backfill_assets.core.strategies.base import PartitionOutcome
from backfill_assets.core.tables import TableSpec
from backfill_assets.core.throttle import ThrottleTimeout
from backfill_assets.core.writer import WriteResult, apply_timeouts, with_lock_retries

NAME = "batched_update"
CURSORS = sql.Identifier(CONTROL_SCHEMA, "cursors")
KEY = "backfill_k_"
OLD = "backfill_old_"
"""Prefixes of the batch's own columns, so that the user's expressions, written over the table's
column names, never meet an ambiguous name where the batch is joined to the table. Wherever the
table is aliased, the alias is its own name: an expression's subquery can name the row's
columns as ``orders.customer_id`` in every statement."""
PROGRESS_EVERY_S = 5.0

CURSORS_DDL = """
CREATE SCHEMA IF NOT EXISTS backfill_control;
CREATE TABLE IF NOT EXISTS backfill_control.cursors (
    table_name text NOT NULL,
    partition_key text NOT NULL,
    sql_hash text NOT NULL,
    audit_id bigint NOT NULL,
    write_id uuid NOT NULL,
    pass smallint NOT NULL DEFAULT 1,
    after_key jsonb,
    batches integer NOT NULL DEFAULT 0,
    rows_updated bigint NOT NULL DEFAULT 0,
    batch_size integer NOT NULL,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (table_name, partition_key)
);
"""


def written_column(column: str) -> str:
    """The snapshot column holding the value an in-place write gave ``column``: a rollback
    restores a row only while it still holds that value (the application may have written since)."""
    return f"{column}__written"


class BatchRefused(Exception):
    """A batch would have written a NULL into a required column; it was rolled back."""


@dataclass
class Cursor:
    """Where a partition's in-place write stands, as stored after its last committed batch."""

    audit_id: int
    write_id: UUID
    started_at: datetime
    batch_size: int
    pass_number: int = 1
    after: list | None = None
    batches: int = 0
    rows_updated: int = 0
    resumed: bool = False


def ensure_cursor_table(conn: psycopg.Connection) -> None:
    if relation_exists(conn, CONTROL_SCHEMA, "cursors"):
        return
    with schema_changes(conn):
        conn.execute(CURSORS_DDL)


def open_cursor(
    conn: psycopg.Connection, audit: AuditTrail, table: TableSpec, window: PartitionWindow
) -> Cursor:
    """The partition's cursor: the one a killed write left (resumed), or a new one.

    A cursor left by a write of other expressions (the declaration changed since) restarts at the
    partition's first key under the same write: rows it already changed keep their original
    values in the snapshot.
    """
    ensure_cursor_table(conn)
    row = conn.execute(
        sql.SQL(
            "SELECT sql_hash, audit_id, write_id, started_at, batch_size, pass, after_key, "
            "batches, rows_updated FROM {} WHERE table_name = %s AND partition_key = %s"
        ).format(CURSORS),
        [table.qualified_name, window.key],
    ).fetchone()
    if row is not None:
        sql_hash, audit_id, write_id, started_at, size, pass_number, after, batches, rows = row
        if sql_hash == table.sql_hash:
            return Cursor(
                audit_id, write_id, started_at, size, pass_number, after, batches, rows, True
            )
        conn.execute(
            sql.SQL(
                "UPDATE {} SET sql_hash = %s, pass = 1, after_key = NULL, "
                "updated_at = clock_timestamp() WHERE table_name = %s AND partition_key = %s"
            ).format(CURSORS),
            [table.sql_hash, table.qualified_name, window.key],
        )
        return Cursor(audit_id, write_id, started_at, size, 1, None, batches, rows, True)
    assert table.batched_update is not None
    cursor = Cursor(
        audit.reserve_id(conn), uuid4(), datetime.now(UTC), table.batched_update.batch_start
    )
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (table_name, partition_key, sql_hash, audit_id, write_id, batch_size, "
            "started_at) VALUES (%s, %s, %s, %s, %s, %s, %s)"
        ).format(CURSORS),
        [
            table.qualified_name,
            window.key,
            table.sql_hash,
            cursor.audit_id,
            cursor.write_id,
            cursor.batch_size,
            cursor.started_at,
        ],
    )
    return cursor


def _keys(table: TableSpec, prefix: str = "") -> sql.Composed:
    return sql.SQL(", ").join(sql.Identifier(prefix + k) for k in table.unique_key)


def _key_type(table: TableSpec, key: str) -> str:
    return next(c.type for c in table.columns if c.name == key)


def batch_statement(table: TableSpec, *, skip_locked: bool) -> sql.Composed:
    """One batch, one statement: lock the next rows that need the update (the locked, newest
    versions), update them where they still need it, keep their old values in the snapshot.

    Returns the rows taken, the rows updated, the updated rows left with a NULL in a required
    column, and the last key taken (a JSON array: the cursor).
    """
    spec = table.batched_update
    assert spec is not None
    needs = sql.SQL(spec.needs_update_sql)
    after = sql.SQL(", ").join(
        sql.SQL("(%(after)s::jsonb ->> {})::{}").format(
            sql.Literal(i), sql.SQL(_key_type(table, k))
        )
        for i, k in enumerate(table.unique_key)
    )
    taken = [*table.unique_key, table.partition_column, *spec.columns]
    prefixed = [KEY + k for k in table.unique_key] + [
        OLD + c for c in [table.partition_column, *spec.columns]
    ]
    required = [c for c in spec.columns if c in table.required_columns]
    left_null = (
        sql.SQL(" OR ").join(
            sql.SQL("{} IS NULL").format(sql.Identifier(table.name, c)) for c in required
        )
        if required
        else sql.SQL("false")
    )
    return sql.SQL(
        "WITH backfill_batch AS ("
        "  SELECT {taken} FROM {table}"
        "  WHERE {window} AND {needs}"
        "    AND (%(after)s::jsonb IS NULL OR ({keys}) > ({after}))"
        "  ORDER BY {keys} LIMIT %(size)s FOR UPDATE{skip}"
        "), backfill_updated AS ("
        "  UPDATE {table} AS {alias} SET {assignments} FROM backfill_batch"
        "  WHERE ({t_keys}) = ({batch_keys}) AND {needs}"
        "  RETURNING {t_keys}, ({left_null}) AS left_null, {written}"
        "), backfill_kept AS ("
        "  INSERT INTO {snapshot} (audit_id, write_id, {kept_columns}, {written_names})"
        "  SELECT %(audit_id)s, %(write_id)s, {batch_columns}, {updated_written}"
        "  FROM backfill_batch JOIN backfill_updated"
        "  ON ({updated_keys}) = ({batch_keys})"
        "  ON CONFLICT (audit_id, {keys}) DO NOTHING"
        ") SELECT (SELECT count(*) FROM backfill_batch), (SELECT count(*) FROM backfill_updated),"
        "  (SELECT count(*) FROM backfill_updated WHERE left_null),"
        "  (SELECT jsonb_build_array({batch_keys}) FROM backfill_batch"
        "   ORDER BY {batch_keys} DESC LIMIT 1)"
    ).format(
        taken=sql.SQL(", ").join(
            sql.SQL("{} AS {}").format(sql.Identifier(c), sql.Identifier(p))
            for c, p in zip(taken, prefixed, strict=True)
        ),
        table=table.identifier,
        alias=sql.Identifier(table.name),
        window=table.window_filter(),
        needs=needs,
        keys=_keys(table),
        after=after,
        skip=sql.SQL(" SKIP LOCKED" if skip_locked else ""),
        assignments=sql.SQL(", ").join(
            sql.SQL("{} = ({})").format(sql.Identifier(c), sql.SQL(spec.expression(c)))
            for c in spec.columns
        ),
        t_keys=sql.SQL(", ").join(sql.Identifier(table.name, k) for k in table.unique_key),
        batch_keys=sql.SQL(", ").join(
            sql.Identifier("backfill_batch", KEY + k) for k in table.unique_key
        ),
        updated_keys=sql.SQL(", ").join(
            sql.Identifier("backfill_updated", k) for k in table.unique_key
        ),
        left_null=left_null,
        snapshot=snapshots.snapshot_table(table),
        kept_columns=sql.SQL(", ").join(sql.Identifier(c) for c in taken),
        written=sql.SQL(", ").join(
            sql.SQL("{} AS {}").format(
                sql.Identifier(table.name, c), sql.Identifier(written_column(c))
            )
            for c in spec.columns
        ),
        written_names=sql.SQL(", ").join(sql.Identifier(written_column(c)) for c in spec.columns),
        updated_written=sql.SQL(", ").join(
            sql.Identifier("backfill_updated", written_column(c)) for c in spec.columns
        ),
        batch_columns=sql.SQL(", ").join(sql.Identifier("backfill_batch", p) for p in prefixed),
    )


@dataclass(frozen=True)
class BatchResult:
    taken: int
    updated: int
    left_null: int
    last_key: list | None
    duration_s: float


def run_batch(
    conn: psycopg.Connection, table: TableSpec, window: PartitionWindow, cursor: Cursor
) -> BatchResult:
    """One batch in its own transaction, the cursor advanced in the same transaction."""
    spec = table.batched_update
    assert spec is not None
    statement = batch_statement(table, skip_locked=cursor.pass_number == 1)
    params = {
        **window.as_params(),
        "after": json.dumps(cursor.after, default=str) if cursor.after is not None else None,
        "size": cursor.batch_size,
        "audit_id": cursor.audit_id,
        "write_id": cursor.write_id,
    }
    with conn.transaction(), conn.cursor() as cur:
        apply_timeouts(cur, table)
        if spec.triggers == "replica":
            cur.execute("SET LOCAL session_replication_role = replica")
        if spec.defer_constraints:
            cur.execute("SET CONSTRAINTS ALL DEFERRED")
        started = time.perf_counter()
        taken, updated, left_null, last_key = cur.execute(statement, params).fetchone()
        duration = time.perf_counter() - started
        if left_null:
            raise BatchRefused(
                f"{left_null} updated rows would hold a NULL in a required column "
                f"({', '.join(c for c in spec.columns if c in table.required_columns)})"
            )
        result = BatchResult(taken, updated, left_null, last_key, duration)
        moved = _advanced(cursor, table, result)
        cur.execute(
            sql.SQL(
                "UPDATE {} SET pass = %s, after_key = %s, batches = %s, rows_updated = %s, "
                "batch_size = %s, updated_at = clock_timestamp() "
                "WHERE table_name = %s AND partition_key = %s"
            ).format(CURSORS),
            [
                moved.pass_number,
                json.dumps(moved.after, default=str) if moved.after is not None else None,
                moved.batches,
                moved.rows_updated,
                moved.batch_size,
                table.qualified_name,
                window.key,
            ],
        )
    # Committed: only now does the cursor in memory move (a retried batch starts where the
    # database's cursor is).
    cursor.__dict__.update(moved.__dict__)
    return result


def _advanced(current: Cursor, table: TableSpec, batch: BatchResult) -> Cursor:
    """The cursor past ``batch``; a short batch ends its pass (the first pass hands over to the
    second, which starts again at the partition's first key), resized for the next batch."""
    spec = table.batched_update
    assert spec is not None
    cursor = dataclasses.replace(current)
    cursor.batches += 1
    cursor.rows_updated += batch.updated
    if batch.taken < cursor.batch_size:
        cursor.pass_number += 1
        cursor.after = None
    else:
        cursor.after = batch.last_key
    if batch.taken:
        factor = min(2.0, max(0.5, spec.target_ms / 1000 / max(batch.duration_s, 1e-4)))
        cursor.batch_size = int(
            min(spec.batch_max, max(spec.batch_min, round(cursor.batch_size * factor)))
        )
    return cursor


@dataclass(frozen=True)
class InPlaceOutcome:
    """What ``update_partition`` did (a write stopped before its end raises instead)."""

    write: WriteResult
    verification: Verification
    snapshot_rows: int
    resumed_after: int
    """Batches a previous, killed write had committed (0 for a fresh write)."""


def update_partition(
    conn: psycopg.Connection,
    audit: AuditTrail,
    run: RunInfo,
    table: TableSpec,
    window: PartitionWindow,
    params: BackfillParams,
    guarded: tuple[CheckOutcome, SourceStats],
    *,
    between_batches: Callable[[], None] = lambda: None,
    log: Callable[[str], object] | None = None,
) -> tuple[Cursor, InPlaceOutcome]:
    """Update the partition batch by batch, then verify and audit it in one transaction.

    The partition's advisory lock is held by the session for the whole write: two writers of one
    partition take turns. Exceptions leave the cursor, so the next write resumes.
    """
    guard_outcome, _ = guarded
    started = time.perf_counter()
    with waiting_for_turn(conn):
        conn.execute(
            "SELECT pg_advisory_lock(hashtext(%s), hashtext(%s))",
            [table.qualified_name, window.key],
        )
    try:
        cursor = open_cursor(conn, audit, table, window)
        resumed_after = cursor.batches if cursor.resumed else 0
        if cursor.resumed and log is not None:
            log(
                f"{table.qualified_name} {window.key}: resuming a write interrupted after "
                f"{cursor.batches} batches ({cursor.rows_updated:,} rows already updated)"
            )
        logged = time.monotonic()
        while cursor.pass_number <= 2:
            if cursor.batches > resumed_after:
                between_batches()
            with_lock_retries(
                lambda: run_batch(conn, table, window, cursor), table, window.key, log
            )
            if log is not None and time.monotonic() - logged >= PROGRESS_EVERY_S:
                logged = time.monotonic()
                elapsed = time.perf_counter() - started
                log(
                    f"{table.qualified_name} {window.key}: {cursor.batches} batches, "
                    f"{cursor.rows_updated:,} rows updated ({cursor.rows_updated / elapsed:,.0f} "
                    f"rows/s), next batch {cursor.batch_size:,} rows"
                )
        verification, snapshot_rows = _finish(
            conn, audit, run, table, window, params, guard_outcome, cursor
        )
    finally:
        if not conn.closed and not conn.broken:
            conn.execute(
                "SELECT pg_advisory_unlock(hashtext(%s), hashtext(%s))",
                [table.qualified_name, window.key],
            )
    write = WriteResult(
        window.key,
        rows_deleted=0,
        rows_inserted=0,
        duration_s=time.perf_counter() - started,
        rows_updated=cursor.rows_updated,
        batches=cursor.batches,
    )
    return cursor, InPlaceOutcome(write, verification, snapshot_rows, resumed_after)


def _finish(
    conn: psycopg.Connection,
    audit: AuditTrail,
    run: RunInfo,
    table: TableSpec,
    window: PartitionWindow,
    params: BackfillParams,
    guard_outcome: CheckOutcome,
    cursor: Cursor,
) -> tuple[Verification, int]:
    """Verify the partition, insert its audit row and drop its cursor, in one transaction.

    The batches are committed: a failed blocking check cannot undo them here. The audit row then
    says ``failed`` with the reason, and keeps the snapshot's row count, so ``rollback`` can
    restore the old values.
    """
    with conn.transaction():
        conn.execute(
            "SELECT set_config('statement_timeout', %s, true)", [f"{table.timeouts.statement_ms}ms"]
        )
        verification, snapshot_rows = verify_in_place(conn, table, window, params, cursor)
        failed = verification.failed_blocking
        error = committed_failure(table, window, verification)
        audit.record(
            run,
            asset_key=table.asset_name,
            table=table.qualified_name,
            partition=window.key,
            strategy=NAME,
            sql_hash=table.sql_hash,
            conn=conn,
            audit_id=cursor.audit_id,
            write_id=cursor.write_id,
            status="failed" if failed else "succeeded",
            started_at=cursor.started_at,
            rows_before=guard_outcome.metadata.get("target_rows_before"),
            rows_deleted=0,
            rows_inserted=0,
            rows_updated=cursor.rows_updated,
            rows_after=verification.after.rows,
            checksum_before=verification.before.checksum,
            checksum_after=verification.after.checksum,
            snapshot_rows=snapshot_rows,
            error=error,
            changes=None if failed else json.dumps(verification.changes()),
        )
        conn.execute(
            sql.SQL("DELETE FROM {} WHERE table_name = %s AND partition_key = %s").format(CURSORS),
            [table.qualified_name, window.key],
        )
    return verification, snapshot_rows


def verify_in_place(
    conn: psycopg.Connection,
    table: TableSpec,
    window: PartitionWindow,
    params: BackfillParams,
    cursor: Cursor,
) -> tuple[Verification, int]:
    """The after-write checks of an in-place update, in one statement over the partition joined
    to this write's snapshot.

    "Before" is each row with its snapshot's old values; "after" the row as it is. Rows whose old
    value was NULL were *filled*, not changed: the change check (a WARN that numbers shifted)
    counts only rows whose old values differed, and the sums of those rows.
    """
    spec = table.batched_update
    assert spec is not None
    kept = snapshots.snapshot_table(table)
    first_key = sql.Identifier("backfill_old", KEY + table.unique_key[0])
    present = sql.SQL("{} IS NOT NULL").format(first_key)

    def before(column: str) -> sql.Composable:
        if column not in spec.columns:
            return sql.Identifier(table.name, column)
        return sql.SQL("CASE WHEN {} THEN {} ELSE {} END").format(
            present,
            sql.Identifier("backfill_old", OLD + column),
            sql.Identifier(table.name, column),
        )

    old_known = sql.SQL(" AND ").join(
        sql.SQL("{} IS NOT NULL").format(sql.Identifier("backfill_old", OLD + c))
        for c in spec.columns
    )
    changed = sql.SQL("{} AND {} AND ROW({}) IS DISTINCT FROM ROW({})").format(
        present,
        old_known,
        sql.SQL(", ").join(sql.Identifier("backfill_old", OLD + c) for c in spec.columns),
        sql.SQL(", ").join(sql.Identifier(table.name, c) for c in spec.columns),
    )
    computed = dict(spec.set)

    def source(measure: str) -> sql.Composable:
        return sql.SQL(computed[measure]) if measure in computed else sql.Identifier(measure)

    aggregates: list[sql.Composable] = [
        sql.SQL("count(*)"),
        checksum_of(
            ROW_HASH.format(
                row_text=sql.SQL("ROW({})::text").format(
                    sql.SQL(", ").join(sql.Identifier(table.name, c) for c in table.column_names)
                )
            )
        ),
        checksum_of(
            ROW_HASH.format(
                row_text=sql.SQL("ROW({})::text").format(
                    sql.SQL(", ").join(before(c) for c in table.column_names)
                )
            )
        ),
        sql.SQL("count(*) FILTER (WHERE {})").format(sql.SQL(spec.needs_update_sql)),
        sql.SQL("count(*) FILTER (WHERE {} AND NOT ({}))").format(present, old_known),
        sql.SQL("count(*) FILTER (WHERE {})").format(changed),
    ]
    # Per measure: the partition's sums after and before; over the rows this write updated,
    # what the expressions compute and what the rows hold (the reconciliation: rows the
    # application wrote itself are its own truth); over changed rows, before and after.
    for m in table.measures:
        aggregates += [
            sql.SQL("sum({})").format(sql.Identifier(table.name, m)),
            sql.SQL("sum({})").format(before(m)),
            sql.SQL("sum({}) FILTER (WHERE {})").format(source(m), present),
            sql.SQL("sum({}) FILTER (WHERE {})").format(sql.Identifier(table.name, m), present),
            sql.SQL("sum({}) FILTER (WHERE {})").format(before(m), changed),
            sql.SQL("sum({}) FILTER (WHERE {})").format(sql.Identifier(table.name, m), changed),
        ]
    aggregates += [
        sql.SQL("count(*) FILTER (WHERE {} IS NULL)").format(sql.Identifier(table.name, c))
        for c in table.required_columns
    ]
    query = sql.SQL(
        "WITH backfill_old AS MATERIALIZED (SELECT {s_columns} FROM {kept} "
        "WHERE audit_id = %(audit_id)s AND write_id = %(write_id)s) "
        "SELECT {aggregates}, "
        "(SELECT count(*) FROM {kept} WHERE audit_id = %(audit_id)s "
        " AND write_id = %(write_id)s), "
        "(SELECT count(*) FROM (SELECT FROM {table} WHERE {window} GROUP BY {keys} "
        " HAVING count(*) > 1) AS d), "
        "(SELECT coalesce(sum(c), 0) FROM (SELECT count(*) AS c FROM {table} WHERE {window} "
        " GROUP BY {keys} HAVING count(*) > 1) AS d) "
        "FROM {table} AS {alias} LEFT JOIN backfill_old ON ({t_keys}) = ({s_keys}) WHERE {window}"
    ).format(
        s_columns=sql.SQL(", ").join(
            [
                sql.SQL("{} AS {}").format(sql.Identifier(k), sql.Identifier(KEY + k))
                for k in table.unique_key
            ]
            + [
                sql.SQL("{} AS {}").format(sql.Identifier(c), sql.Identifier(OLD + c))
                for c in spec.columns
            ]
        ),
        kept=kept,
        aggregates=sql.SQL(", ").join(aggregates),
        table=table.identifier,
        alias=sql.Identifier(table.name),
        window=table.window_filter(),
        keys=_keys(table),
        t_keys=sql.SQL(", ").join(sql.Identifier(table.name, k) for k in table.unique_key),
        s_keys=sql.SQL(", ").join(
            sql.Identifier("backfill_old", KEY + k) for k in table.unique_key
        ),
    )
    values = list(
        conn.execute(
            query,
            {**window.as_params(), "audit_id": cursor.audit_id, "write_id": cursor.write_id},
        ).fetchone()
    )
    rows, checksum_after, checksum_before, still, filled, changed_rows = values[:6]
    width = 6 * len(table.measures)
    per_measure = values[6 : 6 + width]
    null_counts = values[6 + width : -3]
    snapshot_rows, duplicated, rows_with_duplicates = values[-3:]
    after_sums, before_sums = sums_of(table, per_measure[0::6]), sums_of(table, per_measure[1::6])
    computed_sums = sums_of(table, per_measure[2::6])
    updated_sums = sums_of(table, per_measure[3::6])
    diff = PartitionDiff(
        rows_added=0,
        rows_removed=0,
        rows_changed=changed_rows,
        sums_before=sums_of(table, per_measure[4::6]),
        sums_after=sums_of(table, per_measure[5::6]),
    )
    before_print = Fingerprint(rows, checksum_before, before_sums)
    after_print = Fingerprint(rows, checksum_after, after_sums)
    outcomes = {
        "rows_match_source": CheckOutcome(
            still == 0,
            {
                "source_rows": rows,
                "target_rows": rows,
                "rows_still_needing_update": still,
                "rows_updated": cursor.rows_updated,
                "rows_filled": filled,
            },
            message=f"{still} rows of the partition still need the update (written or locked "
            "by the application through both passes); run the partition again",
        ),
        "unique_key_is_unique": unique_outcome(table, duplicated, int(rows_with_duplicates)),
        "required_columns_not_null": not_null_outcome(table, list(null_counts)),
        "measures_reconcile": measures_outcome(
            table,
            SourceStats(snapshot_rows, 0, computed_sums),
            PartitionDiff(0, 0, 0, before_sums, updated_sums),
        ),
        "change_within_threshold": change_outcome(table, before_print, diff, params),
    }
    outcomes["change_within_threshold"].metadata["rows_filled"] = filled
    return Verification(outcomes, before_print, after_print, diff), snapshot_rows


def write_in_place(
    conn: psycopg.Connection,
    audit: AuditTrail,
    run: RunInfo,
    table: TableSpec,
    window: PartitionWindow,
    params: BackfillParams,
    guarded: tuple[CheckOutcome, SourceStats],
    log: Callable[[str], None] | None = None,
    *,
    between_batches: Callable[[], None] = lambda: None,
) -> PartitionOutcome:
    """``update_partition`` as a partition outcome, like ``partition_write.write_verified``'s.

    A write that stopped mid-way (lock retries exhausted, throttle gave up, a batch refused, the
    audit unavailable) is a failed partition whose committed batches stay and resume; its
    failure is audited under a new id (the write's own id is kept for the resumed write). A
    throttle that gave up also stops the run (``halt``).
    """
    guard_outcome = guarded[0]
    try:
        cursor, done = update_partition(
            conn,
            audit,
            run,
            table,
            window,
            params,
            guarded,
            between_batches=between_batches,
            log=log,
        )
    except (ThrottleTimeout, BatchRefused, AuditUnavailable, psycopg.Error) as exc:
        error = stopped_message(table, window, exc)
        audit.record(
            run,
            asset_key=table.asset_name,
            table=table.qualified_name,
            partition=window.key,
            strategy=NAME,
            sql_hash=table.sql_hash,
            status="failed",
            started_at=datetime.now(UTC),
            rows_before=guard_outcome.metadata.get("target_rows_before"),
            error=error,
            effect=f"the write stopped: {error}",
        )
        return PartitionOutcome(
            window, "failed", guard_outcome, error=error, halt=isinstance(exc, ThrottleTimeout)
        )
    verification = done.verification
    failed = verification.failed_blocking
    return PartitionOutcome(
        window,
        "failed" if failed else "succeeded",
        guard_outcome,
        write=done.write,
        verification=verification,
        snapshot_rows=done.snapshot_rows,
        audit_id=cursor.audit_id,
        error=committed_failure(table, window, verification),
        resumed_after=done.resumed_after,
        committed=True,
    )


def committed_failure(
    table: TableSpec, window: PartitionWindow, verification: Verification
) -> str | None:
    """Why an in-place write failed its checks after its batches committed, and the undo; None
    when every blocking check passed."""
    if not verification.failed_blocking:
        return None
    return (
        f"blocking check(s) failed after the update: {verification.failure_details()}; the "
        f"updated rows are committed, `backfill-assets rollback --table {table.qualified_name} "
        f"--partition {window.key}` restores their old values"
    )


def stopped_message(table: TableSpec, window: PartitionWindow, exc: BaseException) -> str:
    """Why a partition's in-place write stopped before its end, and that it resumes."""
    if isinstance(exc, ThrottleTimeout):
        reason = str(exc)
    elif isinstance(exc, BatchRefused):
        reason = f"{exc}; that batch was rolled back"
    elif isinstance(exc, AuditUnavailable | psycopg.Error):
        reason = str(exc).strip()
    else:
        reason = repr(exc)
    return (
        f"{reason}. The batches committed before it are kept (their old values are in the "
        f"snapshot); the next run of {table.qualified_name} {window.key} resumes after them"
    )

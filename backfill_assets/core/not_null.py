"""Make a filled column NOT NULL without holding the table's strongest lock for a scan.

``ALTER TABLE ... SET NOT NULL`` alone scans the whole table under ACCESS EXCLUSIVE: nothing reads
or writes the table until the scan ends. Done in four short steps instead, each its own
transaction under the table's ``timeouts`` (a lock not granted in time is given up and retried
with back-off, so the application queues behind this for at most the lock timeout):

1. ``ADD CONSTRAINT ... CHECK (column IS NOT NULL) NOT VALID``: instant, checks new writes only;
2. ``VALIDATE CONSTRAINT``: the scan, under SHARE UPDATE EXCLUSIVE (reads and writes go on);
3. ``SET NOT NULL``: instant, PostgreSQL 12+ proves it from the validated constraint;
4. ``DROP CONSTRAINT``: the column's own NOT NULL now holds.

If rows are still NULL, step 2 fails: the constraint is dropped again and the error says which
partitions still hold NULLs, so nothing is left half-done.
"""

from __future__ import annotations

from collections.abc import Callable

import psycopg
from psycopg import sql

from backfill_assets.core.tables import TableSpec
from backfill_assets.core.writer import apply_timeouts, with_lock_retries


class NotNullError(ValueError):
    """The column cannot be made NOT NULL (yet); the table was left as it was."""


def finish_column(
    conn: psycopg.Connection,
    table: TableSpec,
    column: str,
    log: Callable[[str], object] | None = None,
) -> str:
    """Make ``column`` of ``table`` NOT NULL in the four steps above; returns what was done."""
    filled = table.batched_update.columns if table.batched_update else ()
    if column not in filled:
        raise NotNullError(
            f"{column!r} is not a column {table.qualified_name} fills in place"
            + (
                f" (its batched_update sets {', '.join(filled)})"
                if filled
                else " (it is not declared with strategy: batched_update)"
            )
            + "; finish-column makes such a column NOT NULL once every row has its value"
        )
    row = conn.execute(
        "SELECT attnotnull FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = %s "
        "AND NOT attisdropped",
        [table.identifier.as_string(conn), column],
    ).fetchone()
    if row is None:
        raise NotNullError(f"{table.qualified_name} has no column {column!r} in the database")
    if row[0]:
        return f"{table.qualified_name}.{column} is already NOT NULL; nothing to do"
    name = sql.Identifier(f"{table.name}_{column}_not_null"[:63])
    target, col = table.identifier, sql.Identifier(column)

    def step(statement: sql.Composed) -> None:
        def run() -> None:
            with conn.transaction():
                apply_timeouts(conn, table)
                conn.execute(statement)

        with_lock_retries(run, table, f"{column} NOT NULL", log)

    drop = sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(target, name)
    # A constraint left by an interrupted earlier run is reused: a validated one saves the scan.
    existing = conn.execute(
        "SELECT convalidated FROM pg_constraint WHERE conrelid = to_regclass(%s) AND conname = %s",
        [table.identifier.as_string(conn), name.as_string(conn).strip('"')],
    ).fetchone()
    try:
        if existing is None:
            step(
                sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({} IS NOT NULL) NOT VALID").format(
                    target, name, col
                )
            )
        if existing is None or not existing[0]:
            try:
                step(sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(target, name))
            except psycopg.errors.CheckViolation:
                step(drop)
                raise NotNullError(_still_null(conn, table, column)) from None
        step(sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET NOT NULL").format(target, col))
        step(drop)
    except psycopg.errors.LockNotAvailable as exc:
        where = f"timeouts in {table.declared_in}" if table.declared_in else "the table's timeouts"
        raise NotNullError(
            f"{str(exc).strip()}: {table.qualified_name} stayed locked by another session "
            f"through {table.timeouts.lock_retries + 1} tries of {table.timeouts.lock_ms} ms. "
            "The column is still nullable; what was done is kept and reused when you run this "
            f"again (at a quieter time, or with a larger lock / lock_retries in {where})"
        ) from None
    return f"{table.qualified_name}.{column} is NOT NULL now"


def _still_null(conn: psycopg.Connection, table: TableSpec, column: str) -> str:
    """Which partitions still hold NULLs in ``column``, for the error."""
    counts = conn.execute(
        sql.SQL(
            "SELECT {start} AS p, count(*) FROM {table} WHERE {col} IS NULL GROUP BY p ORDER BY p"
        ).format(
            start=table.partitioning.start_of(sql.Identifier(table.partition_column)),
            table=table.identifier,
            col=sql.Identifier(column),
        )
    ).fetchall()
    declared = table.partitioning
    counts = [(declared.key_of(p), n) for p, n in counts]
    total = sum(n for _, n in counts)
    shown = ", ".join(f"{p} ({n})" for p, n in counts[:5]) + (", ..." if len(counts) > 5 else "")
    inside = [p for p, _ in counts if declared.contains_key(p)]
    outside = sum(n for p, n in counts if not declared.contains_key(p))
    advice = []
    if inside:
        advice.append(
            f"backfill them first (backfill-assets launch --select {table.asset_name} --from "
            f"{inside[0]} --to {inside[-1]})"
        )
    if outside:
        advice.append(
            f"{outside} of them lie outside the declared partitions ({declared.describe()}): "
            f"widen partitions in {table.declared_in}, or set them otherwise"
        )
    return (
        f"{total} rows of {table.qualified_name} still hold NULL in {column}, in "
        f"{len(counts)} partition(s): {shown}. Nothing was changed. "
        + "; ".join(advice).capitalize()
        + ", then run this again"
    )

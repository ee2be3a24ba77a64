"""The mechanics of ``partition_swap`` (``partition_swap.py``): rebuild a partition aside,
verify it there, exchange it for the old one with DETACH/ATTACH, keep the old one.

``strategy: partition_swap`` is for a target the project builds as a natively partitioned
table (``PARTITION BY RANGE`` on the partition column, one child table per partition, named
``<table>__p<YYYYMMDD>``). Per partition, in one transaction:

1. The new rows go into a staging table shaped like the parent (``LIKE ... INCLUDING DEFAULTS
   INCLUDING CONSTRAINTS``), with a CHECK that proves the partition's bounds and the parent's
   indexes: ATTACH then needs neither a scan nor an index build.
2. The same one-statement verification as ``delete_insert`` compares the staging table with the
   current child; a blocking failure rolls everything back (the staging table vanishes).
3. The swap, in a savepoint under the table's lock timeout: DETACH the current child, move it to
   ``backfill_snapshots`` (it *is* the snapshot: nothing is copied), rename the staging table to
   the child's name, ATTACH it, insert the audit row. DETACH takes ACCESS EXCLUSIVE on the parent
   until the commit a few milliseconds later; a lock not granted within the timeout rolls back to
   the savepoint and is retried with back-off, so readers queue behind it at most that long.

No DELETE: no dead tuples, no vacuum debt, and the old rows are kept by a rename.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from uuid import UUID

import psycopg
from psycopg import sql

from backfill_assets.core import snapshots
from backfill_assets.core.audit import TABLE as AUDIT_TABLE
from backfill_assets.core.audit import AuditTrail, RunInfo
from backfill_assets.core.outcomes import CheckOutcome, SourceStats
from backfill_assets.core.params import BackfillParams
from backfill_assets.core.partition_write import VerifiedWrite
from backfill_assets.core.partitioning import PartitionWindow
from backfill_assets.core.strategies.base import PartitionOutcome
from backfill_assets.core.tables import TableSpec
from backfill_assets.core.writer import (
    WriteResult,
    apply_timeouts,
    lock_partition,
    with_lock_retries,
)

_INDEX = re.compile(r"^CREATE (UNIQUE )?INDEX \S+ ON ONLY \S+ ")


class RowsOutsideWindow(Exception):
    """The table's SQL yields rows that belong to another partition; nothing was swapped."""


def child_name(table: TableSpec, window: PartitionWindow) -> str:
    return f"{table.name[:48]}__p{window.tag}"


def attached_child(conn: psycopg.Connection, table: TableSpec, window: PartitionWindow) -> bool:
    return bool(
        conn.execute(
            "SELECT count(*) FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = to_regclass(%s) AND c.relname = %s",
            [table.identifier.as_string(conn), child_name(table, window)],
        ).fetchone()[0]
    )


def kept_name(table: TableSpec, write_id: UUID) -> str:
    """A partition replaced by a swap, kept under the random id of the write that replaced it."""
    return f"{_kept_prefix(table)}{write_id.hex[:12]}"


def _kept_prefix(table: TableSpec) -> str:
    return f"{table.schema[:20]}__{table.name[:24]}__w"


def kept_partitions(conn: psycopg.Connection, table: TableSpec) -> list[str]:
    """Names of the kept partitions of a ``partition_swap`` table, in ``backfill_snapshots``."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relkind = 'r' AND starts_with(c.relname, %s) "
        "ORDER BY c.relname",
        [snapshots.SCHEMA, _kept_prefix(table)],
    ).fetchall()
    return [name for (name,) in rows]


def expire_kept(conn: psycopg.Connection, table: TableSpec, days: int) -> int:
    """Drop the kept partitions whose write ended more than ``days`` ago; returns their rows.

    A kept partition is named after its write's random id (``kept_name``); the audit
    row with that id says when the write ended.
    """
    old = conn.execute(
        sql.SQL(
            "SELECT write_id FROM {} WHERE table_name = %s AND write_id IS NOT NULL AND "
            "ended_at < now() - make_interval(days => %s)"
        ).format(AUDIT_TABLE),
        [table.qualified_name, days],
    ).fetchall()
    kept = set(kept_partitions(conn, table))
    dropped = 0
    for (write_id,) in old:
        name = kept_name(table, write_id)
        if name in kept:
            target = sql.Identifier(snapshots.SCHEMA, name)
            dropped += conn.execute(sql.SQL("SELECT count(*) FROM {}").format(target)).fetchone()[0]
            conn.execute(sql.SQL("DROP TABLE {}").format(target))
    return dropped


def _bounds(window: PartitionWindow) -> tuple[sql.Literal, sql.Literal]:
    """DDL takes no bound parameters: the bounds as typed literals (``'2024-04-01'::date``,
    an hour's ``timestamp`` or ``timestamptz``)."""
    return sql.Literal(window.start), sql.Literal(window.end)


def build_staging(
    conn: psycopg.Connection,
    table: TableSpec,
    window: PartitionWindow,
    staging: sql.Identifier,
    *,
    fill: bool = True,
) -> int:
    """Create the staging table and fill it with the window's rows (``fill``; else it stays
    empty), then add the bounds CHECK and the parent's indexes; returns the rows inserted."""
    start, end = _bounds(window)
    column = sql.Identifier(table.partition_column)
    conn.execute(
        sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)").format(
            staging, table.identifier
        )
    )
    inserted = 0
    if fill:
        inserted = conn.execute(
            sql.SQL("INSERT INTO {} ({cols}) SELECT {cols} FROM ({query}) AS src").format(
                staging, cols=table.column_list(), query=table.source_query
            ),
            window.as_params(),
        ).rowcount
    # Implies the partition constraint, so ATTACH does not scan the rows again under its lock.
    try:
        with conn.transaction():
            conn.execute(
                sql.SQL(
                    "ALTER TABLE {} ADD CHECK ({col} IS NOT NULL AND {col} >= {} AND {col} < {})"
                ).format(staging, start, end, col=column)
            )
    except psycopg.errors.CheckViolation:
        raise RowsOutsideWindow(
            f"{table.sql_source} yields rows outside the partition {window.key} (its "
            f"{table.partition_column} must lie in {window.start}..{window.end}, end excluded): "
            f"filter on %(start)s <= {table.partition_column} < %(end)s"
        ) from None
    definitions = conn.execute(
        "SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = to_regclass(%s)",
        [table.identifier.as_string(conn)],
    ).fetchall()
    for (definition,) in definitions:
        # "CREATE INDEX name ON ONLY parent USING btree (col)" -> the same on the staging table;
        # ATTACH adopts a matching index instead of building one.
        rest = _INDEX.sub("", definition)
        unique = "UNIQUE " if definition.startswith("CREATE UNIQUE") else ""
        conn.execute(sql.SQL("CREATE " + unique + "INDEX ON {} " + rest).format(staging))
    return inserted


def swap_in(
    conn: psycopg.Connection,
    table: TableSpec,
    window: PartitionWindow,
    staging_name: str,
    snapshot: str | None,
    had_child: bool,
    before_commit: Callable[[], None],
) -> None:
    """DETACH the current child (kept as ``snapshot``, or dropped), ATTACH the staging table in
    its place; in a savepoint, so a lock timeout undoes only this part."""
    child = sql.Identifier(table.schema, child_name(table, window))
    start, end = _bounds(window)
    with conn.transaction():
        if had_child:
            conn.execute(
                sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(table.identifier, child)
            )
            if snapshot is None:
                conn.execute(sql.SQL("DROP TABLE {}").format(child))
            else:
                conn.execute(
                    sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
                        child, sql.Identifier(snapshots.SCHEMA)
                    )
                )
                conn.execute(
                    sql.SQL("ALTER TABLE {} RENAME TO {}").format(
                        sql.Identifier(snapshots.SCHEMA, child_name(table, window)),
                        sql.Identifier(snapshot),
                    )
                )
        conn.execute(
            sql.SQL("ALTER TABLE {} RENAME TO {}").format(
                sql.Identifier(table.schema, staging_name),
                sql.Identifier(child_name(table, window)),
            )
        )
        conn.execute(
            sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
                table.identifier, child, start, end
            )
        )
        before_commit()


def swap_partition(
    conn: psycopg.Connection,
    audit: AuditTrail,
    run: RunInfo,
    table: TableSpec,
    window: PartitionWindow,
    params: BackfillParams,
    guarded: tuple[CheckOutcome, SourceStats],
    log: Callable[[str], None] | None = None,
) -> PartitionOutcome:
    """Replace one partition by swapping in a rebuilt, verified child; audited like a write."""
    job = VerifiedWrite.start(
        conn, audit, run, table, window, params, guarded, keeps_snapshot=params.snapshots
    )
    started = time.perf_counter()
    staging_name = f"{table.name[:40]}__s{window.tag}_{job.write_id.hex[:8]}"
    staging = sql.Identifier(table.schema, staging_name)
    snapshot = kept_name(table, job.write_id) if params.snapshots else None

    def write() -> WriteResult:
        with conn.transaction(), conn.cursor() as cur:
            lock_partition(cur, table, window)
            apply_timeouts(cur, table)
            inserted = build_staging(conn, table, window, staging)
            had_child = attached_child(conn, table, window)
            old = (
                sql.Identifier(table.schema, child_name(table, window))
                if had_child
                else sql.SQL("(SELECT {} FROM {} WHERE false)").format(
                    table.column_list(), table.identifier
                )
            )
            deleted = job.verify(conn, old, staging).before.rows
            with_lock_retries(
                lambda: swap_in(
                    conn,
                    table,
                    window,
                    staging_name,
                    snapshot,
                    had_child,
                    lambda: job.record_success(conn, deleted, inserted),
                ),
                table,
                window.key,
                log,
            )
        return WriteResult(window.key, deleted, inserted, time.perf_counter() - started)

    return job.outcome(write, expected=(RowsOutsideWindow,))

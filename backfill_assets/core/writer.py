"""The one write path: replace partition P of table T with the rows of a query.

DELETE and INSERT run in one transaction per partition, entirely inside PostgreSQL (no rows travel
through Python). Either the partition holds the new rows, or, after any failure, exactly the old
ones: readers never see it empty or half-written. Each partition commits on its own, so a range
never holds one long transaction (long locks, bloated WAL) and a failure loses no other partition.

Backfills, rollbacks and future strategies all come through here: they differ only in the query
that yields the new rows and in what they do inside the transaction (the two hooks).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import psycopg
from psycopg import sql

from backfill_assets.core.partitioning import PartitionWindow
from backfill_assets.core.tables import TableSpec

Hook = Callable[[psycopg.Connection], None]

PREVIOUS_ROWS = sql.Identifier("backfill_previous_rows")
"""Temporary table holding the rows the DELETE removed, for the rest of the transaction."""


@dataclass(frozen=True)
class WriteResult:
    partition_key: str
    rows_deleted: int
    rows_inserted: int
    duration_s: float

    @property
    def rows_per_second(self) -> float:
        return self.rows_inserted / self.duration_s if self.duration_s > 0 else 0.0

    def as_metadata(self) -> dict[str, float | int]:
        return {
            "rows_deleted": self.rows_deleted,
            "rows_inserted": self.rows_inserted,
            "duration_s": round(self.duration_s, 3),
            "rows_per_second": round(self.rows_per_second, 1),
        }


def delete_statement(table: TableSpec) -> sql.Composed:
    return sql.SQL("DELETE FROM {table} WHERE {window}").format(
        table=table.identifier, window=table.window_filter()
    )


def insert_statement(table: TableSpec, source: sql.Composable | None = None) -> sql.Composed:
    return sql.SQL("INSERT INTO {table} ({columns}) SELECT {columns} FROM ({query}) AS src").format(
        table=table.identifier, columns=table.column_list(), query=source or table.source_query
    )


def _delete_keeping_previous(table: TableSpec) -> list[sql.Composed]:
    # DROP first: a rollback writes several partitions inside one outer transaction, where
    # ON COMMIT DROP only fires at the very end.
    return [
        sql.SQL("DROP TABLE IF EXISTS pg_temp.{}").format(PREVIOUS_ROWS),
        sql.SQL("CREATE TEMP TABLE {} (LIKE {}) ON COMMIT DROP").format(
            PREVIOUS_ROWS, table.identifier
        ),
        sql.SQL(
            "WITH gone AS (DELETE FROM {table} WHERE {window} RETURNING *) "
            "INSERT INTO {previous} SELECT * FROM gone"
        ).format(table=table.identifier, window=table.window_filter(), previous=PREVIOUS_ROWS),
    ]


def lock_partition(cur: psycopg.Cursor, table: TableSpec, window: PartitionWindow) -> None:
    """Make this transaction the partition's only writer until it ends.

    Two writers of one partition (overlapping backfills, a rollback during a backfill) would
    otherwise duplicate it: under READ COMMITTED the second DELETE waits for the first writer,
    then skips the rows it deleted and cannot see the rows it inserted, and its INSERT adds the
    partition a second time. With the lock the second writer starts only after the first
    committed, and its DELETE sees the first one's rows.
    """
    cur.execute(
        "SELECT pg_advisory_xact_lock(hashtext(%s), hashtext(%s))",
        [table.qualified_name, window.key],
    )


def replace_partition(
    conn: psycopg.Connection,
    table: TableSpec,
    window: PartitionWindow,
    *,
    source: sql.Composable | None = None,
    params: Mapping[str, object] | None = None,
    keep_previous: bool = False,
    after_delete: Hook | None = None,
    before_commit: Hook | None = None,
) -> WriteResult:
    """Replace the rows of ``window`` in ``table`` with the rows of ``source``.

    ``source`` defaults to the table's own query; it is bound with the window's ``start``/``end``
    and ``params``. With ``keep_previous`` the deleted rows stay readable in ``PREVIOUS_ROWS`` until
    the transaction ends (snapshots, diffs, checksums). ``after_delete`` runs between DELETE and
    INSERT, ``before_commit`` after the INSERT: either may raise to roll the partition back.
    Concurrent writers of the same partition take turns (``lock_partition``).
    """
    bound = {**window.as_params(), **(params or {})}
    started = time.perf_counter()
    with conn.transaction(), conn.cursor() as cur:
        lock_partition(cur, table, window)
        if keep_previous:
            for statement in _delete_keeping_previous(table):
                cur.execute(statement, bound)
        else:
            cur.execute(delete_statement(table), bound)
        deleted = cur.rowcount
        if after_delete is not None:
            after_delete(conn)
        cur.execute(insert_statement(table, source), bound)
        inserted = cur.rowcount
        if before_commit is not None:
            before_commit(conn)
    return WriteResult(
        partition_key=window.key,
        rows_deleted=deleted,
        rows_inserted=inserted,
        duration_s=time.perf_counter() - started,
    )

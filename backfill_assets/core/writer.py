"""The one write path: replace partition P of table T with the rows of a query.

DELETE and INSERT run in one transaction per partition, entirely inside PostgreSQL (no rows travel
through Python). Either the partition holds the new rows, or, after any failure, exactly the old
ones: readers never see it empty or half-written. Each partition commits on its own, so a range
never holds one long transaction (long locks, bloated WAL) and a failure loses no other partition.

Backfills, rollbacks and future strategies all come through here: they differ only in the query
that yields the new rows and in what they do inside the transaction (the two hooks).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import psycopg
from psycopg import sql

from backfill_assets.core.partitioning import PartitionWindow
from backfill_assets.core.tables import TableSpec

T = TypeVar("T")
Hook = Callable[[psycopg.Connection], None]
BeforeCommit = Callable[[psycopg.Connection, "WriteResult"], None]

BASE_BACKOFF_S = 0.2
MAX_BACKOFF_S = 15.0
PREVIOUS_ROWS = sql.Identifier("backfill_previous_rows")
"""Temporary table holding the rows the DELETE removed, for the rest of the transaction."""


@dataclass(frozen=True)
class WriteResult:
    partition_key: str
    rows_deleted: int
    rows_inserted: int
    duration_s: float
    rows_updated: int = 0
    """Rows changed in place (``strategy: batched_update``), in ``batches`` transactions."""
    batches: int = 0

    @property
    def rows_written(self) -> int:
        return self.rows_inserted + self.rows_updated

    @property
    def rows_per_second(self) -> float:
        return self.rows_written / self.duration_s if self.duration_s > 0 else 0.0

    def as_metadata(self) -> dict[str, float | int]:
        counts = (
            {"rows_updated": self.rows_updated, "batches": self.batches}
            if self.batches
            else {"rows_deleted": self.rows_deleted, "rows_inserted": self.rows_inserted}
        )
        return {
            **counts,
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


@dataclass(frozen=True)
class KeptRows:
    """Where a DELETE puts the rows it removes, so they stay readable until the transaction ends.

    By default a temporary table (gone at COMMIT); a snapshot keeps them beyond it, tagged with
    the write's audit id: the DELETE itself fills it, so the old rows are copied once.
    """

    table: sql.Identifier = field(default_factory=lambda: PREVIOUS_ROWS)
    tag: tuple[tuple[str, object], ...] = ()
    """Leading columns of ``table`` set to fixed values, e.g. ``(("audit_id", 42),)``."""

    @property
    def temporary(self) -> bool:
        return self.table == PREVIOUS_ROWS

    @property
    def params(self) -> dict[str, object]:
        """The tag's values, bound to the placeholders of ``relation`` and ``statements`` (one
        statement text for every write: PostgreSQL plans it once, psycopg prepares it)."""
        return {f"kept_{name}": value for name, value in self.tag}

    def relation(self, table: TableSpec) -> sql.Composed:
        """The kept rows, shaped like ``table``, as a subquery (bind ``params``)."""
        # `=` (not IS NOT DISTINCT FROM, which no index serves) where there is a value.
        where = sql.SQL(" AND ").join(
            sql.SQL("{} = {}").format(sql.Identifier(name), sql.Placeholder(f"kept_{name}"))
            if value is not None
            else sql.SQL("{} IS NULL").format(sql.Identifier(name))
            for name, value in self.tag
        )
        return sql.SQL("(SELECT {} FROM {}{})").format(
            table.column_list(), self.table, sql.SQL(" WHERE ") + where if self.tag else sql.SQL("")
        )

    def statements(self, table: TableSpec) -> list[sql.Composed]:
        tag_columns = [sql.Identifier(name) for name, _ in self.tag]
        tag_values = [sql.Placeholder(f"kept_{name}") for name, _ in self.tag]
        delete = sql.SQL(
            "WITH gone AS (DELETE FROM {table} WHERE {window} RETURNING *) "
            "INSERT INTO {kept} ({columns}) SELECT {values} FROM gone"
        ).format(
            table=table.identifier,
            window=table.window_filter(),
            kept=self.table,
            columns=sql.SQL(", ").join([*tag_columns, table.column_list()]),
            values=sql.SQL(", ").join([*tag_values, table.column_list()]),
        )
        if not self.temporary:
            return [delete]
        # DROP first: a rollback writes several partitions inside one outer transaction, where
        # ON COMMIT DROP only fires at the very end.
        return [
            sql.SQL("DROP TABLE IF EXISTS pg_temp.{}").format(PREVIOUS_ROWS),
            sql.SQL("CREATE TEMP TABLE {} (LIKE {}) ON COMMIT DROP").format(
                PREVIOUS_ROWS, table.identifier
            ),
            delete,
        ]


def apply_timeouts(target: psycopg.Connection | psycopg.Cursor, table: TableSpec) -> None:
    """The table's ``lock_timeout`` and ``statement_timeout``, for the rest of the transaction
    open on ``target`` (values bound, ``set_config(..., true)``)."""
    target.execute(
        "SELECT set_config('lock_timeout', %s, true), set_config('statement_timeout', %s, true)",
        [f"{table.timeouts.lock_ms}ms", f"{table.timeouts.statement_ms}ms"],
    )


def lock_partition(cur: psycopg.Cursor, table: TableSpec, window: PartitionWindow) -> None:
    """Make this transaction the partition's only writer until it ends.

    Two writers of one partition (overlapping backfills, a rollback during a backfill) would
    otherwise duplicate it: under READ COMMITTED the second DELETE waits for the first writer,
    then skips the rows it deleted and cannot see the rows it inserted, and its INSERT adds the
    partition a second time. With the lock the second writer starts only after the first
    committed, and its DELETE sees the first one's rows.
    """
    # No limit on this wait (the session's would end it): the caller applies the table's after.
    cur.execute("SET LOCAL lock_timeout = 0; SET LOCAL statement_timeout = 0")
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
    keep_previous: KeptRows | None = None,
    after_delete: Hook | None = None,
    before_commit: BeforeCommit | None = None,
) -> WriteResult:
    """Replace the rows of ``window`` in ``table`` with the rows of ``source``.

    ``source`` defaults to the table's own query; it is bound with the window's ``start``/``end``
    and ``params``. With ``keep_previous`` the deleted rows stay readable there until the
    transaction ends (snapshots, diffs, checksums). ``after_delete`` runs between DELETE and
    INSERT, ``before_commit`` after the INSERT (given the write's counts): either may raise to roll
    the partition back.
    Concurrent writers of the same partition take turns (``lock_partition``).
    """
    bound = {
        **window.as_params(),
        **(params or {}),
        **(keep_previous.params if keep_previous else {}),
    }
    started = time.perf_counter()
    with conn.transaction(), conn.cursor() as cur:
        lock_partition(cur, table, window)
        # After the partition lock (a backfill waits for another backfill of the same partition
        # as long as it takes), everything runs under the table's limits.
        apply_timeouts(cur, table)
        if keep_previous is not None:
            for statement in keep_previous.statements(table):
                cur.execute(statement, bound)
        else:
            cur.execute(delete_statement(table), bound)
        deleted = cur.rowcount
        if after_delete is not None:
            after_delete(conn)
        cur.execute(insert_statement(table, source), bound)
        inserted = cur.rowcount
        if before_commit is not None:
            before_commit(conn, _result(window, deleted, inserted, started))
    return _result(window, deleted, inserted, started)


def _result(window: PartitionWindow, deleted: int, inserted: int, started: float) -> WriteResult:
    return WriteResult(
        partition_key=window.key,
        rows_deleted=deleted,
        rows_inserted=inserted,
        duration_s=time.perf_counter() - started,
    )


def with_lock_retries(
    write: Callable[[], T],
    table: TableSpec,
    what: str,
    log: Callable[[str], object] | None,
) -> T:
    """Run ``write``; when it gives up on a lock (the table's ``lock_timeout``), wait and try
    again, with exponential back-off and jitter, up to the table's ``lock_retries`` times.

    Each attempt is a whole transaction: the failed one rolled back, nothing of it remains.
    ``what`` names the work in the log (a partition key, a step).
    """
    timeouts = table.timeouts
    for attempt in range(timeouts.lock_retries + 1):
        try:
            return write()
        except psycopg.errors.LockNotAvailable:
            if attempt == timeouts.lock_retries:
                raise
            ceiling = min(MAX_BACKOFF_S, BASE_BACKOFF_S * 2**attempt)
            delay = ceiling / 2 + random.uniform(0, ceiling / 2)
            if log is not None:
                log(
                    f"{table.qualified_name} {what}: a lock was not granted within "
                    f"{timeouts.lock_ms} ms (another session holds it); retry "
                    f"{attempt + 1}/{timeouts.lock_retries} in {delay:.1f} s"
                )
            time.sleep(delay)
    raise AssertionError("unreachable")

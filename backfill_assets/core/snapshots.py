"""Snapshots: the rows a write replaced, kept so a partition can be rolled back.

A snapshot is written by the write's own DELETE, inside its transaction, so it holds exactly
what the partition held at that moment, and it is tied to the write's audit row
(``audit_id``). One snapshot table per target table, in schema ``backfill_snapshots``. Snapshots
expire after the table's retention, and rows about an erased person are purged from all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from uuid import UUID

import psycopg
from psycopg import sql

from backfill_assets.core.database import column_names, relation_exists, schema_changes
from backfill_assets.core.strategies import strategy_of
from backfill_assets.core.tables import TableSpec
from backfill_assets.core.writer import KeptRows

SCHEMA = "backfill_snapshots"
SUMMARIZE = sql.SQL("WITH (autosummarize = on)")


def snapshot_relation(table: TableSpec) -> tuple[str, str]:
    """``(schema, name)`` of the table that keeps ``table``'s replaced rows."""
    return SCHEMA, f"{table.schema}__{table.name}"


def snapshot_table(table: TableSpec) -> sql.Identifier:
    return sql.Identifier(*snapshot_relation(table))


def ensure_snapshot_table(conn: psycopg.Connection, table: TableSpec) -> None:
    """Create where the table's replaced rows are kept, as its strategy keeps them; no DDL (and
    so no lock behind other runs' writes into it) when it is current."""
    strategy_of(table).ensure_snapshots(conn, table)


def ensure_row_snapshots(
    conn: psycopg.Connection,
    table: TableSpec,
    columns: dict[str, str],
    statements: Callable[[], list[sql.Composed]],
) -> None:
    """A snapshot table of rows (``columns``: name -> type, after ``audit_id``, ``taken_at`` and
    ``write_id``): created by ``statements()`` when it lacks any of them, and given the columns
    added to the table after its first snapshot (see ``contract.check_target``)."""
    target = snapshot_table(table)
    wanted = {"audit_id", "taken_at", "write_id", *columns}
    if wanted <= column_names(conn, *snapshot_relation(table)):
        return
    with schema_changes(conn):
        for statement in statements():
            conn.execute(statement)
        kept = column_names(conn, *snapshot_relation(table))
        for name, kind in columns.items():
            if name not in kept:
                conn.execute(
                    sql.SQL("ALTER TABLE {} ADD COLUMN {} {}").format(
                        target, sql.Identifier(name), sql.SQL(kind)
                    )
                )


def ensure_schema(conn: psycopg.Connection) -> None:
    """The ``backfill_snapshots`` schema, for strategies that move whole tables into it."""
    if not relation_exists_schema(conn, SCHEMA):
        with schema_changes(conn):
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SCHEMA)))


def row_statements(table: TableSpec) -> list[sql.Composed]:
    """A snapshot table holding whole rows of ``table`` (``LIKE`` it), tagged by write."""
    target = snapshot_table(table)
    return [
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SCHEMA)),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (audit_id bigint NOT NULL, "
            "taken_at timestamptz NOT NULL DEFAULT now(), LIKE {})"
        ).format(target, table.identifier),
        # The write's random id beside its audit id: audit ids restart when the audit table is
        # recreated, and a rollback must never take another write's rows for its own.
        sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS write_id uuid").format(target),
        # Every write reads its own snapshot back (the diff) and a rollback reads one: a B-tree
        # on the ever-growing audit id, cheap to extend. Times only grow too: BRIN, next to free
        # to maintain. No index by subject: erasure is rare and may scan; three B-trees doubled
        # the cost of keeping the old rows.
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (audit_id)").format(
            sql.Identifier(f"{table.schema}__{table.name}_audit_idx"), target
        ),
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} USING brin (taken_at) {}").format(
            sql.Identifier(f"{table.schema}__{table.name}_taken_brin"), target, SUMMARIZE
        ),
    ]


def kept_rows(table: TableSpec, audit_id: int, write_id: UUID | None) -> KeptRows:
    """Where the write with audit row ``audit_id`` (and random ``write_id``) keeps the rows its
    DELETE removes.

    The DELETE inserts them here directly (``writer.KeptRows``): one copy of the old rows, not a
    temporary table copied again. They commit with the write or vanish with its rollback.
    """
    return KeptRows(snapshot_table(table), (("audit_id", audit_id), ("write_id", write_id)))


OF_WRITE = sql.SQL(
    "audit_id = %(snapshot_id)s AND write_id IS NOT DISTINCT FROM %(write_id)s::uuid"
)
"""The snapshot rows of one write: ``%(snapshot_id)s`` is its audit id, ``%(write_id)s`` its random
id (NULL for snapshots older than write ids)."""


def restore_source(table: TableSpec) -> sql.Composed:
    """The rows of one write's snapshot (``OF_WRITE``) inside the partition's window (its own
    ``%(start)s``/``%(end)s``), as a source query for the writer."""
    return sql.SQL("SELECT {} FROM {} WHERE {} AND {}").format(
        table.column_list(), snapshot_table(table), OF_WRITE, table.window_filter()
    )


def relation_exists_schema(conn: psycopg.Connection, schema: str) -> bool:
    return bool(
        conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", [schema]).fetchone()[0]
    )


def expire(conn: psycopg.Connection, table: TableSpec, retention_days: int | None = None) -> int:
    """Drop what the table's writes kept longer ago than its retention (or ``retention_days``);
    returns the rows dropped."""
    days = table.snapshot_retention_days if retention_days is None else retention_days
    return strategy_of(table).expire_snapshots(conn, table, days)


def expire_rows(conn: psycopg.Connection, table: TableSpec, days: int) -> int:
    """Delete the rows of the table's snapshot table taken more than ``days`` ago."""
    query = sql.SQL("DELETE FROM {} WHERE taken_at < now() - make_interval(days => %s)").format(
        snapshot_table(table)
    )
    return conn.execute(query, [days]).rowcount


def erase_subject(conn: psycopg.Connection, tables: list[TableSpec], subject: object) -> dict:
    """Delete every snapshot row about ``subject`` (e.g. a customer id); one transaction."""
    erased: dict[str, int] = {}
    with conn.transaction():
        for table in tables:
            if table.subject_column is None:
                continue
            erased[table.qualified_name] = sum(
                conn.execute(
                    sql.SQL("DELETE FROM {} WHERE {} = %s").format(
                        sql.Identifier(SCHEMA, name), sql.Identifier(table.subject_column)
                    ),
                    [subject],
                ).rowcount
                for name in strategy_of(table).snapshot_tables(conn, table)
            )
    return erased


def existing_snapshot_table(conn: psycopg.Connection, table: TableSpec) -> list[str]:
    """The table's snapshot table's name, if it exists (``Strategy.snapshot_tables`` of the
    strategies that keep rows in one)."""
    schema, name = snapshot_relation(table)
    return [name] if relation_exists(conn, schema, name) else []

"""Snapshots: the rows a write replaced, kept so a partition can be rolled back.

A snapshot is written by the write's own DELETE, inside its transaction, so it holds exactly
what the partition held at that moment, and it is tied to the write's audit row
(``audit_id``). One snapshot table per target table, in schema ``backfill_snapshots``. Snapshots
expire after the table's retention, and rows about an erased person are purged from all of them.
"""

from __future__ import annotations

from uuid import UUID

import psycopg
from psycopg import sql

from backfill_assets.core.audit import TABLE as AUDIT_TABLE
from backfill_assets.core.database import column_names, relation_exists, schema_changes
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
    """Create the table's snapshot table, or add the columns it lacks; no DDL (and so no lock
    behind other runs' writes into it) when it is current."""
    if table.swapped:
        # A swap keeps each replaced partition as a table of its own, moved here (core/swap.py).
        if not relation_exists_schema(conn, SCHEMA):
            with schema_changes(conn):
                conn.execute(
                    sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SCHEMA))
                )
        return
    target = snapshot_table(table)
    columns = (
        _in_place_columns(conn, table)
        if table.in_place
        else {c.name: c.type for c in table.columns}
    )
    wanted = {"audit_id", "taken_at", "write_id", *columns}
    if wanted <= column_names(conn, *snapshot_relation(table)):
        return
    statements = _in_place_statements(conn, table) if table.in_place else _statements(table)
    with schema_changes(conn):
        for statement in statements:
            conn.execute(statement)
        # A column added to the table after its first snapshot (see contract.check_target).
        kept = column_names(conn, *snapshot_relation(table))
        for name, kind in columns.items():
            if name not in kept:
                conn.execute(
                    sql.SQL("ALTER TABLE {} ADD COLUMN {} {}").format(
                        target, sql.Identifier(name), sql.SQL(kind)
                    )
                )


def _statements(table: TableSpec) -> list[sql.Composed]:
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


def written_column(column: str) -> str:
    """The snapshot column holding the value an in-place write gave ``column``: a rollback
    restores a row only while it still holds that value (the application may have written since)."""
    return f"{column}__written"


def _live_types(conn: psycopg.Connection, table: TableSpec) -> dict[str, str]:
    """The table's own column types (with their modifiers), as PostgreSQL prints them."""
    rows = conn.execute(
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped",
        [table.identifier.as_string(conn)],
    ).fetchall()
    return dict(rows)


def _in_place_columns(conn: psycopg.Connection, table: TableSpec) -> dict[str, str]:
    """Snapshot columns of an in-place table and their types, taken from the table itself."""
    assert table.batched_update is not None
    types = _live_types(conn, table)
    columns = {c.name: types.get(c.name, c.type) for c in table.columns}
    for name in table.batched_update.columns:
        columns[written_column(name)] = columns[name]
    return columns


def _in_place_statements(conn: psycopg.Connection, table: TableSpec) -> list[sql.Composed]:
    """The snapshot of an in-place update keeps only the declared columns (key, partition column,
    the columns it sets) of the rows it changed, and the values it wrote, typed as in the table
    and without its constraints (old values are NULL where a column is being filled). One row per
    write and key: a row updated twice by one write (a restarted pass) keeps its first, original
    values (``ON CONFLICT DO NOTHING``)."""
    target = snapshot_table(table)
    columns = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(kind))
        for name, kind in _in_place_columns(conn, table).items()
    )
    keys = sql.SQL(", ").join(sql.Identifier(k) for k in table.unique_key)
    return [
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SCHEMA)),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (audit_id bigint NOT NULL, "
            "taken_at timestamptz NOT NULL DEFAULT now(), write_id uuid, {})"
        ).format(target, columns),
        sql.SQL("CREATE UNIQUE INDEX IF NOT EXISTS {} ON {} (audit_id, {})").format(
            sql.Identifier(f"{table.schema}__{table.name}_audit_key"), target, keys
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


def swapped_name(table: TableSpec, write_id: UUID) -> str:
    """A partition replaced by a swap, kept under the random id of the write that replaced it."""
    return f"{_swapped_prefix(table)}{write_id.hex[:12]}"


def _swapped_prefix(table: TableSpec) -> str:
    return f"{table.schema[:20]}__{table.name[:24]}__w"


def swapped_snapshots(conn: psycopg.Connection, table: TableSpec) -> list[str]:
    """Names of the kept partitions of a ``partition_swap`` table, in ``backfill_snapshots``."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relkind = 'r' AND starts_with(c.relname, %s) "
        "ORDER BY c.relname",
        [SCHEMA, _swapped_prefix(table)],
    ).fetchall()
    return [name for (name,) in rows]


def expire(conn: psycopg.Connection, table: TableSpec, retention_days: int | None = None) -> int:
    days = table.snapshot_retention_days if retention_days is None else retention_days
    if table.swapped:
        return _expire_swapped(conn, table, days)
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
            if table.swapped:
                erased[table.qualified_name] = sum(
                    conn.execute(
                        sql.SQL("DELETE FROM {} WHERE {} = %s").format(
                            sql.Identifier(SCHEMA, name), sql.Identifier(table.subject_column)
                        ),
                        [subject],
                    ).rowcount
                    for name in swapped_snapshots(conn, table)
                )
                continue
            if not relation_exists(conn, *snapshot_relation(table)):
                erased[table.qualified_name] = 0
                continue
            query = sql.SQL("DELETE FROM {} WHERE {} = %s").format(
                snapshot_table(table), sql.Identifier(table.subject_column)
            )
            erased[table.qualified_name] = conn.execute(query, [subject]).rowcount
    return erased


def _expire_swapped(conn: psycopg.Connection, table: TableSpec, days: int) -> int:
    """Drop the kept partitions whose write ended more than ``days`` ago; returns their rows.

    A kept partition is named after its write's random id (``swap.snapshot_name``); the audit
    row with that id says when the write ended.
    """
    old = conn.execute(
        sql.SQL(
            "SELECT write_id FROM {} WHERE table_name = %s AND write_id IS NOT NULL AND "
            "ended_at < now() - make_interval(days => %s)"
        ).format(AUDIT_TABLE),
        [table.qualified_name, days],
    ).fetchall()
    kept = set(swapped_snapshots(conn, table))
    dropped = 0
    for (write_id,) in old:
        name = swapped_name(table, write_id)
        if name in kept:
            target = sql.Identifier(SCHEMA, name)
            dropped += conn.execute(sql.SQL("SELECT count(*) FROM {}").format(target)).fetchone()[0]
            conn.execute(sql.SQL("DROP TABLE {}").format(target))
    return dropped

"""Erasing one person: where their rows are, whether the source still holds them, proof that none
remain, and a record of the erasure that holds nothing about them.

An erasure is a backfill like any other: the person is erased at the source first (by the
application, its own duty), then every partition that still holds their rows is rewritten from
it, with the intended-shrink override, and the snapshots those rewrites and earlier ones kept are
purged. This module is the SQL around that backfill; ``tooling.erasure`` runs it.

A *subject relation* is any relation with a column naming the person: a declared table's
``subject_column``, or a dbt model's ``meta: {subject_column: ...}``. The subject is bound as a
parameter cast to that column's own type, so an index on it is used and a value of the wrong
type is refused before anything is touched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import date

import psycopg
from psycopg import sql

from backfill_assets.core.audit import SCHEMA as AUDIT_SCHEMA
from backfill_assets.core.database import relation_exists
from backfill_assets.core.guards import fetch_per_window
from backfill_assets.core.partitioning import Partitioning
from backfill_assets.core.snapshots import SCHEMA as SNAPSHOT_SCHEMA
from backfill_assets.core.strategies import strategy_of
from backfill_assets.core.tables import TableSpec

ERASURES = sql.Identifier(AUDIT_SCHEMA, "erasures")


class ErasureError(ValueError):
    """The erasure cannot go on; nothing was changed."""


@dataclass(frozen=True)
class SubjectRelation:
    """A relation holding rows about people, and how to find one person's rows and days in it."""

    schema: str
    name: str
    subject_column: str
    day_column: str | None
    """The column the relation is partitioned on (None: the relation is not partitioned)."""

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def identifier(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    @classmethod
    def of(cls, table: TableSpec) -> SubjectRelation:
        assert table.subject_column is not None
        return cls(table.schema, table.name, table.subject_column, table.partition_column)


def column_type(conn: psycopg.Connection, relation: sql.Identifier, column: str) -> str | None:
    """The column's type as PostgreSQL spells it, or None when the relation or column is absent."""
    found = conn.execute(
        "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute AS a "
        "WHERE a.attrelid = to_regclass(%s) AND a.attname = %s AND NOT a.attisdropped",
        [relation.as_string(conn), column],
    ).fetchone()
    return found[0] if found else None


def holds(conn: psycopg.Connection, kind: str, subject: str) -> bool:
    """Whether a column of type ``kind`` can hold ``subject`` at all (a bigint column cannot
    hold an email address, so it holds no row about that person)."""
    try:
        with conn.transaction():
            conn.execute(sql.SQL("SELECT %s::{}").format(sql.SQL(kind)), [subject])
    except psycopg.errors.DataError:
        return False
    return True


def _matches(
    conn: psycopg.Connection, relation: SubjectRelation, subject: str
) -> sql.Composed | None:
    """``subject_column = %s::its type``; None when the column's type cannot hold the value."""
    kind = column_type(conn, relation.identifier, relation.subject_column)
    if kind is None:
        raise ErasureError(
            f"{relation.qualified_name} has no column {relation.subject_column!r}, declared as the "
            "column naming the person; fix subject_column"
        )
    if not holds(conn, kind, subject):
        return None
    return sql.SQL("{} = %s::{}").format(sql.Identifier(relation.subject_column), sql.SQL(kind))


def exists(conn: psycopg.Connection, relation: SubjectRelation) -> bool:
    return relation_exists(conn, relation.schema, relation.name)


def subject_rows(
    conn: psycopg.Connection,
    relation: SubjectRelation,
    subject: str,
    partitioning: Partitioning | None = None,
) -> dict[str, int]:
    """Rows about the subject per partition key of ``partitioning`` (days when not given), or
    under ``""`` for an unpartitioned relation; empty when the relation does not exist."""
    if not exists(conn, relation):
        return {}
    where = _matches(conn, relation, subject)
    if where is None:
        return {}
    if relation.day_column is None:
        count = conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE {}").format(relation.identifier, where),
            [subject],
        ).fetchone()[0]
        return {"": count} if count else {}
    partitioning = partitioning or Partitioning("", "day", date(1, 1, 1))
    if partitioning.granularity == "hour":
        # A mart's time column may be a timestamptz where its table's is a timestamp, or the
        # reverse: its own type says whether its values are read in UTC.
        kind = column_type(conn, relation.identifier, relation.day_column)
        zoned = kind == "timestamp with time zone"
        partitioning = replace(partitioning, zoned=zoned)
    query = sql.SQL(
        "SELECT {start}, count(*) FROM {relation} WHERE {where} GROUP BY 1 ORDER BY 1"
    ).format(
        start=partitioning.start_of(sql.Identifier(relation.day_column)),
        relation=relation.identifier,
        where=where,
    )
    found = conn.execute(query, [subject]).fetchall()
    return {partitioning.key_of(start): count for start, count in found}


def source_still_yields(
    conn: psycopg.Connection, table: TableSpec, keys: list[str], subject: str
) -> dict[str, int]:
    """Rows about the subject that the table's query yields now, per partition (those with any):
    a rewrite would put them back, so the erasure waits for the source."""
    kind = subject_type(table)
    if not keys or not holds(conn, kind, subject):
        return {}
    found = fetch_per_window(
        conn,
        table,
        table.partitioning.windows(keys),
        sql.SQL("count(*)"),
        sql.SQL("src.{} = %(subject)s::{}").format(
            sql.Identifier(table.subject_column), sql.SQL(kind)
        ),
        {"subject": subject},
    )
    return {key: rows for key, rows in sorted(found) if rows}


def subject_type(table: TableSpec) -> str:
    """The declared type of the table's subject column (the table may not exist yet)."""
    return next(c.type for c in table.columns if c.name == table.subject_column)


def snapshot_relations(conn: psycopg.Connection, table: TableSpec) -> list[SubjectRelation]:
    """The snapshot tables that may hold the table's old rows (one, or one per write: its
    strategy knows), as subject relations."""
    assert table.subject_column is not None
    names = strategy_of(table).snapshot_tables(conn, table)
    return [SubjectRelation(SNAPSHOT_SCHEMA, n, table.subject_column, None) for n in names]


def remaining(
    conn: psycopg.Connection, relations: list[SubjectRelation], subject: str
) -> dict[str, int]:
    """Rows about the subject left in each relation (those with any)."""
    left = {}
    for relation in relations:
        rows = sum(subject_rows(conn, relation, subject).values())
        if rows:
            left[relation.qualified_name] = rows
    return left


@dataclass
class ErasureRecord:
    """What the audit keeps of an erasure: why, who, which backfills, how many rows went from
    where, and that none remain. Nothing in it identifies the person."""

    reason: str
    requested_by: str
    backfill_ids: list[str] = field(default_factory=list)
    rows_erased: dict[str, int] = field(default_factory=dict)
    """Per relation (tables, marts, snapshots), the rows about the person that were removed."""
    relations_checked: list[str] = field(default_factory=list)


def ensure_erasures_table(conn: psycopg.Connection) -> None:
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(AUDIT_SCHEMA)))
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} ("
            " id bigserial PRIMARY KEY,"
            " erased_at timestamptz NOT NULL DEFAULT now(),"
            " reason text NOT NULL,"
            " requested_by text NOT NULL,"
            " backfill_ids text[] NOT NULL,"
            " rows_erased jsonb NOT NULL,"
            " relations_checked text[] NOT NULL,"
            " rows_remaining bigint NOT NULL)"
        ).format(ERASURES)
    )


def record_erasure(conn: psycopg.Connection, record: ErasureRecord) -> int:
    """Store the record, stating that no row about the person remains in the checked relations
    (the caller verified it in this transaction); returns its id."""
    ensure_erasures_table(conn)
    return conn.execute(
        sql.SQL(
            "INSERT INTO {} (reason, requested_by, backfill_ids, rows_erased, relations_checked, "
            "rows_remaining) VALUES (%s, %s, %s, %s::jsonb, %s, 0) RETURNING id"
        ).format(ERASURES),
        [
            record.reason,
            record.requested_by,
            record.backfill_ids,
            json.dumps(record.rows_erased, sort_keys=True),
            record.relations_checked,
        ],
    ).fetchone()[0]


def recent_erasures(conn: psycopg.Connection, limit: int = 20):
    """The newest erasure records as a pandas DataFrame, for people to read."""
    import pandas as pd

    ensure_erasures_table(conn)
    rows = conn.execute(
        sql.SQL(
            "SELECT id, erased_at, reason, requested_by, array_to_string(backfill_ids, ' '), "
            "rows_erased::text, cardinality(relations_checked), rows_remaining FROM {} "
            "ORDER BY id DESC LIMIT %s"
        ).format(ERASURES),
        [limit],
    ).fetchall()
    columns = [
        "id",
        "erased_at",
        "reason",
        "requested_by",
        "backfills",
        "rows_erased",
        "relations_checked",
        "rows_remaining",
    ]
    return pd.DataFrame(rows, columns=columns)

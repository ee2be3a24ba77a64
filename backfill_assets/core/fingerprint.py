"""Row count, checksum and measure sums of one partition, computed in one pass in the database.

The checksum is order-independent: the sum of a 64-bit hash of every row's text (all columns),
folded with the row count into an md5. Two partitions with the same checksum hold the same
multiset of rows; computing it needs no sort, so it costs one scan. Used by tests, the after-write
verification (``reconcile``), rollback and the audit trail: all of them through ``CHECKSUM``, so a
checksum in the audit can be compared with one computed later.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal

import psycopg
from psycopg import sql

from backfill_assets.core.partitioning import PartitionWindow
from backfill_assets.core.tables import TableSpec

ROW_HASH = sql.SQL("hashtextextended({row_text}, 0)")
"""64-bit hash of a row's text (a bigint). ``sum`` of bigints is a numeric, so the sum over a
partition never overflows; PostgreSQL adds them in 128-bit integers, faster than numerics, and
the total is the same number (checksums computed before and after this change are equal)."""

CHECKSUM = sql.SQL("md5(count(*)::text || ':' || coalesce(sum({row_hash}), 0)::text)")
"""Aggregate over rows carrying ``row_hash``: the partition's checksum."""


def row_text(table: TableSpec, prefix: str | None = None) -> sql.Composed:
    """Every column of a row as one text value, in declaration order."""
    return sql.SQL("ROW({})::text").format(table.column_list(prefix))


def checksum_of(row_hash: sql.Composable) -> sql.Composed:
    return CHECKSUM.format(row_hash=row_hash)


@dataclass(frozen=True)
class Fingerprint:
    rows: int
    checksum: str
    sums: dict[str, Decimal] = field(default_factory=dict)
    """Sum of each of the table's measures over the partition."""


def fingerprint_of(
    conn: psycopg.Connection,
    table: TableSpec,
    relation: sql.Composable,
    window: PartitionWindow,
    bound: Mapping[str, object] | None = None,
) -> Fingerprint:
    """Fingerprint of the window's rows of ``relation``, a table (or subquery) shaped like
    ``table``; ``bound``, values of its placeholders."""
    query = sql.SQL(
        "SELECT count(*), {checksum} {sums} FROM {relation} AS t WHERE {window}"
    ).format(
        checksum=checksum_of(ROW_HASH.format(row_text=row_text(table, "t"))),
        sums=sql.SQL("").join(
            sql.SQL(", sum({})").format(sql.Identifier(m)) for m in table.measures
        ),
        relation=relation,
        window=table.window_filter(),
    )
    rows, checksum, *totals = conn.execute(
        query, {**window.as_params(), **(bound or {})}
    ).fetchone()
    return Fingerprint(rows=rows, checksum=checksum, sums=sums_of(table, totals))


def sums_of(table: TableSpec, totals) -> dict[str, Decimal]:
    return {m: Decimal(t or 0) for m, t in zip(table.measures, totals, strict=True)}


def partition_fingerprint(
    conn: psycopg.Connection, table: TableSpec, window: PartitionWindow
) -> Fingerprint:
    return fingerprint_of(conn, table, table.identifier, window)

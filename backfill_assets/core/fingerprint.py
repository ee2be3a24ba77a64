"""Row count, checksum and measure sums of one partition, computed in one pass in the database.

The checksum hashes every column of every row in a fixed order, so two partitions with the same
checksum hold byte-identical rows. Used by tests, checks and the audit trail.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

import psycopg
from psycopg import sql

from backfill_assets.core.partitioning import PartitionWindow
from backfill_assets.core.tables import TableSpec


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
) -> Fingerprint:
    """Fingerprint of the window's rows of ``relation``, a table shaped like ``table``."""
    measures = [sql.Identifier(m) for m in table.measures]
    query = sql.SQL(
        "SELECT count(*), coalesce(md5(string_agg(row_text, E'\\n' ORDER BY row_text)), '') {sums} "
        "FROM (SELECT ({columns})::text AS row_text {measures} FROM {relation} WHERE {window}) AS t"
    ).format(
        sums=sql.SQL("").join(sql.SQL(", sum({})").format(m) for m in measures),
        columns=table.column_list(),
        measures=sql.SQL("").join(sql.SQL(", {}").format(m) for m in measures),
        relation=relation,
        window=table.window_filter(),
    )
    rows, checksum, *totals = conn.execute(query, window.as_params()).fetchone()
    sums = {m: Decimal(t or 0) for m, t in zip(table.measures, totals, strict=True)}
    return Fingerprint(rows=rows, checksum=checksum, sums=sums)


def partition_fingerprint(
    conn: psycopg.Connection, table: TableSpec, window: PartitionWindow
) -> Fingerprint:
    return fingerprint_of(conn, table, table.identifier, window)

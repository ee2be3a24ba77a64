"""Which partitions no longer match their source: late-arriving rows, corrections upstream.

Every successful write records the checksum of the rows it left (``checksum_after`` in the
audit: the rows the table's query yielded at that moment). Computing the same checksum over what
the query yields *now* and comparing tells, per partition, whether the source changed since the
partition was last written, without storing anything more and reading the target not at all. One
statement measures every window (the query runs once per window, ``LATERAL``), with each column
cast to its declared type so the text hashed is the text the table would hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from backfill_assets.core.audit import TABLE as AUDIT_TABLE
from backfill_assets.core.audit import ensure_audit_table
from backfill_assets.core.fingerprint import ROW_HASH, checksum_of
from backfill_assets.core.guards import fetch_per_window
from backfill_assets.core.partitioning import PartitionWindow
from backfill_assets.core.tables import TableSpec


@dataclass(frozen=True)
class Staleness:
    partition_key: str
    written_rows: int | None
    """Rows the latest write left; None when the partition was never written."""
    source_rows: int
    changed: bool
    """The source yields other rows now than the latest write wrote."""

    @property
    def never_written(self) -> bool:
        return self.written_rows is None


def staleness(
    conn: psycopg.Connection, table: TableSpec, windows: list[PartitionWindow]
) -> list[Staleness]:
    """For each window: rows written last time, rows the source yields now, and whether they
    differ (by checksum)."""
    if not windows:
        return []
    ensure_audit_table(conn)
    latest = dict(
        (key, (rows, checksum))
        for key, rows, checksum in conn.execute(
            sql.SQL(
                "SELECT DISTINCT ON (partition_key) partition_key, rows_after, checksum_after "
                "FROM {} WHERE table_name = %s AND status = 'succeeded' "
                "AND partition_key = ANY(%s) ORDER BY partition_key, id DESC"
            ).format(AUDIT_TABLE),
            [table.qualified_name, [w.key for w in windows]],
        )
    )
    typed = sql.SQL(", ").join(
        sql.SQL("{}::{}").format(sql.Identifier("src", c.name), sql.SQL(c.type))
        for c in table.columns
    )
    measured = fetch_per_window(
        conn,
        table,
        windows,
        sql.SQL("count(*), {}").format(
            checksum_of(ROW_HASH.format(row_text=sql.SQL("ROW({})::text").format(typed)))
        ),
    )
    found = []
    for key, rows, checksum in measured:
        written = latest.get(key)
        found.append(
            Staleness(
                partition_key=key,
                written_rows=written[0] if written else None,
                source_rows=rows,
                changed=written is not None and written[1] != checksum,
            )
        )
    return sorted(found, key=lambda s: s.partition_key)

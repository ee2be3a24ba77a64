"""A declared ``unique_key`` names one row of the whole table, not one row of a partition.

A key can move between partitions at the source: an order line's ship date corrected from one
day to the next. Backfilling the day it moved to, alone, would insert it there while the day it
left still holds it: the table would hold the key twice with every per-partition check green.
So every write that adds rows looks the window's new keys up in the rest of the table, inside its
transaction, before it commits (``keys_elsewhere``); a key found there refuses the window, naming
a few of the keys, how many there are and the partitions that hold them. Writing those partitions
too makes it pass: in the same run (``core/run.py`` retries such a window once, after the run's
other windows, when the partitions holding its keys are among them), or first, in an earlier run.

The lookup is an index probe per key of the window where the table has an index led by the key
(the project creates one with the tables it creates); without one PostgreSQL scans the table
once per window. ``backfill-assets tables`` says which, and reports the keys an existing table
already holds in more than one partition (``duplicated_across``).
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from backfill_assets.core.database import relation_exists
from backfill_assets.core.partitioning import PartitionWindow
from backfill_assets.core.tables import TableSpec

SHOWN_KEYS = 5
"""Keys a message names; the count says how many there are."""
SHOWN_PARTITIONS = 1000
"""Partitions a lookup reports at most (a message names a few of them)."""


@dataclass(frozen=True)
class KeysElsewhere:
    """Keys of one window's new rows that other partitions of the table hold."""

    count: int
    keys: tuple[str, ...]
    """A few of them, as ``(value, ...)``."""
    partitions: tuple[str, ...]
    """The partition keys holding them, in order."""

    @property
    def holders(self) -> str:
        """The partitions holding the keys, as a message names them (a few, and how many more)."""
        return _listed(self.partitions)

    def describe(self, table: TableSpec, window: PartitionWindow) -> str:
        return (
            f"{self.count} value(s) of ({', '.join(table.unique_key)}) in {window.key}'s new "
            f"rows are already held by {self.holders} (e.g. {', '.join(self.keys)}): "
            "the source moved them from there"
        )

    def advice(self, window: PartitionWindow) -> str:
        held = self.holders
        return (
            f"backfill {held} together with {window.key} (one range: a run writes the "
            f"partitions the keys left before retrying {window.key}), or {held} first"
        )


class KeysHeldElsewhere(Exception):
    """Raised by a write that looks its source's keys up before writing (``merge``)."""

    def __init__(self, table: TableSpec, window: PartitionWindow, found: KeysElsewhere) -> None:
        self.found = found
        super().__init__(
            f"refused to write {table.qualified_name} {window.key}: "
            f"{found.describe(table, window)}. Nothing was written. {found.advice(window)}"
        )


def _listed(partitions: tuple[str, ...], shown: int = 5) -> str:
    more = f" and {len(partitions) - shown} more" if len(partitions) > shown else ""
    return ", ".join(partitions[:shown]) + more


def keys_elsewhere(
    conn: psycopg.Connection,
    table: TableSpec,
    window: PartitionWindow,
    new_rows: sql.Composable | None = None,
) -> KeysElsewhere | None:
    """The keys of ``new_rows``' window (default: the table's own, as just written in this
    transaction) that the table holds outside the window; None when there are none."""
    if not table.unique_key:
        return None
    new_keys = sql.SQL("(SELECT DISTINCT {keys} FROM {new} AS n WHERE {in_window})").format(
        keys=sql.SQL(", ").join(sql.Identifier(k) for k in table.unique_key),
        new=new_rows or table.identifier,
        in_window=table.window_filter(),
    )
    query = sql.SQL("WITH {} SELECT {}").format(
        found_elsewhere(conn, table, new_keys), ELSEWHERE_COLUMNS
    )
    return elsewhere_of(table, conn.execute(query, window.as_params()).fetchone())


ELSEWHERE_COLUMNS = sql.SQL(
    "(SELECT count(DISTINCT k) FROM found), "
    "ARRAY(SELECT DISTINCT k FROM found ORDER BY k LIMIT {shown_keys}), "
    "ARRAY(SELECT DISTINCT p FROM found ORDER BY p LIMIT {shown_partitions})"
).format(shown_keys=sql.Literal(SHOWN_KEYS), shown_partitions=sql.Literal(SHOWN_PARTITIONS))
"""The three values ``elsewhere_of`` reads, from the CTE ``found_elsewhere`` defines."""


def found_elsewhere(
    conn: psycopg.Connection, table: TableSpec, new_keys: sql.Composable
) -> sql.Composed:
    """The CTE ``found (k, p)``: each key of ``new_keys`` (a relation of distinct keys, columns
    named as the table's) that the table holds outside the window (``%(start)s``/``%(end)s``),
    as text, and the start of the partition holding it. A statement can compute it beside
    other things (``reconcile.verify`` does, from the new rows it already reads)."""
    part = sql.Identifier("t", table.partition_column)
    # With an index led by the key, one probe per key (LATERAL; OFFSET 0 keeps PostgreSQL from
    # flattening it into a join): its estimate of the rows outside the window otherwise picks a
    # scan of the whole table (make bench: 17 ms against 4 ms a day of 2,400 rows in 207,000).
    # Without one, one hash join over a scan.
    join = (
        "CROSS JOIN LATERAL (SELECT * FROM {table} AS t WHERE {same} OFFSET 0) AS t"
        if has_index_led_by_key(conn, table)
        else "JOIN {table} AS t ON {same}"
    )
    return sql.SQL(
        "found AS MATERIALIZED (SELECT ROW({t_keys})::text AS k, {start} AS p FROM {new} AS n "
        + join
        + " WHERE NOT ({part} >= %(start)s AND {part} < %(end)s))"
    ).format(
        t_keys=sql.SQL(", ").join(sql.Identifier("t", k) for k in table.unique_key),
        start=_partition_start(table, part),
        part=part,
        new=new_keys,
        table=table.identifier,
        same=sql.SQL(" AND ").join(
            sql.SQL("{} = {}").format(sql.Identifier("t", k), sql.Identifier("n", k))
            for k in table.unique_key
        ),
    )


def elsewhere_of(table: TableSpec, values) -> KeysElsewhere | None:
    """The ``ELSEWHERE_COLUMNS`` of a statement as a finding; None when no key was found."""
    count, found_keys, starts = values
    if not count:
        return None
    return KeysElsewhere(count, tuple(found_keys), _partition_keys(table, starts))


def _partition_start(table: TableSpec, column: sql.Composable) -> sql.Composed:
    """The start of the partition holding ``column``'s value (a date, or a UTC hour)."""
    return table.partitioning.start_of(column)


def _partition_keys(table: TableSpec, starts) -> tuple[str, ...]:
    return tuple(table.partitioning.key_of(start) for start in starts)


@dataclass(frozen=True)
class Duplicates:
    """Keys an existing table holds in more than one partition."""

    count: int
    keys: tuple[str, ...]
    partitions: tuple[str, ...]

    def describe(self, table: TableSpec) -> str:
        return (
            f"{self.count} value(s) of ({', '.join(table.unique_key)}) are held by more than one "
            f"partition (e.g. {', '.join(self.keys)}, in {_listed(self.partitions)}): backfill "
            "those partitions together, in one range, to keep each key in the partition its "
            "source gives it now"
        )


def duplicated_across(conn: psycopg.Connection, table: TableSpec) -> Duplicates | None:
    """Keys the table holds in more than one partition (one grouped pass over the table)."""
    keys = sql.SQL(", ").join(sql.Identifier(k) for k in table.unique_key)
    query = sql.SQL(
        "WITH d AS MATERIALIZED (SELECT ROW({keys})::text AS k, array_agg(DISTINCT {start}) "
        "AS ps FROM {table} GROUP BY {keys} HAVING count(DISTINCT {start}) > 1) "
        "SELECT (SELECT count(*) FROM d), ARRAY(SELECT k FROM d ORDER BY k LIMIT {shown}), "
        "ARRAY(SELECT DISTINCT p FROM d, unnest(ps) AS p ORDER BY p LIMIT {partitions})"
    ).format(
        keys=keys,
        start=_partition_start(table, sql.Identifier(table.partition_column)),
        table=table.identifier,
        shown=sql.Literal(SHOWN_KEYS),
        partitions=sql.Literal(SHOWN_PARTITIONS),
    )
    count, found_keys, days = conn.execute(query).fetchone()
    if not count:
        return None
    return Duplicates(count, tuple(found_keys), _partition_keys(table, days))


def has_index_led_by_key(conn: psycopg.Connection, table: TableSpec) -> bool:
    """The table has a valid index whose first column is the key's first column (what the
    lookup of a window's keys probes)."""
    return bool(
        conn.execute(
            "SELECT count(*) FROM pg_index AS i JOIN pg_attribute AS a ON a.attrelid = "
            "i.indrelid AND a.attnum = i.indkey[0] WHERE i.indrelid = to_regclass(%s) "
            "AND i.indisvalid AND i.indpred IS NULL AND a.attname = %s",
            [table.identifier.as_string(conn), table.unique_key[0]],
        ).fetchone()[0]
    )


def key_report(conn: psycopg.Connection, table: TableSpec) -> tuple[bool, str]:
    """``backfill-assets tables``' line on the table's keys: (fine, text). Duplicates across
    partitions are not fine; a missing index is fine but slow, and the line says what to run."""
    if not table.unique_key:
        return True, "no unique_key declared"
    if not relation_exists(conn, table.schema, table.name):
        return True, "not checked: the table does not exist yet"
    duplicates = duplicated_across(conn, table)
    if duplicates:
        return False, f"error: {duplicates.describe(table)}"
    if has_index_led_by_key(conn, table):
        return True, "unique across partitions"
    columns = ", ".join(table.unique_key)
    return True, (
        f"unique across partitions; no index led by {table.unique_key[0]}: each write scans the "
        f"table to look its new keys up in the other partitions. Create one: CREATE INDEX "
        f"CONCURRENTLY ON {table.qualified_name} ({columns})"
    )

"""Table specs: what a partitioned table is, declared once.

A spec names the table, its partitioning, its columns and its unique key, and points at the SQL
that computes one partition's rows. Specs are read from one YAML file per table (``registry``);
the writer, the checks and the audit all read them, so table and column names are never repeated
in SQL strings.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import psycopg
from psycopg import sql

from backfill_assets.core.database import schema_changes
from backfill_assets.core.partitioning import Partitioning
from backfill_assets.core.session_limits import SessionLimits


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    nullable: bool = True
    check: str | None = None
    """A CHECK expression over this column, e.g. ``net_amount >= 0``; trusted code, not input."""


@dataclass(frozen=True)
class Timeouts:
    """Limits every write statement of the table runs under (``timeouts:`` in its declaration).

    The database may serve an application: a write that cannot get a lock within ``lock_ms``
    gives up instead of queueing (and making everything behind it queue), backs off with jitter
    and tries the partition again, up to ``lock_retries`` times. ``statement_ms`` bounds any one
    statement.
    """

    lock_ms: int = 5_000
    statement_ms: int = 30 * 60_000
    lock_retries: int = 8

    def session(self) -> SessionLimits:
        """The limits a connection doing this table's work starts with (before any write sets
        them per transaction)."""
        return SessionLimits(self.lock_ms, self.statement_ms)

    def describe(self) -> str:
        return (
            f"lock {self.lock_ms} ms ({self.lock_retries} retries), "
            f"statement {self.statement_ms} ms"
        )


@dataclass(frozen=True)
class ThrottleLimits:
    """When a backfill of the table holds back (``throttle:`` in its declaration; see
    ``core/throttle.py``). ``max_active_connections`` 0 means not checked."""

    pause_ms: int = 0
    max_lock_waiters: int = 0
    max_transaction_age_ms: int = 15 * 60_000
    max_active_connections: int = 0
    max_replica_lag_ms: int = 30_000
    max_wait_ms: int = 30 * 60_000
    max_busy: float = 1.0
    """The share of a run's wall time its writes may take (1: no budget); the rest it waits,
    between partitions and batches."""


@dataclass(frozen=True)
class BatchedUpdate:
    """How ``strategy: batched_update`` fills columns of a live table in place
    (``core/strategies/batched_update.py``).

    ``set`` maps each column to the SQL expression over the row that computes it (trusted code,
    like a column's ``check``). Only rows for which ``needs_update`` holds are touched, and it is
    evaluated again on each locked row, so a value the application wrote meanwhile is kept.
    """

    set: tuple[tuple[str, str], ...]
    needs_update: str | None = None
    """Default: any set column differs from its expression."""
    batch_start: int = 1_000
    batch_min: int = 100
    batch_max: int = 50_000
    target_ms: int = 200
    """Batches grow or shrink so that each one's statement takes about this long."""
    triggers: str = "keep"
    """``keep``: the table's triggers fire for backfilled rows; ``replica``: the batches run with
    ``session_replication_role = replica`` (ordinary triggers and foreign keys do not fire)."""
    defer_constraints: bool = False
    """Run each batch with ``SET CONSTRAINTS ALL DEFERRED``: deferrable constraints are checked
    at the batch's commit rather than per row."""

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.set)

    def expression(self, column: str) -> str:
        return dict(self.set)[column]

    @property
    def needs_update_sql(self) -> str:
        if self.needs_update:
            return f"({self.needs_update})"
        return (
            "("
            + " OR ".join(f"{_quoted(name)} IS DISTINCT FROM ({expr})" for name, expr in self.set)
            + ")"
        )


def _quoted(name: str) -> str:
    """A double-quoted SQL identifier, for SQL text composed without a connection."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class TableSpec:
    schema: str
    name: str
    partitioning: Partitioning
    columns: tuple[Column, ...]
    unique_key: tuple[str, ...]
    sql_path: Path | None
    """A SELECT yielding exactly ``columns`` (by name) for the window
    ``%(start)s <= partition column < %(end)s``; checked when the definitions load. None for
    ``batched_update``, whose new values are expressions over the table's own rows."""
    description: str = ""
    upstream: tuple[str, ...] = ()
    """``schema.table`` of every table the SQL reads: the asset's dependencies."""
    declared_in: Path | None = None
    """The YAML file this spec was read from, for messages."""
    measures: tuple[str, ...] = ()
    """Numeric columns whose per-partition sums must reconcile with the source."""
    subject_column: str | None = None
    """Column identifying the person a row is about; snapshots are purged by it on erasure."""
    owners: tuple[str, ...] = ()
    """Who answers for the table (emails, ``team:NAME``): the asset's owners in the UI, and the
    people ``plan`` says to tell before a backfill changes it."""
    max_shrink: float = 0.5
    """The guard refuses a write that would leave fewer than (1 - max_shrink) of the rows."""
    diff_warn: float = 0.1
    """A rewrite that adds, removes or changes more than this fraction of rows, or moves a measure's
    sum by more than this fraction, raises a WARN so analysts hear that numbers shifted."""
    sum_tolerance: float = 0.01
    """Largest absolute difference allowed between a measure's source and target sums."""
    snapshots: bool = True
    """Keep the rows a write replaces, so the partition can be rolled back."""
    snapshot_retention_days: int = 30
    partitions_per_run: int | None = None
    """Fixed partitions per backfill run; ``None``: sized from measured cost (``run_sizing``)."""
    timeouts: Timeouts = Timeouts()
    throttle: ThrottleLimits = ThrottleLimits()
    strategy: str = "delete_insert"
    """The name of how a partition is written: ``delete_insert`` (the table is rebuilt by the
    project), ``batched_update`` (a live table's columns filled in place; see
    ``batched_update``), ``partition_swap`` (a natively partitioned table; each partition built
    aside, then exchanged for the old one). ``core.strategies.strategy_of(table)`` is its
    implementation."""
    batched_update: BatchedUpdate | None = None

    @property
    def identifier(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def partition_column(self) -> str:
        return self.partitioning.column

    @property
    def asset_path(self) -> tuple[str, str]:
        """The table's Dagster asset key, ``schema/name``, as plain strings."""
        return (self.schema, self.name)

    @property
    def asset_name(self) -> str:
        return "/".join(self.asset_path)

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(column.name for column in self.columns)

    @property
    def required_columns(self) -> tuple[str, ...]:
        return tuple(column.name for column in self.columns if not column.nullable)

    @property
    def query_text(self) -> str:
        """The query as it is nested in other statements: without a final ``;``, and ending in a
        new line so that a closing ``)`` is not swallowed by a last ``-- comment``."""
        return self.query.strip().rstrip(";") + "\n"

    @property
    def source_query(self) -> sql.SQL:
        return sql.SQL(self.query_text)

    def window_filter(self) -> sql.Composed:
        """``partition_column >= %(start)s AND partition_column < %(end)s``."""
        return sql.SQL("{col} >= %(start)s AND {col} < %(end)s").format(
            col=sql.Identifier(self.partition_column)
        )

    def column_list(self, prefix: str | None = None) -> sql.Composed:
        names = (
            sql.Identifier(prefix, name) if prefix else sql.Identifier(name)
            for name in self.column_names
        )
        return sql.SQL(", ").join(names)

    @cached_property
    def query(self) -> str:
        """The SELECT yielding one window's rows as they should be.

        For ``batched_update`` it reads the table itself, each set column replaced by its
        expression: the guard and the reconciliation measure it like any other source.
        """
        if self.sql_path is not None:
            return self.sql_path.read_text()
        assert self.batched_update is not None
        computed = dict(self.batched_update.set)
        columns = ", ".join(
            f"({computed[name]}) AS {_quoted(name)}" if name in computed else _quoted(name)
            for name in self.column_names
        )
        column = _quoted(self.partition_column)
        return (
            f"SELECT {columns} FROM {_quoted(self.schema)}.{_quoted(self.name)} "
            f"WHERE {column} >= %(start)s AND {column} < %(end)s"
        )

    @property
    def sql_source(self) -> str:
        """Where the table's rows come from, for messages."""
        if self.sql_path is not None:
            return self.sql_path.name
        return f"batched_update.set in {self.declared_in}"

    @property
    def sql_hash(self) -> str:
        """Changes whenever the query or the table's shape changes: the asset's code version."""
        digest = hashlib.sha256(self.query.encode())
        digest.update(repr(self.columns).encode())
        if self.batched_update is not None:
            digest.update(repr(self.batched_update.needs_update_sql).encode())
        return digest.hexdigest()[:12]

    def column_definitions(self) -> sql.Composed:
        """The declared columns as a CREATE TABLE lists them: type, NOT NULL, CHECK."""
        column_defs = []
        for column in self.columns:
            parts = [sql.Identifier(column.name), sql.SQL(column.type)]
            if not column.nullable:
                parts.append(sql.SQL("NOT NULL"))
            if column.check:
                parts.append(sql.SQL("CHECK ({})").format(sql.SQL(column.check)))
            column_defs.append(sql.SQL(" ").join(parts))
        return sql.SQL(", ").join(column_defs)

    def create_statements(
        self, *, partitioned: bool = False, key_index: bool = True
    ) -> list[sql.Composed]:
        """The DDL of the table, its schema, its partition column's index and (``key_index``)
        an index on its unique key; ``partitioned``: ``PARTITION BY RANGE`` on the partition
        column (children are made by the writes)."""
        return [
            sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)),
            sql.SQL("CREATE TABLE IF NOT EXISTS {} ({}){}").format(
                self.identifier,
                self.column_definitions(),
                sql.SQL(" PARTITION BY RANGE ({})").format(sql.Identifier(self.partition_column))
                if partitioned
                else sql.SQL(""),
            ),
            # The partition column is what every DELETE and every check filters on.
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({})").format(
                sql.Identifier(f"{self.name}_{self.partition_column}_idx"),
                self.identifier,
                sql.Identifier(self.partition_column),
            ),
        ] + (
            # Every write looks its new keys up in the rest of the table (core/table_keys.py):
            # an index probe per key, not a scan of the table per partition.
            [
                sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({})").format(
                    sql.Identifier(f"{self.name[:52]}_key_idx"),
                    self.identifier,
                    sql.SQL(", ").join(sql.Identifier(k) for k in self.unique_key),
                )
            ]
            if key_index and self.unique_key
            else []
        )


def ensure_table(conn: psycopg.Connection, table: TableSpec, *, partitioned: bool = False) -> None:
    """Create the table, its schema and its index if the table does not exist yet (for the
    strategies that create their target: ``strategy_of(table).ensure_target``).

    An existing table is left alone, without DDL: ``CREATE ... IF NOT EXISTS`` still takes locks
    (and ``CREATE SCHEMA`` a privilege check) before it finds the object there, so running it at
    every run would queue the run behind readers of the table on a live database.
    """
    if _has_partition_index(conn, table):
        return
    with schema_changes(conn):
        for statement in table.create_statements(partitioned=partitioned):
            conn.execute(statement)


def _has_partition_index(conn: psycopg.Connection, table: TableSpec) -> bool:
    """The table exists and has an index led by its partition column."""
    return bool(
        conn.execute(
            "SELECT count(*) FROM pg_index AS i JOIN pg_attribute AS a ON a.attrelid = "
            "i.indrelid AND a.attnum = i.indkey[0] WHERE i.indrelid = to_regclass(%s) "
            "AND a.attname = %s",
            [table.identifier.as_string(conn), table.partition_column],
        ).fetchone()[0]
    )

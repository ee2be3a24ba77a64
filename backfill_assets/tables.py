"""Table specs: what a partitioned table is, declared once.

A spec names the table, its partition column, its columns and its unique key, and points at the SQL
that computes one partition's rows. The writer, the checks and the audit all read these specs, so
table and column names are never repeated in SQL strings.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from importlib import resources

import psycopg
from dagster import AssetKey
from psycopg import sql

from backfill_assets.database import lock_schema_changes


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    nullable: bool = True
    check: str | None = None
    """A CHECK expression over this column, e.g. ``net_amount >= 0``; trusted code, not input."""


@dataclass(frozen=True)
class TableSpec:
    schema: str
    name: str
    partition_column: str
    columns: tuple[Column, ...]
    unique_key: tuple[str, ...]
    query_file: str
    """File in ``backfill_assets/sql`` holding a SELECT of ``columns`` (in order) for the days
    ``%(start)s <= partition_column < %(end)s``."""
    measures: tuple[str, ...] = ()
    """Numeric columns whose per-partition sums must reconcile with the source."""
    subject_column: str | None = None
    """Column identifying the person a row is about; snapshots are purged by it on erasure."""
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

    @property
    def identifier(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def asset_key(self) -> AssetKey:
        """The table's Dagster asset: ``schema/name``, like the source assets ``app/orders``."""
        return AssetKey([self.schema, self.name])

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(column.name for column in self.columns)

    @property
    def required_columns(self) -> tuple[str, ...]:
        return tuple(column.name for column in self.columns if not column.nullable)

    @property
    def source_query(self) -> sql.SQL:
        return sql.SQL(self.query.strip().rstrip(";"))

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
        return resources.files("backfill_assets.sql").joinpath(self.query_file).read_text()

    @property
    def sql_hash(self) -> str:
        """Changes whenever the query or the table's shape changes: the asset's code version."""
        digest = hashlib.sha256(self.query.encode())
        digest.update(repr(self.columns).encode())
        return digest.hexdigest()[:12]

    def create_statements(self) -> list[sql.Composed]:
        column_defs = []
        for column in self.columns:
            parts = [sql.Identifier(column.name), sql.SQL(column.type)]
            if not column.nullable:
                parts.append(sql.SQL("NOT NULL"))
            if column.check:
                parts.append(sql.SQL("CHECK ({})").format(sql.SQL(column.check)))
            column_defs.append(sql.SQL(" ").join(parts))
        return [
            sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)),
            sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(
                self.identifier, sql.SQL(", ").join(column_defs)
            ),
            # The partition column is what every DELETE and every check filters on.
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({})").format(
                sql.Identifier(f"{self.name}_{self.partition_column}_idx"),
                self.identifier,
                sql.Identifier(self.partition_column),
            ),
        ]


def ensure_table(conn: psycopg.Connection, table: TableSpec) -> None:
    with conn.transaction():
        lock_schema_changes(conn)
        for statement in table.create_statements():
            conn.execute(statement)


def table_named(qualified_name: str) -> TableSpec:
    """The spec of ``schema.table``; an unknown name fails with the known ones listed."""
    for table in TABLES:
        if table.qualified_name == qualified_name:
            return table
    known = ", ".join(t.qualified_name for t in TABLES)
    raise ValueError(f"unknown table {qualified_name!r}; partitioned tables are: {known}")


FCT_ORDERS = TableSpec(
    schema="analytics",
    name="fct_orders",
    partition_column="order_day",
    columns=(
        Column("order_id", "bigint", nullable=False),
        Column("order_day", "date", nullable=False),
        Column("customer_id", "bigint", nullable=False),
        Column("country", "text"),
        Column("sales_channel", "text", nullable=False),
        Column("status", "text", nullable=False),
        Column("net_amount", "numeric(12,2)", nullable=False, check="net_amount >= 0"),
        Column("tax_amount", "numeric(12,2)", nullable=False),
        Column("gross_amount", "numeric(12,2)", nullable=False),
    ),
    unique_key=("order_id",),
    query_file="fct_orders.sql",
    measures=("net_amount", "tax_amount", "gross_amount"),
    subject_column="customer_id",
)

TABLES: tuple[TableSpec, ...] = (FCT_ORDERS,)

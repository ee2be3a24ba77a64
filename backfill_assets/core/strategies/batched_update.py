"""``strategy: batched_update``: fill columns of a live table in place, in short key-ordered
batches (``in_place.py`` writes them; ``docs/live.md``).

The table is the application's: never created here, and the role needs SELECT and UPDATE on
it. Its "SQL" is the ``set`` expressions over its own rows, so the contract is that the table
has every declared column, with the declared types, and the expressions run on it. What a write
keeps is the old values of the columns it set, by key, beside the values it wrote; a rollback
puts them back only where a row still holds what the write gave it, and a write that failed its
checks after its batches committed can be rolled back too (``keeps_failed_writes``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar
from uuid import UUID

import psycopg
from psycopg import sql

from backfill_assets.core import contract, rollback, snapshots
from backfill_assets.core.audit import AuditTrail, RunInfo
from backfill_assets.core.database import column_names
from backfill_assets.core.fingerprint import fingerprint_of
from backfill_assets.core.outcomes import CheckOutcome, SourceStats
from backfill_assets.core.params import BackfillParams
from backfill_assets.core.partitioning import PartitionWindow
from backfill_assets.core.registry import DeclarationError
from backfill_assets.core.strategies.base import (
    Declaration,
    PartitionOutcome,
    Record,
    RollbackResult,
    SnapshotRef,
    WriteHooks,
)
from backfill_assets.core.strategies.in_place import write_in_place, written_column
from backfill_assets.core.tables import BatchedUpdate, TableSpec

NAME = "batched_update"
BATCHED_KEYS = ("set", "needs_update", "batch", "triggers", "defer_constraints")
BATCH_KEYS = ("start", "min", "max", "target")
TRIGGER_MODES = ("keep", "replica")

CHECK_DESCRIPTIONS = {
    "source_guard": "Before the first batch: no required column's expression yields NULL, no "
    "NULL keys. On failure nothing is updated.",
    "rows_match_source": "After the last batch: no row of the partition still needs the update.",
    "measures_reconcile": "Over the rows this write updated, each measure's sum equals its "
    "expression's within the table's tolerance.",
    "change_within_threshold": "Rows whose previous non-NULL values changed, and measure deltas; "
    "WARN when the partition moved more than the threshold (filling NULLs is not a change).",
}
"""What the checks mean for a table updated in place."""


class BatchedUpdateStrategy:
    name = NAME
    summary = "fill columns of a live table in place"
    declaration_keys: ClassVar[Mapping[str, str]] = {
        NAME: "set {column: expression}, needs_update, batch {start, min, max, target}, "
        "triggers (keep | replica), defer_constraints",
    }
    check_descriptions: ClassVar[Mapping[str, str]] = CHECK_DESCRIPTIONS
    verb = "update"
    contract_kept = "the table has the declared columns and types, the expressions run on it"
    late_data = False
    keeps_failed_writes = True
    declares_target = False

    def read_declaration(self, declared: Declaration) -> dict[str, object]:
        if declared.doc.get("sql"):
            raise DeclarationError(
                "sql: a batched_update table has no SQL file; its new values are the "
                "expressions of batched_update.set, computed from each row"
            )
        batched = read_batched(declared.required(declared.doc, NAME), declared)
        fixed = [
            c for c in batched.columns if c in declared.unique_key or c == declared.partition_column
        ]
        if fixed:
            raise DeclarationError(
                f"batched_update.set: {', '.join(fixed)} is the unique key or the partition "
                "column, which batches walk and filter on; they cannot be set"
            )
        return {"sql_path": None, "batched_update": batched}

    def describe(self, table: TableSpec) -> list[str]:
        assert table.batched_update is not None
        return [f"strategy: batched_update, sets {', '.join(table.batched_update.columns)}"]

    def updated_tables(self, table: TableSpec) -> tuple[str, ...]:
        return (table.qualified_name,)

    def ensure_target(self, conn: psycopg.Connection, table: TableSpec) -> None:
        """Nothing: a table updated in place is the application's, never created here."""

    def check_contract(self, conn: psycopg.Connection, table: TableSpec) -> None:
        check_live_table(conn, table)

    def check_target_kind(self, table: TableSpec, partitioned: bool) -> None:
        contract.refuse_partitioned(table, partitioned)

    def refusal(self, table: TableSpec, window: PartitionWindow, problems: str) -> str:
        return (
            f"guard refused to update {table.qualified_name} {window.key}: {problems}. Nothing "
            f"was updated. Fix the expression in {table.declared_in} (or the rows)."
        )

    def ensure_snapshots(self, conn: psycopg.Connection, table: TableSpec) -> None:
        snapshots.ensure_row_snapshots(
            conn,
            table,
            snapshot_columns(conn, table),
            lambda: snapshot_statements(conn, table),
        )

    def snapshot_tables(self, conn: psycopg.Connection, table: TableSpec) -> list[str]:
        return snapshots.existing_snapshot_table(conn, table)

    def expire_snapshots(self, conn: psycopg.Connection, table: TableSpec, days: int) -> int:
        return snapshots.expire_rows(conn, table, days)

    def write(
        self,
        conn: psycopg.Connection,
        audit: AuditTrail,
        run: RunInfo,
        table: TableSpec,
        window: PartitionWindow,
        params: BackfillParams,
        guarded: tuple[CheckOutcome, SourceStats],
        hooks: WriteHooks,
    ) -> PartitionOutcome:
        return write_in_place(
            conn,
            audit,
            run,
            table,
            window,
            params,
            guarded,
            hooks.info,
            between_batches=hooks.hold_back,
        )

    def check_restorable(self, conn: psycopg.Connection, ref: SnapshotRef) -> None:
        rollback.check_kept_rows(conn, ref)

    def restore(
        self,
        conn: psycopg.Connection,
        ref: SnapshotRef,
        audit_id: int,
        write_id: UUID,
        record: Record,
    ) -> RollbackResult:
        return restore_columns(conn, ref, audit_id, write_id, record)


def check_live_table(conn: psycopg.Connection, table: TableSpec) -> None:
    """A table updated in place exists with every declared column, and its ``set`` expressions and
    ``needs_update`` condition run on it (described, no row read)."""
    contract.check_types(conn, table)
    existing = column_names(conn, table.schema, table.name)
    if not existing:
        raise contract.SourceNotReady(
            f"table {table.qualified_name} does not exist; batched_update fills columns of an "
            "existing table (create it, and add the columns to fill, first)"
        )
    missing = [c.name for c in table.columns if c.name not in existing]
    if missing:
        raise contract.ContractError(
            f"table {table.qualified_name} has no column(s) {', '.join(missing)} (declared in "
            f"{table.declared_in}); add them first, e.g. ALTER TABLE {table.qualified_name} ADD "
            f"COLUMN {missing[0]} {table.columns[table.column_names.index(missing[0])].type} "
            "(nullable: batched_update fills it, `backfill-assets finish-column` makes it NOT NULL)"
        )
    rows = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod), "
        "to_regtype(d.declared) = a.atttypid FROM pg_attribute AS a "
        "JOIN unnest(%s::text[], %s::text[]) AS d (name, declared) ON d.name = a.attname "
        "WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped",
        [
            list(table.column_names),
            [c.type for c in table.columns],
            table.identifier.as_string(conn),
        ],
    ).fetchall()
    differ = [(name, actual) for name, actual, same in rows if not same]
    if differ:
        declared = {c.name: c.type for c in table.columns}
        raise contract.ContractError(
            f"table {table.qualified_name}: the declaration ({table.declared_in}) gives "
            + ", ".join(f"{n} the type {declared[n]!r}, the table has {a}" for n, a in differ)
            + "; declare the table's own types (batched_update keeps old values in them)"
        )
    assert table.batched_update is not None
    condition = sql.SQL("SELECT 1 FROM {} WHERE {} LIMIT 0").format(
        table.identifier, sql.SQL(table.batched_update.needs_update_sql)
    )
    window = {"start": table.partitioning.start, "end": table.partitioning.start}
    for what, query in (
        (
            "batched_update.set",
            sql.SQL("SELECT * FROM ({}) AS src LIMIT 0").format(table.source_query),
        ),
        ("batched_update.needs_update", condition),
    ):
        try:
            with conn.transaction():
                conn.execute(query, window)
        except psycopg.Error as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise contract.ContractError(
                f"table {table.qualified_name}: {what} in {table.declared_in} does not run on the "
                f"table: {reason}"
            ) from None


def _live_types(conn: psycopg.Connection, table: TableSpec) -> dict[str, str]:
    """The table's own column types (with their modifiers), as PostgreSQL prints them."""
    rows = conn.execute(
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped",
        [table.identifier.as_string(conn)],
    ).fetchall()
    return dict(rows)


def snapshot_columns(conn: psycopg.Connection, table: TableSpec) -> dict[str, str]:
    """Snapshot columns of an in-place table and their types, taken from the table itself."""
    assert table.batched_update is not None
    types = _live_types(conn, table)
    columns = {c.name: types.get(c.name, c.type) for c in table.columns}
    for name in table.batched_update.columns:
        columns[written_column(name)] = columns[name]
    return columns


def snapshot_statements(conn: psycopg.Connection, table: TableSpec) -> list[sql.Composed]:
    """The snapshot of an in-place update keeps only the declared columns (key, partition column,
    the columns it sets) of the rows it changed, and the values it wrote, typed as in the table
    and without its constraints (old values are NULL where a column is being filled). One row per
    write and key: a row updated twice by one write (a restarted pass) keeps its first, original
    values (``ON CONFLICT DO NOTHING``)."""
    target = snapshots.snapshot_table(table)
    columns = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(kind))
        for name, kind in snapshot_columns(conn, table).items()
    )
    keys = sql.SQL(", ").join(sql.Identifier(k) for k in table.unique_key)
    return [
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(snapshots.SCHEMA)),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (audit_id bigint NOT NULL, "
            "taken_at timestamptz NOT NULL DEFAULT now(), write_id uuid, {})"
        ).format(target, columns),
        sql.SQL("CREATE UNIQUE INDEX IF NOT EXISTS {} ON {} (audit_id, {})").format(
            sql.Identifier(f"{table.schema}__{table.name}_audit_key"), target, keys
        ),
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} USING brin (taken_at) {}").format(
            sql.Identifier(f"{table.schema}__{table.name}_taken_brin"), target, snapshots.SUMMARIZE
        ),
    ]


def restore_columns(
    conn: psycopg.Connection, ref: SnapshotRef, audit_id: int, write_id: UUID, record: Record
) -> RollbackResult:
    """Undo an in-place update: put back the old values of the columns it set, by key.

    Only rows that still hold the values the write gave them are restored: a value the
    application wrote since is kept (and so is a row it deleted). The values replaced now are
    kept under the rollback's own ids first, with the values restored as the ones it wrote, so
    the rollback can be undone like any write.
    """
    table, spec = ref.table, ref.table.batched_update
    assert spec is not None
    window = table.partitioning.window(ref.partition_key)
    kept = snapshots.snapshot_table(table)
    keys = [*table.unique_key]
    taken = [*keys, table.partition_column, *spec.columns]
    join = sql.SQL(" AND ").join(
        sql.SQL("{} = {}").format(sql.Identifier("t", k), sql.Identifier("s", k)) for k in keys
    )
    of_write = sql.SQL(
        "s.audit_id = %(snapshot_id)s AND s.write_id IS NOT DISTINCT FROM %(write_id)s::uuid "
        "AND ROW({current}) IS NOT DISTINCT FROM ROW({written})"
    ).format(
        current=sql.SQL(", ").join(sql.Identifier("t", c) for c in spec.columns),
        written=sql.SQL(", ").join(sql.Identifier("s", written_column(c)) for c in spec.columns),
    )
    bound = {
        **window.as_params(),
        "snapshot_id": ref.audit_id,
        "write_id": ref.write_id,
        "new_id": audit_id,
        "new_write": write_id,
    }
    before = rollback.take_partition(conn, table, window)
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL(
                "INSERT INTO {kept} (audit_id, write_id, {columns}, {written}) "
                "SELECT %(new_id)s, %(new_write)s, {current}, {restoring} FROM {table} AS t "
                "JOIN {kept} AS s ON {join} WHERE {of_write}"
            ).format(
                kept=kept,
                columns=sql.SQL(", ").join(sql.Identifier(c) for c in taken),
                written=sql.SQL(", ").join(sql.Identifier(written_column(c)) for c in spec.columns),
                current=sql.SQL(", ").join(sql.Identifier("t", c) for c in taken),
                restoring=sql.SQL(", ").join(sql.Identifier("s", c) for c in spec.columns),
                table=table.identifier,
                join=join,
                of_write=of_write,
            ),
            bound,
        )
        replaced = cur.rowcount
        cur.execute(
            sql.SQL(
                "UPDATE {table} AS t SET {assignments} FROM {kept} AS s WHERE {join} AND {of_write}"
            ).format(
                table=table.identifier,
                assignments=sql.SQL(", ").join(
                    sql.SQL("{} = {}").format(sql.Identifier(c), sql.Identifier("s", c))
                    for c in spec.columns
                ),
                kept=kept,
                join=join,
                of_write=of_write,
            ),
            bound,
        )
        restored = cur.rowcount
    after = fingerprint_of(conn, table, table.identifier, window)
    record(
        ref,
        conn=conn,
        status="succeeded",
        rows_deleted=0,
        rows_inserted=0,
        rows_updated=restored,
        rows_after=after.rows,
        checksum_before=before.checksum,
        checksum_after=after.checksum,
        snapshot_rows=replaced,
    )
    return RollbackResult(
        ref, audit_id, 0, restored, before.checksum, after.checksum, snapshot_rows=replaced
    )


def read_batched(value: object, declared: Declaration) -> BatchedUpdate:
    """The ``batched_update:`` block, every mistake named with its field."""
    doc = declared.mapping(value, "batched_update", BATCHED_KEYS)
    assignments = declared.mapping(declared.required(doc, "set"), "batched_update.set", _AnyKey())
    odd = [str(name) for name in assignments if not declared.is_name(str(name))]
    if odd:
        raise DeclarationError(
            f"batched_update.set: {odd[0]!r} is not a column name. In a one-line mapping a comma "
            "separates entries: quote an expression holding commas, e.g. set: {total: "
            '"amount + coalesce(fee, 0)"}, or write one column per line'
        )
    declared.known_columns("batched_update.set", [str(name) for name in assignments])
    for name, expression in assignments.items():
        if not isinstance(expression, str) or not expression.strip():
            raise DeclarationError(
                f"batched_update.set.{name}: {expression!r} is not a SQL expression "
                "(e.g. net_amount + tax_amount)"
            )
    needs = doc.get("needs_update")
    if needs is not None and (not isinstance(needs, str) or not needs.strip()):
        raise DeclarationError(
            f"batched_update.needs_update: {needs!r} is not a SQL condition (e.g. total_price IS "
            "NULL)"
        )
    batch = declared.mapping(doc.get("batch") or {}, "batched_update.batch", BATCH_KEYS)
    default = BatchedUpdate(set=())
    sizes = {
        key: _batch_size(batch, key, getattr(default, f"batch_{key}")) for key in BATCH_KEYS[:3]
    }
    if not sizes["min"] <= sizes["start"] <= sizes["max"]:
        raise DeclarationError(
            f"batched_update.batch: start {sizes['start']} is not between min {sizes['min']} "
            f"and max {sizes['max']}"
        )
    triggers = str(doc.get("triggers", "keep"))
    if triggers not in TRIGGER_MODES:
        raise DeclarationError(
            f"batched_update.triggers: {triggers!r} is not one of {', '.join(TRIGGER_MODES)}"
        )
    return BatchedUpdate(
        set=tuple((str(name), str(expr).strip()) for name, expr in assignments.items()),
        needs_update=needs.strip() if needs else None,
        batch_start=sizes["start"],
        batch_min=sizes["min"],
        batch_max=sizes["max"],
        target_ms=declared.duration(
            batch, "target", default.target_ms, 10, 600_000, "batched_update.batch"
        ),
        triggers=triggers,
        defer_constraints=declared.flag(doc, "defer_constraints", False),
    )


class _AnyKey:
    """Allowed keys of a mapping whose keys are names checked elsewhere."""

    def __contains__(self, _: object) -> bool:
        return True


def _batch_size(doc: Mapping, key: str, default: int) -> int:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000:
        raise DeclarationError(
            f"batched_update.batch.{key}: {value!r} is not a whole number of rows, 1..1000000"
        )
    return value


STRATEGY = BatchedUpdateStrategy()

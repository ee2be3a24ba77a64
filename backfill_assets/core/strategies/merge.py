"""``strategy: merge``: a table the project builds from its SQL, each partition brought to its
query's rows by PostgreSQL's ``MERGE`` on the declaration's ``unique_key``, in one transaction.

For large partitions that change by a few rows: DELETE-INSERT rewrites (and keeps, and logs in
the WAL) every row of the partition; a merge writes only the keys that are new, the rows whose
values changed (``IS DISTINCT FROM`` over the non-key columns) and the deletion of the keys that
left the window's source. The rows it leaves alone keep their tuple (same ``xmin``, no dead
tuple, no WAL).

One transaction per window, under ``writer.lock_partition``:

1. the window's source rows are read once into a temporary table (every later step, and the
   refusal below, reads the same rows however the query behaves);
2. a ``unique_key`` that is not unique in those rows is refused, naming a few of the keys,
   before anything is written (the MERGE would otherwise update a row twice, or insert a key
   twice), and so is a key that another partition of the table holds (``core/table_keys.py``:
   the source moved it; the refusal names the partitions to backfill with this one);
3. what the write will change is kept, in one statement, tagged with the write's audit id and
   write id, column ``merge_action``: the old values of the rows to be updated (``updated``) or
   deleted (``deleted``), and the key (and partition column) of every key to be inserted
   (``inserted``): a rollback deletes those;
4. ``MERGE`` inserts the new keys and updates the changed rows;
5. ``DELETE … WHERE NOT EXISTS`` removes the keys that left the window's source. This is a
   statement of its own rather than MERGE's ``WHEN NOT MATCHED BY SOURCE``: that clause needs
   PostgreSQL 17, and the project runs on any PostgreSQL with MERGE (15 and later: the system
   server here is 15); a separate statement in the same transaction is just as atomic, and the
   write reads the same on every version;
6. the after-write checks compare the partition with what it held before (the rows left alone
   plus the kept old values, minus the inserted keys), the audit row joins the transaction,
   and a blocking failure rolls all of it back.

The target must have a unique index on ``unique_key`` (created with the table; an existing
table without one is refused with the ``CREATE UNIQUE INDEX`` to run): the source's keys are
matched within the window only, and the index backs the lookup of step 2 (and would stop a
key held by another partition at the insert, were the lookup ever skipped). A rollback is a
merge too, with the write's previous rows as its source: it keeps what it replaces in turn, so
it can be undone.

Columns compared with ``IS DISTINCT FROM`` need an equality operator (``json`` has none:
declare ``jsonb``). Snapshot rows of ``inserted`` keys hold only the key and the partition
column (the snapshot table's other columns are nullable for this strategy).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from uuid import UUID

import psycopg
from psycopg import sql

from backfill_assets.core import contract, rollback, snapshots
from backfill_assets.core.audit import AuditTrail, RunInfo
from backfill_assets.core.database import relation_exists, schema_changes
from backfill_assets.core.fingerprint import fingerprint_of
from backfill_assets.core.outcomes import CheckOutcome, SourceStats
from backfill_assets.core.params import BackfillParams
from backfill_assets.core.partition_write import VerifiedWrite, record_write
from backfill_assets.core.partitioning import PartitionWindow
from backfill_assets.core.strategies.base import (
    PartitionOutcome,
    Record,
    RollbackResult,
    SnapshotRef,
    WriteHooks,
)
from backfill_assets.core.strategies.delete_insert import DeleteInsert
from backfill_assets.core.table_keys import KeysHeldElsewhere, keys_elsewhere
from backfill_assets.core.tables import TableSpec, ensure_table
from backfill_assets.core.writer import (
    WriteResult,
    apply_timeouts,
    lock_partition,
    with_lock_retries,
)

NAME = "merge"
ACTION = "merge_action"
"""The snapshot table's column saying what the write did to the kept row's key."""
SOURCE = sql.Identifier("backfill_merge_source")
"""Temporary table: the window's source rows, read once."""
KEPT = sql.Identifier("backfill_merge_kept")
"""Temporary table: what a write keeps when snapshots are off (gone at COMMIT)."""
SHOWN_DUPLICATES = 5


class DuplicateKeys(Exception):
    """The window's source rows repeat a ``unique_key``; raised before anything is written."""


@dataclass(frozen=True)
class Kept:
    """Where a merge keeps what it changes: the table's snapshot table under a write's ids, or
    (``audit_id`` None) a temporary table of this transaction."""

    relation: sql.Identifier
    audit_id: int | None = None
    write_id: UUID | None = None

    def of_write(self, alias: str) -> sql.Composable:
        if self.audit_id is None:
            return sql.SQL("true")
        return sql.SQL("{}.audit_id = {} AND {}.write_id = {}::uuid").format(
            sql.Identifier(alias),
            sql.Literal(self.audit_id),
            sql.Identifier(alias),
            sql.Literal(str(self.write_id)),
        )


@dataclass(frozen=True)
class MergeCounts:
    inserted: int
    updated: int
    deleted: int

    @property
    def kept(self) -> int:
        """Snapshot rows: old values of updated and deleted rows, keys of inserted ones."""
        return self.inserted + self.updated + self.deleted


class Merge(DeleteInsert):
    """A table the project creates, like ``delete_insert`` (the same declaration, contract, guard
    wording and row snapshot table, expired and erased alike), with a unique index on the key and
    its own write and rollback."""

    name = NAME
    summary = "MERGE on unique_key: only changed rows are written"
    verb = "merge"
    contract_kept = "the SQL yields exactly the declared columns, unique_key has a unique index"

    def describe(self, table: TableSpec) -> list[str]:
        return [
            *super().describe(table),
            f"strategy: merge (MERGE on {', '.join(table.unique_key)}: only changed rows are "
            "written)",
        ]

    def ensure_target(self, conn: psycopg.Connection, table: TableSpec) -> None:
        if has_key_index(conn, table):
            ensure_table(conn, table)
            return
        if relation_exists(conn, table.schema, table.name):
            raise contract.ContractError(missing_index(table))
        with schema_changes(conn):
            for statement in [*table.create_statements(key_index=False), create_key_index(table)]:
                conn.execute(statement)

    def check_contract(self, conn: psycopg.Connection, table: TableSpec) -> None:
        super().check_contract(conn, table)
        if relation_exists(conn, table.schema, table.name) and not has_key_index(conn, table):
            raise contract.ContractError(missing_index(table))

    def ensure_snapshots(self, conn: psycopg.Connection, table: TableSpec) -> None:
        snapshots.ensure_row_snapshots(
            conn,
            table,
            {**{c.name: c.type for c in table.columns}, ACTION: "text"},
            lambda: snapshot_statements(table),
        )

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
        return merge_verified(conn, audit, run, table, window, params, guarded, hooks.warn)

    def restore(
        self,
        conn: psycopg.Connection,
        ref: SnapshotRef,
        audit_id: int,
        write_id: UUID,
        record: Record,
    ) -> RollbackResult:
        return merge_back(conn, ref, audit_id, write_id, record)


def key_columns(table: TableSpec) -> tuple[str, ...]:
    """What an ``inserted`` snapshot row holds: the key, and the partition column (so the row
    lies inside its partition's window like every other kept row)."""
    extra = () if table.partition_column in table.unique_key else (table.partition_column,)
    return (*table.unique_key, *extra)


def key_index_name(table: TableSpec) -> sql.Identifier:
    return sql.Identifier(f"{table.name[:48]}_unique_key")


def create_key_index(table: TableSpec) -> sql.Composed:
    return sql.SQL("CREATE UNIQUE INDEX IF NOT EXISTS {} ON {} ({})").format(
        key_index_name(table),
        table.identifier,
        sql.SQL(", ").join(sql.Identifier(k) for k in table.unique_key),
    )


def has_key_index(conn: psycopg.Connection, table: TableSpec) -> bool:
    """The table has a valid, non-partial unique index on exactly its ``unique_key`` columns."""
    return bool(
        conn.execute(
            "SELECT count(*) FROM pg_index AS i WHERE i.indrelid = to_regclass(%s) "
            "AND i.indisunique AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL "
            "AND i.indnatts = i.indnkeyatts AND (SELECT array_agg(a.attname::text ORDER BY "
            "a.attname) FROM unnest(i.indkey::int2[]) AS k (attnum) JOIN pg_attribute AS a "
            "ON a.attrelid = i.indrelid AND a.attnum = k.attnum) = %s::text[]",
            [table.identifier.as_string(conn), sorted(table.unique_key)],
        ).fetchone()[0]
    )


def missing_index(table: TableSpec) -> str:
    columns = ", ".join(table.unique_key)
    return (
        f"table {table.qualified_name} exists without a unique index on its unique_key "
        f"({columns}), which strategy: merge ({table.declared_in}) matches rows on. Create it "
        f"(CREATE UNIQUE INDEX CONCURRENTLY {table.name[:48]}_unique_key ON "
        f"{table.qualified_name} ({columns})), or drop the table to have it created anew"
    )


def snapshot_statements(table: TableSpec) -> list[sql.Composed]:
    """The row snapshot table, with ``merge_action``; only the key and the partition column
    stay NOT NULL, as an ``inserted`` row holds nothing else."""
    target = snapshots.snapshot_table(table)
    nullable = [c.name for c in table.columns if c.name not in key_columns(table)]
    return [
        *snapshots.row_statements(table),
        sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} text").format(
            target, sql.Identifier(ACTION)
        ),
        *(
            sql.SQL("ALTER TABLE {} ALTER COLUMN {} DROP NOT NULL").format(
                target, sql.Identifier(name)
            )
            for name in nullable
        ),
    ]


def _columns(names, alias: str | None = None) -> sql.Composed:
    return sql.SQL(", ").join(
        sql.Identifier(alias, n) if alias else sql.Identifier(n) for n in names
    )


def _keys_equal(table: TableSpec, left: str, right: str) -> sql.Composed:
    return sql.SQL(" AND ").join(
        sql.SQL("{} = {}").format(sql.Identifier(left, k), sql.Identifier(right, k))
        for k in table.unique_key
    )


def _in_window(table: TableSpec, alias: str) -> sql.Composed:
    column = sql.Identifier(alias, table.partition_column)
    return sql.SQL("{col} >= %(start)s AND {col} < %(end)s").format(col=column)


def _changed(table: TableSpec) -> sql.Composable:
    """Target row ``t`` differs from source row ``s`` in a non-key column."""
    values = [c for c in table.column_names if c not in table.unique_key]
    if not values:
        return sql.SQL("false")
    return sql.SQL("ROW({}) IS DISTINCT FROM ROW({})").format(
        _columns(values, "t"), _columns(values, "s")
    )


def previous_rows(table: TableSpec, kept: Kept) -> sql.Composed:
    """The partition as it was before the merge that kept ``kept``: the rows it left alone, and
    the old values it kept, without the keys it inserted (a subquery shaped like the table)."""
    return sql.SQL(
        "(SELECT {cols} FROM {table} AS t WHERE NOT EXISTS "
        "(SELECT 1 FROM {kept} AS k WHERE {mine} AND {same}) "
        "UNION ALL SELECT {cols} FROM {kept} AS k WHERE {mine} AND k.{action} <> 'inserted')"
    ).format(
        cols=table.column_list(),
        table=table.identifier,
        kept=kept.relation,
        mine=kept.of_write("k"),
        same=_keys_equal(table, "k", "t"),
        action=sql.Identifier(ACTION),
    )


def duplicate_keys(cur: psycopg.Cursor, table: TableSpec, window: PartitionWindow) -> None:
    """Refuse source rows that repeat a key (or have a NULL in it), naming a few."""
    keys = sql.SQL(", ").join(sql.Identifier(k) for k in table.unique_key)
    rows = cur.execute(
        sql.SQL(
            "SELECT ROW({keys})::text, count(*), count(*) OVER () FROM {source} "
            "GROUP BY {keys} HAVING count(*) > 1 ORDER BY count(*) DESC, 1 LIMIT {n}"
        ).format(keys=keys, source=SOURCE, n=sql.Literal(SHOWN_DUPLICATES))
    ).fetchall()
    if not rows:
        return
    shown = ", ".join(f"{key} ({count} rows)" for key, count, _ in rows)
    raise DuplicateKeys(
        f"refused to merge {table.qualified_name} {window.key}: unique_key "
        f"({', '.join(table.unique_key)}) is not unique in the source's rows of the window: "
        f"{rows[0][2]} key(s) occur more than once, e.g. {shown}. Nothing was written. Fix "
        f"{table.sql_source} to yield one row per key, or declare the unique_key that "
        f"identifies a row in {table.declared_in}"
    )


def merge_window(
    conn: psycopg.Connection,
    table: TableSpec,
    window: PartitionWindow,
    kept: Kept,
    *,
    source: sql.Composable | None = None,
    params: Mapping[str, object] | None = None,
    before_commit: Callable[[psycopg.Connection, WriteResult, MergeCounts], None] | None = None,
) -> WriteResult:
    """Bring ``window`` of ``table`` to the rows of ``source`` (default: the table's query,
    bound with the window's ``start``/``end`` and ``params``) by key, in one transaction
    (a savepoint inside an open one), keeping what it changes in ``kept``."""
    bound = {**window.as_params(), **(params or {})}
    started = time.perf_counter()
    cols = table.column_list()
    with conn.transaction(), conn.cursor() as cur:
        lock_partition(cur, table, window)
        apply_timeouts(cur, table)
        # DROP first: a rollback merges several partitions inside one outer transaction, where
        # ON COMMIT DROP only fires at the very end.
        temporaries = [SOURCE] if kept.audit_id is not None else [SOURCE, KEPT]
        for temporary in temporaries:
            cur.execute(sql.SQL("DROP TABLE IF EXISTS pg_temp.{}").format(temporary))
        # CREATE ... AS ... WITH NO DATA: the table's column types without its NOT NULLs (a NULL
        # from the source is the checks' to report, as for the other strategies).
        cur.execute(
            sql.SQL("CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA").format(
                SOURCE, cols, table.identifier
            )
        )
        if kept.audit_id is None:
            cur.execute(
                sql.SQL(
                    "CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT NULL::bigint AS audit_id, "
                    "NULL::uuid AS write_id, NULL::text AS {}, {} FROM {} WITH NO DATA"
                ).format(KEPT, sql.Identifier(ACTION), cols, table.identifier)
            )
        cur.execute(
            sql.SQL("INSERT INTO {} ({}) SELECT {} FROM ({}) AS src").format(
                SOURCE, cols, cols, source or table.source_query
            ),
            bound,
        )
        cur.execute(sql.SQL("ANALYZE {}").format(SOURCE))  # the joins below plan on its size
        duplicate_keys(cur, table, window)
        # The unique index would stop a key held by another partition at the MERGE, naming one;
        # looked up first, the refusal names them all and the partitions holding them.
        found = keys_elsewhere(conn, table, window, SOURCE)
        if found:
            raise KeysHeldElsewhere(table, window, found)
        write_id = str(kept.write_id) if kept.write_id else None
        tag = [sql.Literal(kept.audit_id), sql.SQL("{}::uuid").format(sql.Literal(write_id))]
        cur.execute(
            sql.SQL(
                "INSERT INTO {kept} (audit_id, write_id, {action}, {cols}) "
                "SELECT {tag}, CASE WHEN s.present IS NULL THEN 'deleted' ELSE 'updated' END, "
                "{t_cols} FROM {table} AS t LEFT JOIN (SELECT true AS present, * FROM {source}) "
                "AS s ON {same} WHERE {window} AND (s.present IS NULL OR {changed}) "
                "UNION ALL SELECT {tag}, 'inserted', {s_keys} FROM {source} AS s WHERE NOT "
                "EXISTS (SELECT 1 FROM {table} AS t WHERE {same} AND {window})"
            ).format(
                kept=kept.relation,
                action=sql.Identifier(ACTION),
                cols=cols,
                tag=sql.SQL(", ").join(tag),
                t_cols=table.column_list("t"),
                table=table.identifier,
                source=SOURCE,
                same=_keys_equal(table, "t", "s"),
                window=_in_window(table, "t"),
                changed=_changed(table),
                s_keys=sql.SQL(", ").join(
                    sql.Identifier("s", c) if c in key_columns(table) else sql.SQL("NULL")
                    for c in table.column_names
                ),
            ),
            bound,
        )
        counts = dict.fromkeys(("inserted", "updated", "deleted"), 0)
        counts |= dict(
            cur.execute(
                sql.SQL("SELECT {}, count(*) FROM {} AS k WHERE {} GROUP BY 1").format(
                    sql.Identifier(ACTION), kept.relation, kept.of_write("k")
                )
            ).fetchall()
        )
        values = [c for c in table.column_names if c not in table.unique_key]
        update = (
            sql.SQL("WHEN MATCHED AND {} THEN UPDATE SET {} ").format(
                _changed(table),
                sql.SQL(", ").join(
                    sql.SQL("{} = {}").format(sql.Identifier(c), sql.Identifier("s", c))
                    for c in values
                ),
            )
            if values
            else sql.SQL("")
        )
        cur.execute(
            sql.SQL(
                "MERGE INTO {table} AS t USING {source} AS s ON {same} AND {window} "
                "{update}WHEN NOT MATCHED THEN INSERT ({cols}) VALUES ({s_cols})"
            ).format(
                table=table.identifier,
                source=SOURCE,
                same=_keys_equal(table, "t", "s"),
                window=_in_window(table, "t"),
                update=update,
                cols=cols,
                s_cols=table.column_list("s"),
            ),
            bound,
        )
        merged = cur.rowcount
        cur.execute(
            sql.SQL(
                "DELETE FROM {table} AS t WHERE {window} AND NOT EXISTS "
                "(SELECT 1 FROM {source} AS s WHERE {same})"
            ).format(
                table=table.identifier,
                source=SOURCE,
                window=_in_window(table, "t"),
                same=_keys_equal(table, "t", "s"),
            ),
            bound,
        )
        done = MergeCounts(counts["inserted"], counts["updated"], counts["deleted"])
        if merged != done.inserted + done.updated or cur.rowcount != done.deleted:
            raise AssertionError(
                f"{table.qualified_name} {window.key}: the merge wrote {merged} rows and deleted "
                f"{cur.rowcount}, but kept {done}; rolled back"
            )
        result = WriteResult(
            window.key,
            rows_deleted=done.deleted,
            rows_inserted=done.inserted,
            duration_s=time.perf_counter() - started,
            rows_updated=done.updated,
        )
        if before_commit is not None:
            before_commit(conn, result, done)
    return replace(result, duration_s=time.perf_counter() - started)


def merge_verified(
    conn: psycopg.Connection,
    audit: AuditTrail,
    run: RunInfo,
    table: TableSpec,
    window: PartitionWindow,
    params: BackfillParams,
    guarded: tuple[CheckOutcome, SourceStats],
    log: Callable[[str], object] | None = None,
) -> PartitionOutcome:
    """Merge one window; keep, verify and audit it inside its transaction."""
    job = VerifiedWrite.start(
        conn, audit, run, table, window, params, guarded, keeps_snapshot=False
    )
    kept = (
        Kept(snapshots.snapshot_table(table), job.audit_id, job.write_id)
        if params.snapshots
        else Kept(KEPT)
    )
    counted: list[MergeCounts] = []

    def verify_and_record(
        connection: psycopg.Connection, write: WriteResult, counts: MergeCounts
    ) -> None:
        verification = job.verify(connection, previous_rows(table, kept))
        counted.append(counts)
        record_write(
            audit,
            run,
            table,
            window,
            conn=connection,
            audit_id=job.audit_id,
            write_id=job.write_id,
            status="succeeded",
            started_at=job.started_at,
            rows_before=job.rows_before,
            rows_deleted=counts.deleted,
            rows_inserted=counts.inserted,
            rows_updated=counts.updated,
            rows_after=verification.after.rows,
            checksum_before=verification.before.checksum,
            checksum_after=verification.after.checksum,
            snapshot_rows=counts.kept if params.snapshots else None,
            changes=json.dumps(verification.changes()),
        )

    outcome = job.outcome(
        lambda: with_lock_retries(
            lambda: merge_window(conn, table, window, kept, before_commit=verify_and_record),
            table,
            window.key,
            log,
        ),
        expected=(DuplicateKeys,),
    )
    if outcome.succeeded and params.snapshots:
        return replace(outcome, snapshot_rows=counted[-1].kept)
    return outcome


def merge_back(
    conn: psycopg.Connection, ref: SnapshotRef, audit_id: int, write_id: UUID, record: Record
) -> RollbackResult:
    """Undo a merge by merging the partition back to what it held before: the rows the write
    left alone and the old values it kept, without the keys it inserted. What this changes is
    kept under the rollback's own ids, so it can be undone in turn.

    A snapshot of a whole partition (kept by a ``delete_insert`` write before the table was
    declared ``merge``: no ``merge_action``) is the partition's previous rows by itself."""
    table = ref.table
    window = table.partitioning.window(ref.partition_key)
    before = rollback.take_partition(conn, table, window)
    of_write = {"snapshot_id": ref.audit_id, "write_id": ref.write_id}
    whole = conn.execute(
        sql.SQL("SELECT bool_or({} IS NULL) FROM {} WHERE {}").format(
            sql.Identifier(ACTION), snapshots.snapshot_table(table), snapshots.OF_WRITE
        ),
        of_write,
    ).fetchone()[0]
    if whole:
        source = snapshots.restore_source(table)
    else:
        source = sql.SQL(
            "SELECT {cols} FROM {table} AS t WHERE {window} AND NOT EXISTS "
            "(SELECT 1 FROM {snap} AS k WHERE {mine} AND {same}) "
            "UNION ALL SELECT {cols} FROM {snap} AS k WHERE {mine} AND k.{action} <> 'inserted' "
            "AND {k_window}"
        ).format(
            cols=table.column_list(),
            table=table.identifier,
            window=_in_window(table, "t"),
            snap=snapshots.snapshot_table(table),
            mine=sql.SQL(
                "k.audit_id = %(snapshot_id)s AND k.write_id IS NOT DISTINCT FROM "
                "%(write_id)s::uuid"
            ),
            same=_keys_equal(table, "k", "t"),
            action=sql.Identifier(ACTION),
            k_window=_in_window(table, "k"),
        )
    after: dict[str, object] = {}

    def checksums_and_audit(
        connection: psycopg.Connection, write: WriteResult, counts: MergeCounts
    ) -> None:
        after["print"] = fingerprint_of(connection, table, table.identifier, window)
        record(
            ref,
            conn=connection,
            status="succeeded",
            rows_deleted=counts.deleted,
            rows_inserted=counts.inserted,
            rows_updated=counts.updated,
            rows_after=after["print"].rows,
            checksum_before=before.checksum,
            checksum_after=after["print"].checksum,
            snapshot_rows=counts.kept,
        )
        after["kept"] = counts.kept

    result = merge_window(
        conn,
        table,
        window,
        Kept(snapshots.snapshot_table(table), audit_id, write_id),
        source=source,
        params=of_write,
        before_commit=checksums_and_audit,
    )
    return RollbackResult(
        ref,
        audit_id,
        result.rows_deleted,
        result.rows_inserted + result.rows_updated,
        checksum_before=before.checksum,
        checksum_after=after["print"].checksum,
        snapshot_rows=after["kept"],
    )


STRATEGY = Merge()

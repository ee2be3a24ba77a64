"""The audit trail: one row per partition written, rolled back or refused, in ``backfill_audit``.

A successful write's row is inserted inside the write's own transaction, complete and final: it
commits with the data or vanishes with it, so no write commits without its row and no row claims a
write that was rolled back, and the bookkeeping costs no commit of its own. Its id is taken from
the sequence before the transaction, so the snapshot the DELETE fills can carry it. Outcomes that
happen after a rollback (failed, refused, interrupted) are recorded through the trail's own
autocommit connection; a problem there is logged as a warning. Rollbacks audit the same way.

The audit never holds a write up for long: its statements wait at most the bookkeeping lock
timeout (``session_limits.bookkeeping()``, 5 s) for a lock on the audit table. A write whose audit
row cannot be inserted (locked table, revoked privilege, a raising trigger) is rolled back with
``AuditUnavailable`` saying why; the failure's own row, tried after, is then usually lost too,
and the warning says that the partition kept its rows.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import cache

import psycopg
from psycopg import sql

from backfill_assets.core.database import connect, schema_changes
from backfill_assets.core.session_limits import bookkeeping
from backfill_assets.core.settings import REPO_ROOT

SCHEMA = "backfill_audit"
TABLE = sql.Identifier(SCHEMA, "backfill_runs")

DDL = """
CREATE SCHEMA IF NOT EXISTS backfill_audit;
CREATE TABLE IF NOT EXISTS backfill_audit.backfill_runs (
    id bigserial PRIMARY KEY,
    dagster_run_id text,
    backfill_id text,
    asset_key text NOT NULL,
    table_name text NOT NULL,
    partition_key text NOT NULL,
    strategy text NOT NULL,
    code_version text NOT NULL,
    sql_hash text NOT NULL,
    launched_by text NOT NULL,
    parameters jsonb NOT NULL DEFAULT '{}',
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    ended_at timestamptz,
    rows_before bigint,
    rows_deleted bigint,
    rows_inserted bigint,
    rows_after bigint,
    checksum_before text,
    checksum_after text,
    snapshot_rows bigint,
    restored_from bigint REFERENCES backfill_audit.backfill_runs (id),
    status text NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'guard_failed')),
    error text
);
-- Which snapshot rows belong to a write: ids restart when the audit table is recreated, a
-- write's random id does not (core/snapshots.py, core/rollback.py).
ALTER TABLE backfill_audit.backfill_runs ADD COLUMN IF NOT EXISTS write_id uuid;
-- Rows an in-place update (strategy batched_update) changed; it deletes and inserts none.
ALTER TABLE backfill_audit.backfill_runs ADD COLUMN IF NOT EXISTS rows_updated bigint;
-- Why the backfill ran, as given at launch (tag backfill_assets/reason).
ALTER TABLE backfill_audit.backfill_runs ADD COLUMN IF NOT EXISTS reason text;
-- What a successful write changed (rows added/removed/changed, measure sums before and after):
-- the numbers of `backfill-assets report`.
ALTER TABLE backfill_audit.backfill_runs ADD COLUMN IF NOT EXISTS changes jsonb;
CREATE INDEX IF NOT EXISTS backfill_runs_backfill_idx ON backfill_audit.backfill_runs (backfill_id);
CREATE INDEX IF NOT EXISTS backfill_runs_partition_idx
    ON backfill_audit.backfill_runs (table_name, partition_key);
"""

NEWEST_COLUMN = re.findall(r"ADD COLUMN IF NOT EXISTS (\w+)", DDL)[-1]
"""The column the DDL added last: present means the table is current (nothing to run)."""

log = logging.getLogger(__name__)

ABANDONED = (
    "abandoned: the process recording it ended without closing it (killed); its transaction "
    "rolled back, nothing of it was committed"
)


class AuditUnavailable(Exception):
    """The audit row of a write could not be inserted; the write is rolled back."""


def ensure_audit_table(conn: psycopg.Connection) -> None:
    """Create or update the audit table; a no-op (no DDL, no lock) when it is current.

    ``ALTER TABLE ... ADD COLUMN IF NOT EXISTS`` takes an exclusive lock even when the column
    exists, which would queue every run behind any open reader of the audit table.
    """
    current = conn.execute(
        "SELECT count(*) FROM pg_attribute WHERE attrelid = "
        "to_regclass('backfill_audit.backfill_runs') AND attname = %s AND NOT attisdropped",
        [NEWEST_COLUMN],
    ).fetchone()[0]
    if current:
        return
    with schema_changes(conn):
        conn.execute(DDL)


def close_abandoned(conn: psycopg.Connection) -> list[int]:
    """Close rows left ``running``; returns their ids.

    This version never leaves such rows (every row is inserted complete, in its write's
    transaction or after its rollback); earlier versions opened rollbacks' rows as ``running``,
    and a killed process left them so, wrongly telling that something was still happening. Every
    run closes them as it starts, and ``backfill-assets audit --close-abandoned`` does on demand.
    """
    ensure_audit_table(conn)
    running = sql.SQL("SELECT EXISTS (SELECT FROM {} WHERE status = 'running')").format(TABLE)
    if not conn.execute(running).fetchone()[0]:
        return []  # the usual case: a read, no lock that could hold a run up
    try:
        with conn.transaction():
            _limit_lock_wait(conn)
            rows = conn.execute(
                sql.SQL(
                    "UPDATE {} SET status = 'failed', ended_at = clock_timestamp(), "
                    "error = coalesce(error || '; ', '') || %s WHERE status = 'running' "
                    "RETURNING id"
                ).format(TABLE),
                [ABANDONED],
            ).fetchall()
    except psycopg.errors.LockNotAvailable:
        return []  # the audit table is locked: the next run closes them
    return sorted(row[0] for row in rows)


def _limit_lock_wait(conn: psycopg.Connection) -> None:
    """The bookkeeping lock timeout for the rest of the transaction open on ``conn`` (a write's
    session may run under its table's longer one)."""
    conn.execute("SELECT set_config('lock_timeout', %s, true)", [f"{bookkeeping().lock_ms}ms"])


def _unavailable(exc: psycopg.Error) -> AuditUnavailable:
    if isinstance(exc, psycopg.errors.LockNotAvailable):
        reason = (
            f"{SCHEMA}.backfill_runs stayed locked by another session for "
            f"{bookkeeping().lock_ms} ms (find it in pg_locks and pg_stat_activity)"
        )
    elif isinstance(exc, psycopg.errors.InsufficientPrivilege):
        reason = (
            f"{(exc.diag.message_primary or str(exc)).strip()}: grant INSERT on "
            f"{SCHEMA}.backfill_runs and USAGE on {SCHEMA}.backfill_runs_id_seq to this role"
        )
    else:
        reason = (exc.diag.message_primary or str(exc)).strip()
    return AuditUnavailable(
        f"the audit row could not be written ({reason}); the write was rolled back, since no "
        "write is committed unaudited"
    )


@cache
def code_version() -> str:
    """The git commit of the code that wrote (with ``-dirty`` for uncommitted changes)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass(frozen=True)
class RunInfo:
    """Who and what is writing: the same for every partition of one run."""

    dagster_run_id: str | None
    backfill_id: str | None
    launched_by: str
    parameters: dict[str, object]
    reason: str | None = None
    """Why (``backfill_assets/reason``), stored in every audit row of the run."""


class AuditTrail:
    def __init__(self, url: str, warn: Callable[[str], None] = log.warning) -> None:
        self._url = url
        self._warn = warn
        self._conn: psycopg.Connection | None = None
        self._prepared: set[int] = set()

    def __enter__(self) -> AuditTrail:
        return self

    def __exit__(self, *_: object) -> None:
        if self._conn is not None:
            self._conn.close()

    def reserve_id(self, conn: psycopg.Connection) -> int:
        """An id for the audit row of a write about to start on ``conn``."""
        if id(conn) not in self._prepared:
            ensure_audit_table(conn)
            self._prepared.add(id(conn))
        query = sql.SQL("SELECT nextval(pg_get_serial_sequence({}, 'id'))").format(
            sql.Literal(f"{SCHEMA}.backfill_runs")
        )
        return conn.execute(query).fetchone()[0]

    def record(
        self,
        run: RunInfo,
        *,
        status: str,
        asset_key: str,
        table: str,
        partition: str,
        strategy: str,
        sql_hash: str,
        started_at: datetime,
        conn: psycopg.Connection | None = None,
        audit_id: int | None = None,
        effect: str = "",
        **fields: object,
    ) -> int | None:
        """Insert one complete row (``status`` plus any of rows_*, checksum_*, snapshot_rows,
        error); returns its id.

        With ``conn`` the row joins the transaction open there and errors propagate: the write
        fails rather than commit unaudited. Without, it goes through the trail's own connection,
        after the data's fate is decided: a row that cannot be written there is a warning that
        says so, and ``effect`` (what happened to the partition's rows) as it happened.
        """
        columns = {
            "id": audit_id,
            "dagster_run_id": run.dagster_run_id,
            "backfill_id": run.backfill_id,
            "asset_key": asset_key,
            "table_name": table,
            "partition_key": partition,
            "strategy": strategy,
            "code_version": code_version(),
            "sql_hash": sql_hash,
            "launched_by": run.launched_by,
            "reason": run.reason,
            "parameters": json.dumps(run.parameters, default=str),
            "started_at": started_at,
            "status": status,
            **fields,
        }
        if audit_id is None:
            del columns["id"]
        query = sql.SQL(
            "INSERT INTO {} ({}, ended_at) VALUES ({}, clock_timestamp()) RETURNING id"
        ).format(
            TABLE,
            sql.SQL(", ").join(sql.Identifier(name) for name in columns),
            sql.SQL(", ").join(sql.Placeholder() for _ in columns),
        )
        if conn is not None:
            try:
                _limit_lock_wait(conn)
                return conn.execute(query, list(columns.values())).fetchone()[0]
            except psycopg.Error as exc:
                raise _unavailable(exc) from exc
        try:
            return self._insert(query, list(columns.values()))
        except Exception as exc:
            self._warn(
                f"audit row ({status}) of {table} {partition} not written "
                f"({type(exc).__name__}: {str(exc).strip()}); {effect or 'see the run log'}"
            )
            return None

    def _insert(self, query: sql.Composed, params: list[object]) -> int:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self._url, application_name="backfill_assets.core.audit")
            ensure_audit_table(self._conn)
        return self._conn.execute(query, params).fetchone()[0]


REPORT_COLUMNS = (
    "id",
    "backfill_id",
    "table_name",
    "partition_key",
    "strategy",
    "status",
    "rows_before",
    "rows_deleted",
    "rows_inserted",
    "rows_updated",
    "rows_after",
    "snapshot_rows",
    "restored_from",
    "launched_by",
    "reason",
    "started_at",
    "error",
)


def recent_rows(conn: psycopg.Connection, *, backfill_id: str | None = None, limit: int = 20):
    """The newest audit rows as a pandas DataFrame, for people to read."""
    import pandas as pd

    ensure_audit_table(conn)
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in REPORT_COLUMNS)
    where = sql.SQL("WHERE backfill_id = %(backfill)s") if backfill_id else sql.SQL("")
    query = sql.SQL("SELECT {} FROM {} {} ORDER BY id DESC LIMIT %(limit)s").format(
        columns, TABLE, where
    )
    rows = conn.execute(query, {"backfill": backfill_id, "limit": limit}).fetchall()
    # Nullable dtypes: a count absent from a row (a refusal deletes nothing) stays an integer
    # column with a gap, not a float column.
    return pd.DataFrame(rows, columns=list(REPORT_COLUMNS)).convert_dtypes()

"""The audit trail: one row per partition written, rolled back or refused, in ``backfill_audit``.

A successful write's row is inserted inside the write's own transaction, complete and final: it
commits with the data or vanishes with it, so no write commits without its row and no row claims a
write that was rolled back, and the bookkeeping costs no commit of its own. Its id is taken from
the sequence before the transaction, so the snapshot the DELETE fills can carry it. Outcomes that
happen after a rollback (failed, refused, interrupted) are recorded through the trail's own
autocommit connection; a problem there is logged as a warning. Rollbacks still open a row as
``running`` and close it after their transaction.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from uuid import UUID

import psycopg
from psycopg import sql

from backfill_assets.core.database import connect, lock_schema_changes
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
CREATE INDEX IF NOT EXISTS backfill_runs_backfill_idx ON backfill_audit.backfill_runs (backfill_id);
CREATE INDEX IF NOT EXISTS backfill_runs_partition_idx
    ON backfill_audit.backfill_runs (table_name, partition_key);
"""

log = logging.getLogger(__name__)


def ensure_audit_table(conn: psycopg.Connection) -> None:
    with conn.transaction():
        lock_schema_changes(conn)
        conn.execute(DDL)


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

    def start(
        self,
        run: RunInfo,
        *,
        asset_key: str,
        table: str,
        partition: str,
        strategy: str,
        sql_hash: str,
        rows_before: int | None = None,
        restored_from: int | None = None,
        write_id: UUID | None = None,
    ) -> int | None:
        return self._execute(
            sql.SQL(
                "INSERT INTO {} (dagster_run_id, backfill_id, asset_key, table_name, partition_key,"
                " strategy, code_version, sql_hash, launched_by, parameters, rows_before,"
                " restored_from, write_id, status) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s,"
                " %s, %s, %s, 'running') RETURNING id"
            ).format(TABLE),
            [
                run.dagster_run_id,
                run.backfill_id,
                asset_key,
                table,
                partition,
                strategy,
                code_version(),
                sql_hash,
                run.launched_by,
                json.dumps(run.parameters, default=str),
                rows_before,
                restored_from,
                write_id,
            ],
            returning=True,
        )

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
        **fields: object,
    ) -> int | None:
        """Insert one complete row (``status`` plus any of rows_*, checksum_*, snapshot_rows,
        error); returns its id.

        With ``conn`` the row joins the transaction open there and errors propagate: the write
        fails rather than commit unaudited. Without, it goes through the trail's own connection.
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
            return conn.execute(query, list(columns.values())).fetchone()[0]
        return self._execute(query, list(columns.values()), returning=True)

    def finish(self, audit_id: int | None, status: str, **fields: object) -> None:
        """Close a row: ``status`` plus any of rows_*, checksum_*, snapshot_rows, error."""
        if audit_id is None:
            return
        assignments = sql.SQL(", ").join(
            sql.SQL("{} = %s").format(sql.Identifier(name)) for name in ["status", *fields]
        )
        self._execute(
            sql.SQL("UPDATE {} SET {}, ended_at = clock_timestamp() WHERE id = %s").format(
                TABLE, assignments
            ),
            [status, *fields.values(), audit_id],
        )

    def _execute(
        self, query: sql.Composed, params: list[object], *, returning: bool = False
    ) -> int | None:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = connect(self._url, application_name="backfill_assets.core.audit")
                ensure_audit_table(self._conn)
            cursor = self._conn.execute(query, params)
            return cursor.fetchone()[0] if returning else None
        except Exception as exc:
            self._warn(
                f"audit trail not written ({type(exc).__name__}: {exc}); the data write goes on"
            )
            return None


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
    "rows_after",
    "snapshot_rows",
    "restored_from",
    "launched_by",
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
    return pd.DataFrame(rows, columns=list(REPORT_COLUMNS))

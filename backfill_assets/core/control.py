"""Pause and resume running backfills: a switch in the database, read between partitions.

``backfill-assets pause BACKFILL_ID`` (or ``--all``) inserts a row into
``backfill_control.pauses``; every writer looks at it before each partition and, while a row
covers it, waits (polling, holding no transaction and no lock) instead of writing. Its run stays
in progress in Dagster: nothing fails, nothing is skipped. ``resume`` deletes the row and the
writers go on with the next partition. A partition being written when the pause arrives finishes
first, so a pause takes effect within one partition.

Why the database and not Dagster: the writers already hold a connection to it, a pause must reach
runs of every backfill (and writers outside Dagster) at once, and it must survive a daemon restart.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg import sql

from backfill_assets.core.database import relation_exists, schema_changes
from backfill_assets.core.tables import TableSpec
from backfill_assets.core.throttle import Throttle

SCHEMA = "backfill_control"
TABLE = sql.Identifier(SCHEMA, "pauses")
ALL = "*"
"""The scope that pauses every backfill writing to this database."""
POLL_S = 2.0
REMIND_S = 60.0

DDL = """
CREATE SCHEMA IF NOT EXISTS backfill_control;
CREATE TABLE IF NOT EXISTS backfill_control.pauses (
    scope text PRIMARY KEY,
    paused_by text NOT NULL,
    paused_at timestamptz NOT NULL DEFAULT now(),
    reason text
);
"""


@dataclass(frozen=True)
class Pause:
    scope: str
    paused_by: str
    paused_at: datetime
    reason: str | None

    def describe(self) -> str:
        what = "every backfill" if self.scope == ALL else f"backfill {self.scope}"
        why = f" ({self.reason})" if self.reason else ""
        return f"{what} paused by {self.paused_by} at {self.paused_at:%Y-%m-%d %H:%M:%S %Z}{why}"


def ensure_control_table(conn: psycopg.Connection) -> None:
    if relation_exists(conn, SCHEMA, "pauses"):
        return
    with schema_changes(conn):
        conn.execute(DDL)


def pause(conn: psycopg.Connection, scope: str, *, by: str, reason: str | None = None) -> Pause:
    """Pause ``scope`` (a backfill id, or ``ALL``); pausing what is paused keeps the first row."""
    ensure_control_table(conn)
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (scope, paused_by, reason) VALUES (%s, %s, %s) "
            "ON CONFLICT (scope) DO NOTHING"
        ).format(TABLE),
        [scope, by, reason],
    )
    return _pauses(conn, [scope])[0]


def resume(conn: psycopg.Connection, scope: str) -> bool:
    """Lift the pause of ``scope``; returns whether there was one."""
    ensure_control_table(conn)
    deleted = conn.execute(sql.SQL("DELETE FROM {} WHERE scope = %s").format(TABLE), [scope])
    return deleted.rowcount > 0


def pauses(conn: psycopg.Connection) -> list[Pause]:
    """Every pause in force, oldest first."""
    ensure_control_table(conn)
    rows = conn.execute(
        sql.SQL("SELECT scope, paused_by, paused_at, reason FROM {} ORDER BY paused_at").format(
            TABLE
        )
    ).fetchall()
    return [Pause(*row) for row in rows]


def _pauses(conn: psycopg.Connection, scopes: list[str]) -> list[Pause]:
    rows = conn.execute(
        sql.SQL(
            "SELECT scope, paused_by, paused_at, reason FROM {} WHERE scope = ANY(%s) "
            "ORDER BY paused_at"
        ).format(TABLE),
        [scopes],
    ).fetchall()
    return [Pause(*row) for row in rows]


def hold_back(
    conn: psycopg.Connection,
    tables: Iterable[TableSpec],
    backfill_ids: Iterable[str | None],
    log: Callable[[str], object],
) -> None:
    """What a table's write waits for before a partition, for the work around the writes (a
    rollback, an erasure's purge, a dbt build): the throttle of each of ``tables``
    (``ThrottleTimeout`` when the database stays under stress), then the pause switch of each
    backfill (``None``: only ``pause --all``)."""
    for table in tables:
        Throttle(conn, table, log).before_partition()
    for backfill_id in backfill_ids:
        wait_while_paused(conn, backfill_id, log)


def wait_while_paused(
    conn: psycopg.Connection,
    backfill_id: str | None,
    log: Callable[[str], object],
    *,
    poll_s: float = POLL_S,
    remind_s: float = REMIND_S,
    checkpoint: Callable[[], None] = lambda: None,
) -> float:
    """Block while a pause covers this writer; returns the seconds waited (0 if not paused).

    One indexed lookup when nothing is paused. Logs when the wait starts, every ``remind_s``
    while it lasts, and when it ends. ``checkpoint`` is called at every poll: it may raise to
    stop waiting (the run was canceled meanwhile).
    """
    if not relation_exists(conn, SCHEMA, "pauses"):
        return 0.0
    scopes = [ALL] + ([backfill_id] if backfill_id else [])
    started = time.monotonic()
    reminded: float | None = None
    while found := _pauses(conn, scopes):
        now = time.monotonic()
        if reminded is None or now - reminded >= remind_s:
            scope = "--all" if found[0].scope == ALL else found[0].scope
            log(
                f"{found[0].describe()}; waiting before the next partition "
                f"(`backfill-assets resume {scope}` lets it go on)"
            )
            reminded = now
        checkpoint()
        time.sleep(poll_s)
    waited = time.monotonic() - started
    if waited > 0.01:
        log(f"resumed after a pause of {waited:.0f}s")
    return waited

"""Throttling between partitions: a pause, and back-off while the database reports stress.

A backfill competes with the application for the same server. Before each partition the writer
can sleep a fixed pause (``throttle.pause``), then asks PostgreSQL, in one statement, for the signs
that adding load now would hurt:

- sessions waiting for a lock on the target table (``max_lock_waiters``): the table is contended;
- the oldest open transaction of another session (``max_transaction_age``): while it is open,
  vacuum cannot remove the rows a backfill deletes, so every partition adds bloat;
- active sessions (``max_active_connections``), when set: the server is busy;
- replay lag of streaming replicas (``max_replica_lag``): replicas fall behind the WAL a backfill
  writes.

While any limit is exceeded it waits, backing off from 1 s to at most 30 s, and says why; after
``max_wait`` it gives up, and the run's remaining partitions are not attempted (they keep their
rows; retry later). Sessions of other roles are only visible with ``pg_monitor`` (or
``pg_read_all_stats``): without it the transaction and activity checks see the role's own
sessions only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from backfill_assets.core.tables import TableSpec, ThrottleLimits

MAX_BACKOFF_S = 30.0
REMIND_S = 60.0

STRESS = """
SELECT
    (SELECT count(*) FROM pg_locks AS l
      WHERE l.relation = to_regclass(%(table)s) AND NOT l.granted),
    (SELECT coalesce(max(extract(epoch FROM now() - a.xact_start)), 0) FROM pg_stat_activity AS a
      WHERE a.xact_start IS NOT NULL AND a.pid <> pg_backend_pid()
        AND a.backend_type = 'client backend' AND a.datname = current_database()
        AND coalesce(a.application_name, '') NOT LIKE 'backfill_assets%%'),
    (SELECT count(*) FROM pg_stat_activity AS a
      WHERE a.state = 'active' AND a.pid <> pg_backend_pid()
        AND a.backend_type = 'client backend'),
    (SELECT coalesce(max(extract(epoch FROM r.replay_lag)), 0) FROM pg_stat_replication AS r)
"""


class ThrottleTimeout(RuntimeError):
    """The database stayed under stress longer than the table's ``max_wait``."""


@dataclass(frozen=True)
class Stress:
    lock_waiters: int
    oldest_transaction_s: float
    active_connections: int
    replica_lag_s: float

    def reasons(self, limits: ThrottleLimits) -> list[str]:
        found = []
        if self.lock_waiters > limits.max_lock_waiters:
            found.append(
                f"{self.lock_waiters} sessions wait for a lock on the table "
                f"(max_lock_waiters {limits.max_lock_waiters})"
            )
        if self.oldest_transaction_s * 1000 > limits.max_transaction_age_ms:
            found.append(
                f"a transaction has been open for {self.oldest_transaction_s:.0f}s "
                f"(max_transaction_age {limits.max_transaction_age_ms // 1000}s)"
            )
        if limits.max_active_connections and (
            self.active_connections > limits.max_active_connections
        ):
            found.append(
                f"{self.active_connections} active sessions "
                f"(max_active_connections {limits.max_active_connections})"
            )
        if self.replica_lag_s * 1000 > limits.max_replica_lag_ms:
            found.append(
                f"a replica lags {self.replica_lag_s:.0f}s behind "
                f"(max_replica_lag {limits.max_replica_lag_ms // 1000}s)"
            )
        return found


def stress(conn: psycopg.Connection, table: TableSpec) -> Stress:
    row = conn.execute(STRESS, {"table": table.identifier.as_string(conn)}).fetchone()
    return Stress(int(row[0]), float(row[1]), int(row[2]), float(row[3]))


class Throttle:
    """Call ``before_partition`` before writing each partition of a run."""

    def __init__(
        self,
        conn: psycopg.Connection,
        table: TableSpec,
        log: Callable[[str], object],
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._conn, self._table, self._log, self._sleep = conn, table, log, sleep
        self._limits = table.throttle
        self._first = True
        self.paused_s = 0.0
        """Seconds spent in pauses and back-off so far (for the run's metadata)."""

    def before_partition(self) -> None:
        if not self._first and self._limits.pause_ms:
            self._sleep(self._limits.pause_ms / 1000)
            self.paused_s += self._limits.pause_ms / 1000
        self._first = False
        started = time.monotonic()
        backoff, reminded = 1.0, None
        while reasons := stress(self._conn, self._table).reasons(self._limits):
            waited = time.monotonic() - started
            if waited * 1000 >= self._limits.max_wait_ms:
                raise ThrottleTimeout(
                    f"the database stayed under stress for {waited:.0f}s "
                    f"(max_wait {self._limits.max_wait_ms // 1000}s): {'; '.join(reasons)}"
                )
            if reminded is None or waited - reminded >= REMIND_S:
                self._log(
                    f"{self._table.qualified_name}: holding back, {'; '.join(reasons)}; "
                    f"checking again in {backoff:.0f}s"
                )
                reminded = waited
            self._sleep(backoff)
            self.paused_s += backoff
            backoff = min(backoff * 2, MAX_BACKOFF_S)
        if reminded is not None:
            self._log(
                f"{self._table.qualified_name}: going on after {time.monotonic() - started:.0f}s"
            )

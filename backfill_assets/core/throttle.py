"""Throttling between partitions: a pause, and back-off while the database reports stress.

A backfill competes with the application for the same server. Before each partition the writer
can sleep a fixed pause (``throttle.pause``), then asks PostgreSQL, in one statement, for the signs
that adding load now would hurt:

- sessions waiting for a lock on the target table (``max_lock_waiters``): the table is contended
  (in this database: ``pg_locks`` shows every database's, and databases copied from one template
  share their tables' oids);
- the oldest open transaction of another session (``max_transaction_age``): while it is open,
  vacuum cannot remove the rows a backfill deletes, so every partition adds bloat;
- active sessions (``max_active_connections``), when set: the server is busy;
- replay lag of streaming replicas (``max_replica_lag``): replicas fall behind the WAL a backfill
  writes.

While any limit is exceeded it waits, backing off from 1 s to at most 30 s, and says why; after
``max_wait`` it gives up, and the run's remaining partitions are not attempted (they keep their
rows; retry later).

A budget (``max_busy``) bounds the share of the run's wall time its writes take: after writing
for ``w`` seconds at ``max_busy: 0.3`` the run waits until the writes have taken no more than 30 %
of the time since its first partition (about ``w * 0.7 / 0.3``). A fixed ``pause`` spaces writes
equally whatever they cost; the budget spaces them by what they cost, so a day of many rows is
followed by a longer rest than a day of few. Both are waits between partitions (and between a
strategy's batches): a write itself runs at full speed.

Sessions of other roles are only visible with ``pg_monitor`` (or ``pg_read_all_stats``): without
it the transaction and activity checks see the role's own sessions only.
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
      WHERE l.relation = to_regclass(%(table)s) AND NOT l.granted
        AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())),
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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._conn, self._table, self._log, self._sleep = conn, table, log, sleep
        self._clock = clock
        self._limits = table.throttle
        self._began: float | None = None
        """When the first partition began (moved on by waits the budget does not count)."""
        self._busy_since = 0.0
        self.busy_s = 0.0
        """Seconds the run spent writing so far: from the end of one ``before_partition`` to the
        start of the next, less what ``not_busy`` says was waiting."""
        self.paused_s = 0.0
        """Seconds spent in pauses, the budget and back-off so far (for the run's metadata)."""
        self.budget_s = 0.0
        """Of ``paused_s``, the waits the budget (``max_busy``) imposed."""

    def not_busy(self, seconds: float) -> None:
        """``seconds`` since ``before_partition`` returned were spent waiting for the pause
        switch: neither writing nor rest for the budget (see ``_not_counted``)."""
        self._busy_since = min(self._busy_since + seconds, self._clock())
        self._not_counted(seconds)

    def _not_counted(self, seconds: float) -> None:
        """Leave ``seconds`` out of the budget's clock. A wait for the pause switch or for a
        stressed database is not rest the run may then write through: after a 10-minute pause
        a run at ``max_busy: 0.3`` keeps resting as before, instead of writing without a rest
        for minutes on the credit."""
        if self._began is not None:
            self._began += seconds

    def before_partition(self) -> None:
        now = self._clock()
        if self._began is None:  # the run's first partition: nothing to rest after
            self._began = now
        else:
            self.busy_s += now - self._busy_since
            if self._limits.pause_ms:
                self._sleep(self._limits.pause_ms / 1000)
                self.paused_s += self._limits.pause_ms / 1000
            self._keep_budget()
        stressed_from = self._clock()
        self._wait_while_stressed()
        self._not_counted(self._clock() - stressed_from)
        self._busy_since = self._clock()

    def _keep_budget(self) -> None:
        """Wait until the writes so far took at most ``max_busy`` of the run's wall time (less
        its waits for the pause switch and the stress checks)."""
        share = self._limits.max_busy
        if share >= 1:
            return
        due = self.busy_s / share - (self._clock() - self._began)
        if due >= REMIND_S:
            self._log(
                f"{self._table.qualified_name}: resting {due:.0f}s to keep its writes within "
                f"max_busy {share:.0%} of the time"
            )
        if due > 0:
            self._sleep(due)
            self.paused_s += due
            self.budget_s += due

    def _wait_while_stressed(self) -> None:
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

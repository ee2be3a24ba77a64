"""How long a session the project opens may wait for a lock, and run one statement.

Every connection is opened with a ``lock_timeout`` and a ``statement_timeout`` (libpq's
``options``: they apply from the first statement on). A read or write of the project's own tables
(the audit trail, snapshots, pause switches, run sizing's history) that meets a lock another
session holds gives up after the lock timeout, instead of waiting as long as the lock is held
and making every session behind it wait too. A write sets its table's declared ``timeouts`` per
transaction on top (``writer.apply_timeouts``). docs/checks-and-audit.md lists every connection.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from psycopg.conninfo import conninfo_to_dict

from backfill_assets.core import settings

BOOKKEEPING_LOCK_MS = 5_000
"""The project's own tables: a lock not granted in 5 s is held by something long (a migration,
a VACUUM FULL, a forgotten transaction), not by another backfill's few-millisecond insert."""
BOOKKEEPING_STATEMENT_MS = 60_000
"""Reading or writing bookkeeping rows takes milliseconds; a minute is a hung statement."""
LOAD_LOCK_MS = 2_000
"""The definitions load (every run, code server and sensor tick loads them) waits 2 s at most."""
LOAD_STATEMENT_MS = 10_000


@dataclass(frozen=True)
class SessionLimits:
    """A session's ``lock_timeout`` and ``statement_timeout`` in milliseconds; 0 is no limit."""

    lock_ms: int
    statement_ms: int

    def options(self, url: str) -> str:
        """libpq ``options`` for a connection to ``url``: these limits, then ``PGOPTIONS`` and
        the URL's own ``options``, which win where they set the same parameter (the last ``-c``
        wins)."""
        ours = f"-c lock_timeout={self.lock_ms}ms -c statement_timeout={self.statement_ms}ms"
        given = [os.environ.get("PGOPTIONS", ""), conninfo_to_dict(url).get("options", "")]
        return " ".join(filter(None, [ours, *given]))

    def at_most(self, other: SessionLimits) -> SessionLimits:
        return SessionLimits(
            min(self.lock_ms, other.lock_ms), min(self.statement_ms, other.statement_ms)
        )

    def describe(self) -> str:
        return f"lock timeout {self.lock_ms} ms, statement timeout {self.statement_ms} ms"


WAITING_FOR_TURN = SessionLimits(lock_ms=0, statement_ms=0)
"""For a connection that only holds the advisory locks by which runs take turns (a first dbt
build, overlapping days): waiting there is the point, as long as the other run's statements take,
and those are bounded themselves."""


def bookkeeping() -> SessionLimits:
    """Every connection's limits unless it is given others: ``BACKFILL_LOCK_TIMEOUT_MS`` and
    ``BACKFILL_STATEMENT_TIMEOUT_MS``, else 5 s and 60 s."""
    return SessionLimits(
        settings.milliseconds(settings.LOCK_TIMEOUT_ENV, BOOKKEEPING_LOCK_MS),
        settings.milliseconds(settings.STATEMENT_TIMEOUT_ENV, BOOKKEEPING_STATEMENT_MS),
    )


def definitions_load() -> SessionLimits:
    """Reads while Dagster loads the definitions: 2 s and 10 s, or less when configured so."""
    return SessionLimits(LOAD_LOCK_MS, LOAD_STATEMENT_MS).at_most(bookkeeping())


def of_tables(timeouts: Iterable) -> SessionLimits:
    """For work over several declared tables' data (``Timeouts`` of each): the shortest lock
    timeout, the longest statement timeout, as their own writes have; bookkeeping's without
    any."""
    declared = list(timeouts)
    if not declared:
        return bookkeeping()
    return SessionLimits(min(t.lock_ms for t in declared), max(t.statement_ms for t in declared))


def snapshots_of(timeouts: Iterable) -> SessionLimits:
    """For the snapshot tables of declared tables (``Timeouts`` of each): the project's own
    tables, so bookkeeping's lock timeout; they hold the tables' rows, so the longest statement
    timeout of the tables."""
    return SessionLimits(bookkeeping().lock_ms, of_tables(timeouts).statement_ms)


class TimedOut(RuntimeError):
    """A statement gave up on a lock, or ran over its limit; nothing of it was applied."""


@contextmanager
def timed(what: str, limits: SessionLimits | None = None) -> Iterator[None]:
    """Say which table (``what``) a lock or statement timeout in the body was met on, under which
    limit (``limits``, when known), and what to do: one line (``TimedOut``) instead of the
    driver's traceback."""
    try:
        yield
    except psycopg.errors.LockNotAvailable:
        within = f"within {limits.lock_ms} ms" if limits else "within its lock timeout"
        raise TimedOut(
            f"{what}: a lock was not granted {within}: another session holds a lock on it "
            "(find it in pg_locks and pg_stat_activity); nothing was changed. Try again once it "
            f"is released, or raise {settings.LOCK_TIMEOUT_ENV}"
        ) from None
    except psycopg.errors.QueryCanceled as exc:
        if "statement timeout" not in str(exc):
            raise
        over = f"over {limits.statement_ms} ms" if limits else "over its statement timeout"
        raise TimedOut(
            f"{what}: a statement ran {over} and was cancelled; nothing was changed. Raise "
            f"{settings.STATEMENT_TIMEOUT_ENV} if it needs longer"
        ) from None

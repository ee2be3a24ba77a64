"""Opening connections, with errors that say which server failed and what to do."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from backfill_assets.core.session_limits import WAITING_FOR_TURN, SessionLimits, bookkeeping
from backfill_assets.core.settings import redact, with_database


class DatabaseUnavailableError(RuntimeError):
    """PostgreSQL could not be reached; nothing was read or written."""


def connect(
    url: str,
    *,
    application_name: str = "backfill_assets",
    variable: str = "BACKFILL_PG_URL",
    limits: SessionLimits | None = None,
) -> psycopg.Connection:
    """An autocommit connection: every write path opens its own explicit transaction.

    Its statements run under ``limits`` (``session_limits.bookkeeping()`` unless given): none
    waits for a lock, or runs, without end. A failure names the server, the URL's ``variable``
    and libpq's own reason ("Connection refused", "password authentication failed ...").
    """
    options = (limits or bookkeeping()).options(url)
    try:
        return psycopg.connect(
            url, autocommit=True, application_name=application_name, options=options
        )
    except psycopg.OperationalError as exc:
        reason = libpq_reason(exc)
        hint = (
            f"Check the user, password and database name in {variable}."
            if "FATAL" in reason
            else "Is the server running? For the embedded one run `backfill-assets db start`; "
            f"for your own server check {variable}."
        )
        raise DatabaseUnavailableError(
            f"cannot connect to PostgreSQL at {redact(url)} ({variable}): {reason}. {hint}"
        ) from None


def libpq_reason(exc: Exception) -> str:
    """libpq's reason for a failed connection, one line per address tried, without its hints.

    psycopg's message is "connection failed: connection to server at "h", port p failed: REASON"
    followed by hint lines ("Is the server running on that host ..."), which alone say nothing.
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    reasons = [line.removeprefix("connection failed: ") for line in lines if "failed:" in line]
    return "; ".join(reasons or lines[:1]) or type(exc).__name__


@contextmanager
def schema_changes(conn: psycopg.Connection) -> Iterator[None]:
    """A transaction for ``CREATE ... IF NOT EXISTS`` statements, one run at a time.

    Two runs starting together would otherwise race in the catalog: IF NOT EXISTS does not stop
    a concurrent CREATE of the same name from failing with a unique violation. The lock is taken
    *before* the transaction begins: a transaction that waited for it inside would still look
    names up in the catalog as it was when it began, miss what the other run just created, and
    fail on it all the same.
    """
    with waiting_for_turn(conn):
        conn.execute("SELECT pg_advisory_lock(hashtext('backfill_assets.schema_changes'))")
    try:
        with conn.transaction():
            yield
    finally:
        if not conn.closed and not conn.broken:
            conn.execute("SELECT pg_advisory_unlock(hashtext('backfill_assets.schema_changes'))")


@contextmanager
def waiting_for_turn(conn: psycopg.Connection) -> Iterator[None]:
    """No lock or statement timeout for the body's advisory lock waits (outside a transaction):
    runs take turns by them, as long as the other run's bounded statements take. The session's
    limits apply again after."""
    limits = conn.execute(
        "SELECT current_setting('lock_timeout'), current_setting('statement_timeout')"
    ).fetchone()
    conn.execute("SET lock_timeout = 0; SET statement_timeout = 0")
    try:
        yield
    finally:
        if not conn.closed and not conn.broken:
            conn.execute(
                "SELECT set_config('lock_timeout', %s, false), "
                "set_config('statement_timeout', %s, false)",
                list(limits),
            )


def relation_exists(conn: psycopg.Connection, schema: str, name: str) -> bool:
    """Whether ``schema.name`` exists; the name is quoted, so any spelling resolves exactly."""
    qualified = sql.Identifier(schema, name).as_string(conn)
    return conn.execute("SELECT to_regclass(%s)", [qualified]).fetchone()[0] is not None


def column_names(conn: psycopg.Connection, schema: str, name: str) -> set[str]:
    """The columns of ``schema.name`` (empty when it does not exist)."""
    qualified = sql.Identifier(schema, name).as_string(conn)
    rows = conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 "
        "AND NOT attisdropped",
        [qualified],
    )
    return {column for (column,) in rows}


def missing_relations(
    conn: psycopg.Connection, relations: Sequence[tuple[str, str]]
) -> list[tuple[str, str]]:
    """Which of the ``(schema, name)`` relations do not exist yet."""
    return [relation for relation in relations if not relation_exists(conn, *relation)]


@contextmanager
def first_build_lock(
    url: str, relations: Sequence[tuple[str, str]], *, name: str
) -> Iterator[list[tuple[str, str]]]:
    """Run the body alone while any of ``relations`` does not exist yet; yields the missing ones.

    A tool that creates its table on first use (dbt's incremental models: ``create table`` when the
    relation is missing, ``delete+insert`` after) fails when two runs of a backfill build it at
    the same time: both see no table, one gets "relation already exists". Holding an advisory
    lock only until the tables exist serialises that first build and nothing after it: a run that
    waited finds the table and goes on as an ordinary incremental run.
    """
    with connect(url, application_name="backfill_assets.first_build") as conn:
        missing = missing_relations(conn, relations)
    if not missing:  # the common case: no lock, and no connection held while the body runs
        yield missing
        return
    key = f"backfill_assets.first_build.{name}"
    with connect(
        url, application_name="backfill_assets.first_build", limits=WAITING_FOR_TURN
    ) as conn:
        conn.execute("SELECT pg_advisory_lock(hashtext(%s))", [key])
        try:
            yield missing_relations(conn, missing)
        finally:
            conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", [key])


def ensure_database(url: str, *, create: bool = True, variable: str = "the URL") -> bool:
    """Create the database named in ``url`` if it is missing; returns whether it was created.

    With ``create=False`` a missing database is an error naming it and ``variable``: a typo in a
    URL must not quietly give the user a new, empty database that reports "no rows yet".
    """
    dbname = conninfo_to_dict(url).get("dbname")
    if not dbname:
        raise ValueError(f"no database name in {redact(url)}")
    try:
        connect(url, variable=variable).close()
        return False
    except DatabaseUnavailableError as exc:
        if f'database "{dbname}" does not exist' not in str(exc):
            raise  # unreachable, refused login, a role that does not exist: said as it is
        if not create:
            raise DatabaseUnavailableError(
                f"database {dbname!r} does not exist ({variable}: {redact(url)}). Correct the "
                "name, or create it: `backfill-assets db start` creates the databases the URLs "
                "name (the role needs CREATEDB)"
            ) from None
    with connect(with_database(url, "postgres"), variable=variable) as conn:
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        except psycopg.errors.InsufficientPrivilege:
            user = conn.info.user
            raise DatabaseUnavailableError(
                f"database {dbname!r} does not exist ({variable}: {redact(url)}) and role "
                f"{user!r} may not create it (no CREATEDB). Create it as a superuser "
                f'(CREATE DATABASE "{dbname}" OWNER "{user}"), or grant the role CREATEDB, or '
                f"correct the name in {variable}"
            ) from None
    return True

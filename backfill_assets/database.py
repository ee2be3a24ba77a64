"""Opening connections, with errors that say which server failed and what to do."""

from __future__ import annotations

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from backfill_assets.settings import redact, with_database


class DatabaseUnavailableError(RuntimeError):
    """PostgreSQL could not be reached; nothing was read or written."""


def connect(url: str, *, application_name: str = "backfill_assets") -> psycopg.Connection:
    """An autocommit connection: every write path opens its own explicit transaction."""
    try:
        return psycopg.connect(url, autocommit=True, application_name=application_name)
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise DatabaseUnavailableError(
            f"cannot connect to PostgreSQL at {redact(url)}: {reason}. "
            "Is the server running? For the embedded one run `backfill-assets db start`; "
            "for your own server check BACKFILL_PG_URL."
        ) from None


def lock_schema_changes(conn: psycopg.Connection) -> None:
    """Serialise this transaction's CREATE ... IF NOT EXISTS with other runs'.

    Two runs starting together would otherwise race in the catalog: IF NOT EXISTS does not stop
    a concurrent CREATE of the same name from failing with a unique violation.
    """
    conn.execute("SELECT pg_advisory_xact_lock(hashtext('backfill_assets.schema_changes'))")


def ensure_database(url: str) -> bool:
    """Create the database named in ``url`` if it is missing; returns whether it was created."""
    dbname = conninfo_to_dict(url).get("dbname")
    if not dbname:
        raise ValueError(f"no database name in {redact(url)}")
    try:
        connect(url).close()
        return False
    except DatabaseUnavailableError as exc:
        if "does not exist" not in str(exc):
            raise
    with connect(with_database(url, "postgres")) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    return True

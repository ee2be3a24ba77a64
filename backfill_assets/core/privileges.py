"""The privileges a backfill role needs, checked up front so a missing one is one clear message.

Without this check a least-privilege role fails deep inside a run: "permission denied to create
temporary tables" in every partition, "permission denied for database" at the first
``CREATE SCHEMA IF NOT EXISTS`` (PostgreSQL checks the privilege before looking whether the schema
exists), "permission denied for schema public" inside Dagster's storage set-up. Each check here is
one catalog query and answers with the exact ``GRANT`` statements to run. The same list is in the
README ("Least privilege").
"""

from __future__ import annotations

from collections.abc import Iterable

import psycopg
from psycopg import sql


class PrivilegeError(RuntimeError):
    """The role of a URL lacks privileges the project needs; nothing was written."""


def _grant(conn: psycopg.Connection, privileges: list[str], on: sql.Composable, role: str) -> str:
    return (
        sql.SQL("GRANT {} ON {} TO {};")
        .format(sql.SQL(", ").join(sql.SQL(p) for p in privileges), on, sql.Identifier(role))
        .as_string(conn)
    )


def missing_data_grants(
    conn: psycopg.Connection, sources: Iterable[str] = (), updated: Iterable[str] = ()
) -> list[str]:
    """GRANTs the role lacks in the data database: CREATE (the schemas it builds, audit and
    snapshots) and TEMPORARY on the database, USAGE on each source's schema, SELECT on it, and
    SELECT and UPDATE on each table updated in place (``strategy: batched_update``).

    A source that does not exist yet is left to the contract check, which names it.
    """
    writes = set(updated)
    role, database, create, temporary = conn.execute(
        "SELECT current_user, current_database(), "
        "has_database_privilege(current_database(), 'CREATE'), "
        "has_database_privilege(current_database(), 'TEMPORARY')"
    ).fetchone()
    grants = []
    lacking = [name for name, held in (("CREATE", create), ("TEMPORARY", temporary)) if not held]
    if lacking:
        grants.append(
            _grant(conn, lacking, sql.SQL("DATABASE {}").format(sql.Identifier(database)), role)
        )
    for source in sorted(set(sources) | writes):
        schema, _, name = source.partition(".")
        found = conn.execute(
            "SELECT has_schema_privilege(n.oid, 'USAGE'), (SELECT has_table_privilege(c.oid, "
            "'SELECT') FROM pg_class AS c WHERE c.relnamespace = n.oid AND c.relname = %s), "
            "(SELECT has_table_privilege(c.oid, 'UPDATE') FROM pg_class AS c "
            "WHERE c.relnamespace = n.oid AND c.relname = %s) "
            "FROM pg_namespace AS n WHERE n.nspname = %s",
            [name, name, schema],
        ).fetchone()
        if found is None:
            continue
        usage, select, update = found
        if not usage:
            grants.append(
                _grant(conn, ["USAGE"], sql.SQL("SCHEMA {}").format(sql.Identifier(schema)), role)
            )
        lacking = [p for p, held in (("SELECT", select), ("UPDATE", update)) if held is False]
        if source not in writes:
            lacking = [p for p in lacking if p == "SELECT"]
        if lacking:
            grants.append(_grant(conn, lacking, sql.Identifier(schema, name), role))
    return grants


def missing_dagster_grants(conn: psycopg.Connection) -> list[str]:
    """GRANTs the role lacks in Dagster's storage database: USAGE and CREATE on schema public
    while Dagster's tables do not exist yet (not granted to ordinary roles since PostgreSQL 15),
    then read and write on those tables if another role created them."""
    role, usage, create, runs_writable = conn.execute(
        "SELECT current_user, has_schema_privilege('public', 'USAGE'), "
        "has_schema_privilege('public', 'CREATE'), (SELECT has_table_privilege(c.oid, "
        "'INSERT') AND has_table_privilege(c.oid, 'UPDATE') FROM pg_class AS c "
        "JOIN pg_namespace AS n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relname = 'runs')"
    ).fetchone()
    public = sql.SQL("SCHEMA public")
    if runs_writable is None:
        lacking = [name for name, held in (("USAGE", usage), ("CREATE", create)) if not held]
        return [_grant(conn, lacking, public, role)] if lacking else []
    grants = [] if usage else [_grant(conn, ["USAGE"], public, role)]
    if not runs_writable:
        tables = sql.SQL("ALL TABLES IN SCHEMA public")
        sequences = sql.SQL("ALL SEQUENCES IN SCHEMA public")
        grants.append(_grant(conn, ["SELECT", "INSERT", "UPDATE", "DELETE"], tables, role))
        grants.append(_grant(conn, ["USAGE", "SELECT", "UPDATE"], sequences, role))
    return grants


def privilege_error(conn: psycopg.Connection, grants: list[str], variable: str) -> PrivilegeError:
    role, database = conn.execute("SELECT current_user, current_database()").fetchone()
    statements = "\n".join(f"  {grant}" for grant in grants)
    return PrivilegeError(
        f"role {role!r} lacks privileges in database {database!r} ({variable}). As the "
        f"database's owner or a superuser, run:\n{statements}\n"
        "(every privilege the project needs: README, 'Least privilege')"
    )


def require_data_grants(
    conn: psycopg.Connection, sources: Iterable[str], variable: str, updated: Iterable[str] = ()
) -> None:
    grants = missing_data_grants(conn, sources, updated)
    if grants:
        raise privilege_error(conn, grants, variable)


def require_dagster_grants(conn: psycopg.Connection, variable: str) -> None:
    grants = missing_dagster_grants(conn)
    if grants:
        raise privilege_error(conn, grants, variable)

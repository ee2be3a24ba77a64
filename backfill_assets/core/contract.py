"""The SQL contract of a table: its query yields exactly the declared columns, for a window.

Checked when the definitions load, and again at the start of every run before anything is
written, so a mistake in a table's SQL is one clear message instead of a database error in the
middle of a backfill. PostgreSQL describes the query's result without reading a row (``LIMIT 0``
over the query, bound with the first partition's start).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import psycopg
from psycopg import errors, sql

from backfill_assets.core.database import column_names
from backfill_assets.core.session_limits import TimedOut, definitions_load, timed
from backfill_assets.core.strategies import strategy_of
from backfill_assets.core.tables import TableSpec

PLACEHOLDERS = ("start", "end")
_PLACEHOLDER = re.compile(r"(?<!%)%\((\w+)\)s")
_PLAIN = re.compile(r"^[a-z_][a-z0-9_$]*$")


class ContractError(ValueError):
    """A table's SQL does not yield its declared columns; nothing was written."""


class SourceNotReady(Exception):
    """The query reads a schema or table that does not exist yet: the contract cannot be checked."""


def _where(table: TableSpec) -> str:
    sql_file = table.sql_path or "batched_update.set"
    declaration = f" (declared in {table.declared_in})" if table.declared_in else ""
    return f"table {table.qualified_name}: {sql_file}{declaration}"


def check_placeholders(table: TableSpec) -> None:
    used = set(_PLACEHOLDER.findall(table.query))
    missing = [p for p in PLACEHOLDERS if p not in used]
    unknown = sorted(used - set(PLACEHOLDERS))
    if missing or unknown:
        problems = []
        if missing:
            problems.append("does not use " + ", ".join(f"%({p})s" for p in missing))
        if unknown:
            problems.append("uses unknown " + ", ".join(f"%({p})s" for p in unknown))
        raise ContractError(
            f"{_where(table)} {' and '.join(problems)}; the SELECT must filter its rows to the "
            "window with %(start)s (inclusive) and %(end)s (exclusive), and write a literal % as %%"
        )


def result_columns(conn: psycopg.Connection, table: TableSpec) -> list[str]:
    """The names of the columns the table's query yields, without reading any row."""
    # Any window will do to describe the result; the first day exists even before a partition does.
    window = {"start": table.partitioning.start, "end": table.partitioning.start}
    query = sql.SQL("SELECT * FROM ({}) AS src LIMIT 0").format(table.source_query)
    try:
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(query, window)
            return [column.name for column in cur.description or []]
    except (errors.UndefinedTable, errors.InvalidSchemaName) as exc:
        raise SourceNotReady(str(exc).strip().splitlines()[0]) from None
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ContractError(f"{_where(table)} does not run: {reason}") from None


def check_types(conn: psycopg.Connection, table: TableSpec) -> None:
    """Every declared column type is one PostgreSQL knows (``bigit`` or ``bigint not nul`` would
    otherwise surface as a database error in the middle of a run)."""
    unknown = []
    for column in table.columns:
        try:
            with conn.transaction():
                known = conn.execute("SELECT to_regtype(%s)", [column.type]).fetchone()[0]
        except psycopg.Error:
            known = None
        if known is None:
            unknown.append(f"{column.name}: {column.type!r}")
    if unknown:
        raise ContractError(
            f"table {table.qualified_name} (declared in {table.declared_in}) has column types "
            f"PostgreSQL does not know: {', '.join(unknown)}; write a type such as bigint, "
            "numeric(12,2), text, date or timestamptz, optionally followed by 'not null'"
        )


def check_measures(conn: psycopg.Connection, table: TableSpec) -> None:
    """Every measure's declared type is one PostgreSQL can sum: ``measures_reconcile`` compares
    sums, so a text measure would otherwise refuse every partition at run time, blaming the SQL."""
    types = {column.name: column.type for column in table.columns}
    unsummable = []
    for name in table.measures:
        try:
            with conn.transaction():
                canonical = conn.execute(
                    "SELECT format_type(to_regtype(%s), NULL)", [types[name]]
                ).fetchone()[0]
                if canonical is not None:  # an unknown type is check_types' to name
                    conn.execute(sql.SQL("SELECT sum(NULL::{})").format(sql.SQL(canonical)))
        except errors.UndefinedFunction:
            unsummable.append(f"{name} ({types[name]})")
        except psycopg.Error:
            continue
    if unsummable:
        raise ContractError(
            f"table {table.qualified_name} (declared in {table.declared_in}): measures "
            f"{', '.join(unsummable)} cannot be summed; a measure's sum is reconciled with the "
            "source, so it must be a number (integer, bigint, numeric, real): remove it from "
            "measures, or declare a numeric column"
        )


def check_contract(conn: psycopg.Connection, table: TableSpec) -> None:
    """Raise ``ContractError`` naming unknown types, unsummable measures, missing and extra
    columns; ``SourceNotReady`` if the sources do not exist yet. What the table's SQL must yield
    is its strategy's to check (``check_query`` for a SELECT per window)."""
    check_measures(conn, table)
    strategy_of(table).check_contract(conn, table)


def check_query(conn: psycopg.Connection, table: TableSpec) -> None:
    """The table's SQL file filters on the window and yields exactly the declared columns."""
    check_placeholders(table)
    check_types(conn, table)
    yielded = result_columns(conn, table)
    declared = list(table.column_names)
    missing = [c for c in declared if c not in yielded]
    extra = [c for c in yielded if c not in declared]
    duplicated = sorted({c for c in yielded if yielded.count(c) > 1})
    if missing or extra or duplicated:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(missing))
        if extra:
            parts.append("extra " + ", ".join(extra))
        if duplicated:
            parts.append("repeated " + ", ".join(duplicated))
        raise ContractError(
            f"{_where(table)} does not yield the declared columns: {'; '.join(parts)}. "
            "Make the SELECT return exactly the columns of the declaration, by name "
            "(alias them with AS), or change the declaration."
        )


def check_target(conn: psycopg.Connection, table: TableSpec) -> None:
    """An existing target table must have every declared column (a declaration that gained a
    column needs the table altered first), of the declared type, NOT NULL and CHECKs
    (``check_columns``); raises ``ContractError`` saying how."""
    existing = column_names(conn, table.schema, table.name)
    if existing:
        kind = conn.execute(
            "SELECT relkind FROM pg_class WHERE oid = to_regclass(%s)",
            [table.identifier.as_string(conn)],
        ).fetchone()
        strategy_of(table).check_target_kind(table, kind is not None and kind[0] == "p")
    missing = [c for c in table.columns if existing and c.name not in existing]
    if missing:
        alters = "; ".join(
            f"ALTER TABLE {table.qualified_name} ADD COLUMN {c.name} {c.type}" for c in missing
        )
        raise ContractError(
            f"table {table.qualified_name} exists without the declared column(s) "
            f"{', '.join(c.name for c in missing)} (declared in {table.declared_in}); add them "
            f"({alters}) or drop the table to have it created anew"
        )
    if existing:
        check_columns(conn, table, in_full=strategy_of(table).declares_target)


def check_columns(conn: psycopg.Connection, table: TableSpec, *, in_full: bool) -> None:
    """The existing target's declared columns are what the declaration says: their types and,
    ``in_full``, their NOT NULL and the CHECKs over declared columns (as PostgreSQL prints them:
    the declaration is put into a temporary table, rolled back, and both catalogs compared).
    Raises ``ContractError`` with the ``ALTER TABLE`` statements that make the table match."""
    target = _described(conn, table.identifier.as_string(conn), table.column_names)
    if not target:
        return
    try:
        with conn.transaction(force_rollback=True):
            conn.execute(
                sql.SQL("CREATE TEMP TABLE backfill_declared ({})").format(
                    table.column_definitions()
                )
            )
            declared = _described(conn, "pg_temp.backfill_declared", table.column_names)
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ContractError(
            f"table {table.qualified_name}: its declared columns ({table.declared_in}) do not "
            f"make a table: {reason}; fix the column's type or check"
        ) from None
    name = _shown(conn, table.schema, table.name)
    problems, alters = [], []
    for column in table.columns:
        (is_type, is_not_null), (want_type, want_not_null) = (
            target[0][column.name],
            declared[0][column.name],
        )
        quoted = _shown(conn, column.name)
        if is_type != want_type:
            problems.append(f"{column.name} is {is_type}, declared {want_type}")
            alters.append(f"ALTER TABLE {name} ALTER COLUMN {quoted} TYPE {want_type}")
        if in_full and is_not_null != want_not_null:
            problems.append(
                f"{column.name} is {'NOT NULL' if is_not_null else 'nullable'}, declared "
                f"{'not null' if want_not_null else 'nullable'}"
            )
            action = "SET" if want_not_null else "DROP"
            alters.append(f"ALTER TABLE {name} ALTER COLUMN {quoted} {action} NOT NULL")
    if in_full:
        have, want = target[1], declared[1]
        for definition in sorted(set(want.values()) - set(have.values())):
            problems.append(f"no {definition}")
            alters.append(f"ALTER TABLE {name} ADD {definition}")
        for constraint, definition in sorted(have.items()):
            if definition not in want.values():
                problems.append(f"undeclared {definition}")
                quoted = _shown(conn, constraint)
                alters.append(f"ALTER TABLE {name} DROP CONSTRAINT {quoted}")
    if problems:
        raise ContractError(
            f"table {table.qualified_name} exists but differs from its declaration "
            f"({table.declared_in}): {'; '.join(problems)}. Make the table match "
            f"({'; '.join(alters)}), or change the declaration"
        )


def _shown(conn: psycopg.Connection, *names: str) -> str:
    """``names`` as a statement to copy writes them: bare when PostgreSQL would not fold them,
    quoted otherwise."""
    if all(_PLAIN.match(n) for n in names):
        return ".".join(names)
    return sql.Identifier(*names).as_string(conn)


def _described(
    conn: psycopg.Connection, relation: str, columns: Iterable[str]
) -> tuple[dict[str, tuple[str, bool]], dict[str, str]] | None:
    """``relation``'s ``columns`` as (type, NOT NULL), and its CHECK constraints over those
    columns only, by name (None when the relation does not exist)."""
    names = list(columns)
    types = conn.execute(
        "SELECT attname, format_type(atttypid, atttypmod), attnotnull FROM pg_attribute "
        "WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped "
        "AND attname = ANY(%s)",
        [relation, names],
    ).fetchall()
    if not types:
        return None
    checks = conn.execute(
        "SELECT c.conname, pg_get_constraintdef(c.oid) FROM pg_constraint AS c "
        "WHERE c.conrelid = to_regclass(%s) AND c.contype = 'c' AND NOT EXISTS (SELECT 1 "
        "FROM unnest(c.conkey) AS k (attnum) JOIN pg_attribute AS a ON a.attrelid = c.conrelid "
        "AND a.attnum = k.attnum WHERE NOT a.attname = ANY(%s))",
        [relation, names],
    ).fetchall()
    return {n: (t, nn) for n, t, nn in types}, dict(checks)


def refuse_partitioned(table: TableSpec, partitioned: bool) -> None:
    """``Strategy.check_target_kind`` of the strategies that write a plain table: a natively
    partitioned one is ``partition_swap``'s."""
    if partitioned:
        raise ContractError(
            f"table {table.qualified_name} is natively partitioned; declare it with strategy: "
            f"partition_swap in {table.declared_in}"
        )


def check_table(conn: psycopg.Connection, table: TableSpec) -> str:
    """One line for people: ``ok``, ``error: ...`` or why it could not be checked."""
    try:
        check_contract(conn, table)
        check_target(conn, table)
    except ContractError as exc:
        return f"error: {exc}"
    except SourceNotReady as exc:
        return f"not checked yet: {exc} (the source does not exist)"
    return f"ok: {strategy_of(table).contract_kept}"


def check_contracts(tables: Iterable[TableSpec], url: str) -> list[str]:
    """Check every table's contract; returns why a table could not be checked (no database, no
    source yet). A mismatch raises ``ContractError``: the definitions must not load with it."""
    try:
        limits = definitions_load()
        conn = psycopg.connect(
            url, autocommit=True, connect_timeout=10, options=limits.options(url)
        )
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return [f"SQL contracts not checked at load, the database is not reachable: {reason}"]
    unchecked = []
    with conn:
        for table in tables:
            try:
                with timed(f"{table.qualified_name}'s source", limits):
                    check_contract(conn, table)
            except TimedOut as exc:
                unchecked.append(
                    f"SQL contract not checked at load: {exc}; it is checked again before each "
                    "run writes"
                )
            except SourceNotReady as exc:
                unchecked.append(
                    f"{table.qualified_name}: SQL contract not checked at load ({exc}); "
                    "it is checked again before each run writes"
                )
    return unchecked

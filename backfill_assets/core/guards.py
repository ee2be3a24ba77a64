"""The guard before a write: is the source sane enough to replace what the partition holds?

Runs before anything is deleted. A source that came back empty, shrank sharply, or carries NULL
keys most likely means a broken upstream load, not a real change: replacing the partition with it
would wipe good data. Intended shrinks (a GDPR erasure, a cleanup) pass with the explicit, logged
``allow_shrink`` override.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
from psycopg import sql

from backfill_assets.core.database import relation_exists
from backfill_assets.core.fingerprint import sums_of
from backfill_assets.core.outcomes import CheckOutcome, SourceStats
from backfill_assets.core.params import ALLOW_SHRINK, BackfillParams
from backfill_assets.core.partitioning import PartitionWindow
from backfill_assets.core.strategies import strategy_of
from backfill_assets.core.tables import TableSpec

WINDOW = sql.Identifier("backfill_window")
"""Alias of the VALUES list of windows in the one-statement measurements below."""
WINDOWS_PER_STATEMENT = 5000
"""PostgreSQL binds at most 65,535 parameters in a statement and a window takes three: a long
range (a year of hours is 8,760 windows) is measured in statements of this many windows."""


def in_statements(windows: list[PartitionWindow]) -> Iterator[list[PartitionWindow]]:
    """``windows`` in slices of at most ``WINDOWS_PER_STATEMENT``."""
    for first in range(0, len(windows), WINDOWS_PER_STATEMENT):
        yield windows[first : first + WINDOWS_PER_STATEMENT]


def windows_values(windows: list[PartitionWindow]) -> tuple[sql.Composed, dict[str, object]]:
    rows, params = [], {}
    for number, window in enumerate(windows):
        bound = sql.SQL(window.bounds_type)
        rows.append(
            sql.SQL("({}::text, {}::{bound}, {}::{bound})").format(
                *(sql.Placeholder(f"{p}{number}") for p in "kse"), bound=bound
            )
        )
        params |= {f"k{number}": window.key, f"s{number}": window.start, f"e{number}": window.end}
    values = sql.SQL("(VALUES {}) AS {} (key, window_start, window_end)").format(
        sql.SQL(", ").join(rows), WINDOW
    )
    return values, params


def query_per_window(table: TableSpec) -> sql.SQL:
    """The table's query, its window read from the row of ``WINDOW`` instead of parameters.

    Bound values and these columns have the same type (``PartitionWindow.bounds_type``), so each
    window's rows are exactly those the write's INSERT will select.
    """
    text = table.query_text
    text = text.replace("%(start)s", '"backfill_window"."window_start"')
    return sql.SQL(text.replace("%(end)s", '"backfill_window"."window_end"'))


def per_window(
    table: TableSpec,
    windows: list[PartitionWindow],
    columns: sql.Composable,
    where: sql.Composable | None = None,
) -> tuple[sql.Composed, dict[str, object]]:
    """One statement yielding ``key, <columns>`` per window: ``columns`` (aggregates) over the
    rows the table's query yields for that window (``src``), optionally filtered by ``where``.
    The query runs once per window (``LATERAL``), on exactly the rows a write would read."""
    values, params = windows_values(windows)
    query = sql.SQL(
        "SELECT {window}.key, measured.* FROM {values} CROSS JOIN LATERAL "
        "(SELECT {columns} FROM ({source}) AS src{where}) AS measured"
    ).format(
        window=WINDOW,
        values=values,
        columns=columns,
        source=query_per_window(table),
        where=sql.SQL(" WHERE {}").format(where) if where is not None else sql.SQL(""),
    )
    return query, params


def fetch_per_window(
    conn: psycopg.Connection,
    table: TableSpec,
    windows: list[PartitionWindow],
    columns: sql.Composable,
    where: sql.Composable | None = None,
    params: dict[str, object] | None = None,
) -> list[tuple]:
    """The rows of ``per_window`` for every window (``params`` bound beside the windows')."""
    found: list[tuple] = []
    for some in in_statements(windows):
        query, bound = per_window(table, some, columns, where)
        found += conn.execute(query, {**bound, **(params or {})}).fetchall()
    return found


def source_stats_all(
    conn: psycopg.Connection, table: TableSpec, windows: list[PartitionWindow]
) -> dict[str, SourceStats]:
    """Rows, NULL keys and measure sums of the source for every window, in one statement.

    One query per window would cost a round trip and a planning each; here the query runs once
    per window inside one statement (``LATERAL``), on exactly the rows the INSERT will read.
    """
    key_is_null = sql.SQL(" OR ").join(
        sql.SQL("{} IS NULL").format(sql.Identifier(k)) for k in table.unique_key
    )
    sums = [sql.SQL("sum({})").format(sql.Identifier(m)) for m in table.measures]
    # An in-place update commits batch by batch: a value that would violate NOT NULL is refused
    # here, before the first batch, rather than by the batch that meets it.
    filled = _required_set_columns(table)
    if filled:
        sums.append(
            sql.SQL("count(*) FILTER (WHERE {})").format(
                sql.SQL(" OR ").join(
                    sql.SQL("{} IS NULL").format(sql.Identifier(c)) for c in filled
                )
            )
        )
    measured = fetch_per_window(
        conn,
        table,
        windows,
        sql.SQL(", ").join(
            [sql.SQL("count(*)"), sql.SQL("count(*) FILTER (WHERE {})").format(key_is_null), *sums]
        ),
    )
    found = {}
    for key, rows, null_keys, *totals in measured:
        null_required = totals.pop() if filled else 0
        found[key] = SourceStats(rows, null_keys, sums_of(table, totals), null_required)
    return found


def measured_sources(
    conn: psycopg.Connection, table: TableSpec, windows: list[PartitionWindow]
) -> tuple[dict[str, SourceStats], dict[str, str]]:
    """``source_stats_all``, and when its one statement fails (the table's SQL divides by zero
    on one day, a value does not cast), window by window: a bad day fails alone, with its
    error; the others are measured. Returns (stats, errors) by partition key."""
    try:
        with conn.transaction():
            return source_stats_all(conn, table, windows), {}
    except psycopg.Error as exc:
        if conn.broken or len(windows) == 1:
            if conn.broken:
                raise
            return {}, {windows[0].key: _first_line(exc)}
    stats: dict[str, SourceStats] = {}
    errors: dict[str, str] = {}
    for window in windows:
        try:
            with conn.transaction():
                stats |= source_stats_all(conn, table, [window])
        except psycopg.Error as exc:
            if conn.broken:
                raise
            errors[window.key] = _first_line(exc)
    return stats, errors


def _first_line(exc: psycopg.Error) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _required_set_columns(table: TableSpec) -> list[str]:
    if table.batched_update is None:
        return []
    return [c for c in table.batched_update.columns if c in table.required_columns]


def target_rows_all(
    conn: psycopg.Connection, table: TableSpec, windows: list[PartitionWindow]
) -> dict[str, int]:
    """How many rows each window of the target holds now, in one statement."""
    if not relation_exists(conn, table.schema, table.name):
        return {window.key: 0 for window in windows}
    column = sql.Identifier(table.partition_column)
    found: dict[str, int] = {}
    for some in in_statements(windows):
        values, params = windows_values(some)
        query = sql.SQL(
            "SELECT {window}.key, (SELECT count(*) FROM {table} WHERE {column} >= "
            "{window}.window_start AND {column} < {window}.window_end) FROM {values}"
        ).format(window=WINDOW, table=table.identifier, column=column, values=values)
        found |= dict(conn.execute(query, params).fetchall())
    return found


def guard_all(
    conn: psycopg.Connection,
    table: TableSpec,
    windows: list[PartitionWindow],
    params: BackfillParams,
) -> dict[str, tuple[CheckOutcome, SourceStats]]:
    """The guard of every window of a run, measured in two statements, before anything is
    written."""
    if not windows:
        return {}
    stats, errors = measured_sources(conn, table, windows)
    current = target_rows_all(conn, table, windows)
    return {
        w.key: _failed_source(table, w, errors[w.key], current[w.key])
        if w.key in errors
        else _judge(table, w, params, stats[w.key], current[w.key])
        for w in windows
    }


def _failed_source(
    table: TableSpec, window: PartitionWindow, error: str, current: int
) -> tuple[CheckOutcome, SourceStats]:
    """The guard's verdict on a window whose query fails: refused, nothing touched."""
    action = strategy_of(table).verb
    message = (
        f"guard refused to {action} {table.qualified_name} {window.key}: the table's SQL fails "
        f"for this partition ({error}). Nothing was changed. Fix {table.sql_source} (or the "
        "rows it reads for that day)"
    )
    metadata = {"source_error": error, "target_rows_before": current}
    empty = SourceStats(0, 0, sums_of(table, [0] * len(table.measures)))
    return CheckOutcome(False, metadata | {"problems": error}, message=message), empty


def guard(
    conn: psycopg.Connection, table: TableSpec, window: PartitionWindow, params: BackfillParams
) -> tuple[CheckOutcome, SourceStats]:
    return guard_all(conn, table, [window], params)[window.key]


def _judge(
    table: TableSpec, window: PartitionWindow, params: BackfillParams, stats, current: int
) -> tuple[CheckOutcome, SourceStats]:
    floor = current * (1 - params.max_shrink)
    problems: list[str] = []
    if stats.null_keys:
        problems.append(
            f"{stats.null_keys} source rows have a NULL in {', '.join(table.unique_key)}"
        )
    if stats.null_required:
        problems.append(
            f"{stats.null_required} rows would get a NULL in "
            f"{', '.join(_required_set_columns(table))} (declared not null): its expression "
            "yields NULL for them"
        )
    shrink_problem = None
    if current and stats.rows == 0:
        shrink_problem = f"the source is empty but the partition holds {current} rows"
    elif current and stats.rows < floor:
        shrink_problem = (
            f"the source has {stats.rows} rows, fewer than {1 - params.max_shrink:.0%} of the "
            f"{current} the partition holds (max_shrink {params.max_shrink})"
        )
    overridden = shrink_problem is not None and params.allow_shrink
    if shrink_problem and not overridden:
        problems.append(shrink_problem)
    metadata: dict[str, object] = {
        "source_rows": stats.rows,
        "target_rows_before": current,
        "null_keys": stats.null_keys,
        "max_shrink": params.max_shrink,
        "allow_shrink": params.allow_shrink,
    }
    if overridden:
        metadata["override"] = f"{shrink_problem}; allowed by {ALLOW_SHRINK}=true"
    if problems:
        message = strategy_of(table).refusal(table, window, "; ".join(problems))
        return CheckOutcome(
            False, metadata | {"problems": "; ".join(problems)}, message=message
        ), stats
    return CheckOutcome(True, metadata), stats


def refused_replace(table: TableSpec, window: PartitionWindow, problems: str) -> str:
    """``Strategy.refusal`` of the strategies that replace a partition whole: nothing was
    deleted, and an intended shrink passes with the override tag."""
    return (
        f"guard refused to replace {table.qualified_name} {window.key}: {problems}. Nothing was "
        f"deleted. Fix the source, or for an intended shrink re-run with the tag "
        f"{ALLOW_SHRINK}=true"
    )

"""The guard before a write: is the source sane enough to replace what the partition holds?

Runs before anything is deleted. A source that came back empty, shrank sharply, or carries NULL
keys most likely means a broken upstream load, not a real change: replacing the partition with it
would wipe good data. Intended shrinks (a GDPR erasure, a cleanup) pass with the explicit, logged
``allow_shrink`` override.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import psycopg
from psycopg import sql

from backfill_assets.core.database import relation_exists
from backfill_assets.core.outcomes import CheckOutcome
from backfill_assets.core.params import ALLOW_SHRINK, BackfillParams
from backfill_assets.core.partitioning import PartitionWindow
from backfill_assets.core.tables import TableSpec


@dataclass(frozen=True)
class SourceStats:
    """The source's rows for one window, measured once and reused by the reconciliation."""

    rows: int
    null_keys: int
    sums: dict[str, Decimal]


def source_stats(
    conn: psycopg.Connection, table: TableSpec, window: PartitionWindow
) -> SourceStats:
    key_is_null = sql.SQL(" OR ").join(
        sql.SQL("{} IS NULL").format(sql.Identifier(k)) for k in table.unique_key
    )
    sums = [sql.SQL("sum({})").format(sql.Identifier(m)) for m in table.measures]
    query = sql.SQL("SELECT {} FROM ({}) AS src").format(
        sql.SQL(", ").join(
            [sql.SQL("count(*)"), sql.SQL("count(*) FILTER (WHERE {})").format(key_is_null), *sums]
        ),
        table.source_query,
    )
    rows, null_keys, *totals = conn.execute(query, window.as_params()).fetchone()
    return SourceStats(
        rows=rows,
        null_keys=null_keys,
        sums={m: Decimal(t or 0) for m, t in zip(table.measures, totals, strict=True)},
    )


def target_rows(conn: psycopg.Connection, table: TableSpec, window: PartitionWindow) -> int:
    if not relation_exists(conn, table.schema, table.name):
        return 0
    query = sql.SQL("SELECT count(*) FROM {} WHERE {}").format(
        table.identifier, table.window_filter()
    )
    return conn.execute(query, window.as_params()).fetchone()[0]


def guard(
    conn: psycopg.Connection, table: TableSpec, window: PartitionWindow, params: BackfillParams
) -> tuple[CheckOutcome, SourceStats]:
    stats = source_stats(conn, table, window)
    current = target_rows(conn, table, window)
    floor = current * (1 - params.max_shrink)
    problems: list[str] = []
    if stats.null_keys:
        problems.append(
            f"{stats.null_keys} source rows have a NULL in {', '.join(table.unique_key)}"
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
        message = (
            f"guard refused to replace {table.qualified_name} {window.key}: "
            + "; ".join(problems)
            + ". Nothing was deleted. Fix the source, or for an intended shrink re-run with the "
            f"tag {ALLOW_SHRINK}=true"
        )
        return CheckOutcome(
            False, metadata | {"problems": "; ".join(problems)}, message=message
        ), stats
    return CheckOutcome(True, metadata), stats

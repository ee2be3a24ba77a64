"""How many partitions one backfill run writes: from what a partition has cost, not a constant.

A run pays a fixed price before it writes anything (a process, the definitions, dbt's start-up:
~6-20 s here, see docs/measurements.md) and then a few milliseconds to seconds per partition. Too
few partitions per run and a backfill is all overhead; too many and one failure or a retry
re-does a lot, and the UI shows little progress. So each table's runs aim at ``TARGET_RUN_S`` of
database time, from the median duration of its recent writes in the audit trail, bounded by
``MIN_PER_RUN`` and ``MAX_PER_RUN``. A table without history gets ``UNMEASURED_PER_RUN``; a
declaration may fix the number (``partitions_per_run``).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable

import psycopg

from backfill_assets.core.database import relation_exists

TARGET_RUN_S = 60.0
"""Database time a run should spend writing: with ~10 s of run overhead, orchestration stays
under ~15 % of a run once partitions cost enough to fill it."""
MIN_PER_RUN = 1
MAX_PER_RUN = 366
"""A year of days: beyond it a retry re-does too much, and a run's log gets long."""
UNMEASURED_PER_RUN = 31
"""A month of days per run until the audit has seen the table written."""
HISTORY = 200
"""How many recent successful writes of a table its median is taken over."""
HISTORY_TABLE = "backfill_audit.backfill_runs"
"""Where the history is read from (the audit trail)."""


def write_history(conn: psycopg.Connection) -> dict[str, tuple[float, int]]:
    """Per table: the median seconds of its recent successful writes, and how many there were."""
    if not relation_exists(conn, "backfill_audit", "backfill_runs"):
        return {}
    rows = conn.execute(
        "SELECT table_name, percentile_cont(0.5) WITHIN GROUP (ORDER BY seconds), count(*) FROM ("
        " SELECT table_name, extract(epoch FROM ended_at - started_at) AS seconds,"
        "  row_number() OVER (PARTITION BY table_name ORDER BY id DESC) AS recent"
        " FROM backfill_audit.backfill_runs"
        " WHERE status = 'succeeded' AND strategy <> 'rollback' AND ended_at IS NOT NULL"
        ") AS writes WHERE recent <= %s GROUP BY table_name",
        [HISTORY],
    ).fetchall()
    return {table: (float(seconds), count) for table, seconds, count in rows}


def seconds_per_partition(conn: psycopg.Connection) -> dict[str, float]:
    """Median seconds of each table's recent successful writes, from the audit trail."""
    return {table: seconds for table, (seconds, _) in write_history(conn).items()}


def partitions_per_run(seconds: float | None, *, target_s: float = TARGET_RUN_S) -> int:
    """Partitions that fill ``target_s`` of database time, within the bounds."""
    if seconds is None:
        return UNMEASURED_PER_RUN
    wanted = math.floor(target_s / max(seconds, 1e-3))
    return max(MIN_PER_RUN, min(MAX_PER_RUN, wanted))


def sizes(
    registry, measured: dict[str, float], together: Iterable[Collection[str]] = ()
) -> dict[str, int]:
    """Partitions per run for each table of ``registry`` (by qualified name).

    Tables in one set of ``together`` (the tables one ``@dbt_assets`` definition's models read),
    and a table with a table of the same calendar it reads (``upstream``), directly or through
    others, share the smallest of their sizes: the backfill daemon puts assets that depend on
    each other in one run only when their backfill policies are equal. Other tables keep their
    own size, whatever calendar they share: a table the audit has not seen yet does not shrink
    the runs of an unrelated, measured one.
    """
    size = {
        table.qualified_name: table.partitions_per_run
        or partitions_per_run(measured.get(table.qualified_name))
        for table in registry
    }
    calendar = {table.qualified_name: table.partitioning.calendar for table in registry}
    reads = [
        {table.qualified_name, name}
        for table in registry
        for name in table.upstream
        if calendar.get(name) == table.partitioning.calendar
    ]
    lineage = {name: {name} for name in size}
    for names in [*together, *reads]:
        linked = set().union(*(lineage[name] for name in names if name in lineage))
        for name in linked:
            lineage[name] = linked
    return {name: min(size[other] for other in lineage[name]) for name in size}

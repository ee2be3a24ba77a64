"""A writer to kill: ``python tests/kill_writer.py URL DAY...`` writes each day through the same
verified, audited path as a backfill run (``core/partition_write.py``), one transaction per day.

Prints ``ready`` once imported and connected, ``wrote DAY`` after each day's commit (so the killer
can aim at a point of the run, whatever the machine's speed), and ``done`` after the last one.
"""

from __future__ import annotations

import sys

from backfill_assets.core import snapshots
from backfill_assets.core.audit import AuditTrail, RunInfo
from backfill_assets.core.database import connect
from backfill_assets.core.guards import guard
from backfill_assets.core.params import params_for
from backfill_assets.core.partition_write import write_verified
from backfill_assets.core.registry import DEFAULT_TABLES_DIR, load_registry
from backfill_assets.core.tables import ensure_table


def main(url: str, days: list[str]) -> None:
    table = load_registry([DEFAULT_TABLES_DIR]).table("analytics.fct_orders")
    params = params_for(table, {})
    run = RunInfo("kill-writer", None, "soak", {})
    with connect(url) as conn, AuditTrail(url) as audit:
        ensure_table(conn, table)
        snapshots.ensure_snapshot_table(conn, table)
        print("ready", flush=True)
        for day in days:
            window = table.partitioning.window(day)
            outcome = write_verified(
                conn, audit, run, table, window, params, guard(conn, table, window, params)
            )
            assert outcome.succeeded, outcome.error
            print(f"wrote {day}", flush=True)
        print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

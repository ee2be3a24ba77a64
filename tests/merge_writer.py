"""A merge writer to kill: ``python tests/merge_writer.py URL DAY...`` merges each day of
``analytics.fct_orders_merge`` (``tests/merge_tables/``) through its strategy's own write, one
transaction per day, as a backfill run would.

Prints ``ready`` once connected (the table and its snapshot table exist), ``wrote DAY`` after each
day's commit, and ``done`` after the last one.
"""

from __future__ import annotations

import sys
from pathlib import Path

from backfill_assets.core import snapshots
from backfill_assets.core.audit import AuditTrail, RunInfo
from backfill_assets.core.database import connect
from backfill_assets.core.guards import guard
from backfill_assets.core.params import params_for
from backfill_assets.core.registry import load_registry
from backfill_assets.core.strategies import WriteHooks, strategy_of

TABLES = Path(__file__).parent / "merge_tables"


def main(url: str, days: list[str]) -> None:
    table = load_registry([TABLES]).table("analytics.fct_orders_merge")
    strategy = strategy_of(table)
    params = params_for(table, {})
    run = RunInfo("merge-writer", None, "kill test", {})
    hooks = WriteHooks(info=print, warn=print)
    with connect(url) as conn, AuditTrail(url) as audit:
        strategy.ensure_target(conn, table)
        snapshots.ensure_snapshot_table(conn, table)
        print("ready", flush=True)
        for day in days:
            window = table.partitioning.window(day)
            guarded = guard(conn, table, window, params)
            outcome = strategy.write(conn, audit, run, table, window, params, guarded, hooks)
            assert outcome.succeeded, outcome.error
            print(f"wrote {day}", flush=True)
        print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

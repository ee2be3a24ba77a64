"""An in-place writer to kill: ``python tests/in_place_writer.py URL TABLES_DIR DAY`` fills the
day of ``app.orders`` through the same path as a backfill run (``core/strategies/in_place.py``),
printing ``batch N`` after each committed batch and then waiting half a second, so a killer knows
how far it got.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from backfill_assets.core import snapshots
from backfill_assets.core.audit import AuditTrail, RunInfo
from backfill_assets.core.database import connect
from backfill_assets.core.guards import guard
from backfill_assets.core.params import params_for
from backfill_assets.core.registry import load_registry
from backfill_assets.core.strategies.in_place import write_in_place


def main(url: str, tables_dir: str, day: str) -> None:
    table = load_registry([Path(tables_dir)]).table("app.orders")
    params = params_for(table, {})
    run = RunInfo("in-place-writer", None, "test", {})
    committed = iter(range(1, 1_000_000))

    def after_batch() -> None:
        print(f"batch {next(committed)}", flush=True)
        time.sleep(0.5)

    with connect(url) as conn, AuditTrail(url) as audit:
        snapshots.ensure_snapshot_table(conn, table)
        window = table.partitioning.window(day)
        outcome = write_in_place(
            conn,
            audit,
            run,
            table,
            window,
            params,
            guard(conn, table, window, params),
            between_batches=after_batch,
        )
        print("done" if outcome.succeeded else f"failed: {outcome.error}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])

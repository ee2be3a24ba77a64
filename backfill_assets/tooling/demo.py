"""``make demo``: a real backfill through Dagster's own path on a fresh machine.

Starts the embedded PostgreSQL (unless BACKFILL_PG_URL points elsewhere), seeds the demo shop,
starts the Dagster daemon, launches an asset backfill of the fact table and the dbt marts over a
range of days (the kind the UI launches: its page under Runs > Backfills shows each partition's
status; the daemon batches days into runs per the backfill policy), follows it to the end,
prints what happened and stops every process it started.
"""

from __future__ import annotations

import time

from backfill_assets.core import settings
from backfill_assets.core.database import connect
from backfill_assets.core.params import LAUNCHED_BY, launched_by
from backfill_assets.tooling import embedded
from backfill_assets.tooling.demo_data import demo_table, seed
from backfill_assets.tooling.environment import prepare
from backfill_assets.tooling.launch import (
    asset_selection,
    launch_asset_backfill,
    running_daemon,
    summarize_backfill,
    wait_for_backfill,
)


def run_demo(*, first: str, last: str, orders_per_day: int) -> int:
    table = demo_table()
    partitions = len(table.partitioning.keys_between(first, last))
    started_db = settings.uses_embedded_postgres() and not embedded.is_running(
        settings.embedded_pgdata()
    )

    begun = time.monotonic()
    try:
        env = prepare(create_databases=True)
        data_location = settings.redact(settings.data_url())
        print(f"database: {data_location}")
        with connect(settings.data_url()) as conn:
            seeded = seed(conn, orders_per_day=orders_per_day)
        print(f"seeded app.orders: {seeded.orders} orders over {seeded.days} days")

        from dagster import DagsterInstance

        from backfill_assets.core.registry import load_registry
        from backfill_assets.defs.definitions import build_definitions

        definitions = build_definitions(load_registry(), check_sql=False)
        keys = asset_selection(definitions, [table.asset_name], downstream=True)
        with (
            DagsterInstance.get() as instance,
            running_daemon(env, settings.LOG_DIR / "daemon.log"),
        ):
            tags = {LAUNCHED_BY: launched_by({})}  # who ran the demo, shown as "Launched by"
            backfill_id = launch_asset_backfill(
                instance, keys, first, last, tags=tags, definitions=definitions
            )
            names = ", ".join(k.to_user_string() for k in keys)
            print(f"launched asset backfill {backfill_id}: {names}, {first}..{last}")
            progress = wait_for_backfill(
                instance, backfill_id, on_progress=lambda p: print(p.line())
            )
            summary = summarize_backfill(instance, backfill_id)
    finally:
        if started_db:
            embedded.stop(settings.embedded_pgdata())

    elapsed = time.monotonic() - begun
    print()
    print(f"Backfill {backfill_id} finished in {elapsed:.0f}s")
    print(f"  partitions materialized: {len(summary.partitions_materialized)} of {partitions}")
    print(f"  rows written to {table.qualified_name}: {summary.rows_written}")
    print(
        f"  checks: {summary.checks_passed} passed, {summary.checks_warned} warnings, "
        f"{summary.checks_failed} failed (per partition: guard before the write, "
        "reconciliation and diff after it, the dbt marts' tests)"
    )
    print(f"  audit: `.venv/bin/backfill-assets audit --backfill {backfill_id}`")
    print(f"  runs failed: {progress.failed_runs}")
    print("Next: `make ui` opens the Dagster UI on http://127.0.0.1:3000 (Runs > Backfills);")
    print(f"      the tables are in {data_location} (schemas app, analytics).")
    return 0 if progress.failed_runs == 0 and summary.checks_failed == 0 else 1

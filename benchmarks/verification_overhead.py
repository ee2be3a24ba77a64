"""What does safety cost? The same partitions rewritten bare and with the full safety net.

baseline: ``writer.replace_partition`` alone (DELETE + INSERT in one transaction);
verified: ``partition_write`` as the asset runs it: guard, DELETE keeping the old rows, INSERT,
          in-transaction reconciliation and diff, snapshot, checksums, audit rows.

Same script, same database, same days, alternating so neither variant gets a warmer cache.
Usage: python benchmarks/verification_overhead.py [--orders-per-day 5000] [--days 7]
"""

from __future__ import annotations

import argparse
import os
import time

from psycopg import sql

from backfill_assets.core import settings
from backfill_assets.core.audit import AuditTrail, RunInfo
from backfill_assets.core.database import connect
from backfill_assets.core.params import params_for
from backfill_assets.core.partition_write import run_guards, write_verified
from backfill_assets.core.snapshots import ensure_snapshot_table
from backfill_assets.core.tables import ensure_table
from backfill_assets.core.writer import replace_partition
from backfill_assets.tooling import embedded
from backfill_assets.tooling.demo_data import demo_table, seed

FCT_ORDERS = demo_table()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders-per-day", type=int, default=5000)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--from", dest="first", default="2024-05-01")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    keys = FCT_ORDERS.partitioning.all_keys()
    start = keys.index(args.first)
    windows = FCT_ORDERS.partitioning.windows(keys[start : start + args.days])

    os.environ.pop(settings.DATA_URL_ENV, None)
    embedded.start(settings.embedded_pgdata())
    admin = settings.embedded_url(settings.embedded_pgdata(), "postgres")
    with connect(admin) as conn:
        conn.execute("DROP DATABASE IF EXISTS bench_verify WITH (FORCE)")
        conn.execute("CREATE DATABASE bench_verify")
    url = settings.with_database(admin, "bench_verify")

    import pandas as pd

    with connect(url) as conn, AuditTrail(url) as audit:
        seeded = seed(conn, orders_per_day=args.orders_per_day)
        ensure_table(conn, FCT_ORDERS)
        ensure_snapshot_table(conn, FCT_ORDERS)
        for window in windows:  # first load, so every timed round replaces real rows
            replace_partition(conn, FCT_ORDERS, window)
        params = params_for(FCT_ORDERS, {})
        run = RunInfo(None, "bench", "bench", params.as_json())
        timings: dict[str, list[float]] = {"baseline": [], "verified": []}
        rows = 0
        for _ in range(args.rounds):
            started = time.perf_counter()
            rows = sum(replace_partition(conn, FCT_ORDERS, w).rows_inserted for w in windows)
            timings["baseline"].append(time.perf_counter() - started)

            started = time.perf_counter()
            guarded = run_guards(conn, FCT_ORDERS, windows, params)
            for window in windows:
                outcome = write_verified(
                    conn,
                    audit,
                    run,
                    FCT_ORDERS,
                    window,
                    params,
                    guarded[window.key],
                )
                assert outcome.succeeded, outcome.error
            timings["verified"].append(time.perf_counter() - started)
            conn.execute(sql.SQL("TRUNCATE backfill_snapshots.analytics__fct_orders"))

    table = pd.DataFrame(
        {
            name: {"best_s": min(t), "median_s": sorted(t)[len(t) // 2]}
            for name, t in timings.items()
        }
    ).T
    table["rows_per_s"] = rows / table["best_s"]
    print(
        f"\n{args.days} partitions, {rows} rows ({seeded.orders} orders seeded), "
        f"best and median of {args.rounds} rounds"
    )
    print(table.round(3).to_string())
    ratio = table.loc["verified", "best_s"] / table.loc["baseline", "best_s"]
    print(f"\nratio verified/baseline time: {ratio:.2f}x")


if __name__ == "__main__":
    main()

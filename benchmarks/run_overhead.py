"""How many partitions per run? Wall time of one backfill launched two ways, same script, same data.

baseline: ``dagster job backfill`` (the CLI), which queues one run per partition;
batched:  an asset backfill (what the UI's "Materialize" launches), which honours the assets'
          BackfillPolicy: up to 7 partitions per run.

Both go through the real daemon, the repository's dagster.yaml (2 concurrent runs) and PostgreSQL.
Prints the ratio baseline / batched. Usage: python benchmarks/run_overhead.py [--days 14]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from psycopg import sql

from backfill_assets.core import settings
from backfill_assets.core.database import connect
from backfill_assets.project import ensure_manifest
from backfill_assets.tooling import embedded
from backfill_assets.tooling.demo_data import demo_table, seed
from backfill_assets.tooling.launch import (
    launch_asset_backfill,
    launch_job_backfill,
    running_daemon,
    wait_for_backfill,
)

FCT_ORDERS = demo_table()
JOB = "backfill__analytics__fct_orders__with_downstream"


def fresh_databases(admin_url: str, orders_per_day: int) -> tuple[str, str]:
    with connect(admin_url) as conn:
        for name in ("bench_data", "bench_dagster"):
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    data = settings.with_database(admin_url, "bench_data")
    with connect(data) as conn:
        seed(conn, orders_per_day=orders_per_day)
    return data, settings.to_sqlalchemy(settings.with_database(admin_url, "bench_dagster"))


def one_backfill(admin_url: str, variant: str, first: str, last: str, orders_per_day: int) -> dict:
    from dagster import AssetKey, DagsterInstance

    data, storage = fresh_databases(admin_url, orders_per_day)
    home = Path(tempfile.mkdtemp(prefix="bench_dagster_home_"))
    shutil.copy(settings.DAGSTER_HOME / "dagster.yaml", home / "dagster.yaml")
    os.environ.update(
        {settings.DATA_URL_ENV: data, settings.DAGSTER_URL_ENV: storage, "DAGSTER_HOME": str(home)}
    )
    env = settings.process_env()
    with DagsterInstance.get() as instance, running_daemon(env, home / "daemon.log"):
        started = time.perf_counter()
        if variant == "baseline":
            backfill_id = launch_job_backfill(env, JOB, FCT_ORDERS.partitioning, first, last)
        else:
            keys = [AssetKey(["analytics", "fct_orders"]), AssetKey(["analytics", "daily_revenue"])]
            backfill_id = launch_asset_backfill(instance, keys, first, last)
        progress = wait_for_backfill(instance, backfill_id, timeout_s=3600)
        elapsed = time.perf_counter() - started
        stats = [instance.get_run_stats(run_id) for run_id in progress.statuses]
        run_seconds = sum(s.end_time - s.launch_time for s in stats) / len(stats)
    shutil.rmtree(home, ignore_errors=True)
    if progress.failed:
        raise SystemExit(f"{variant}: {progress.line()}")
    return {
        "variant": variant,
        "runs": len(progress.statuses),
        "seconds": elapsed,
        "s_per_run": run_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="first", default="2024-03-01")
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--orders-per-day", type=int, default=200)
    args = parser.parse_args()
    keys = FCT_ORDERS.partitioning.all_keys()
    last = keys[keys.index(args.first) + args.days - 1]

    for name in (settings.DATA_URL_ENV, settings.DAGSTER_URL_ENV):
        os.environ.pop(name, None)
    embedded.start(settings.embedded_pgdata())
    admin = settings.embedded_url(settings.embedded_pgdata(), "postgres")
    ensure_manifest()

    import pandas as pd

    rows = [
        one_backfill(admin, v, args.first, last, args.orders_per_day)
        for v in ("baseline", "batched")
    ]
    table = pd.DataFrame(rows).set_index("variant")
    table["s_per_partition"] = table["seconds"] / args.days
    print(f"\nbackfill of {args.days} days ({args.first}..{last}), fct_orders + daily_revenue")
    print(table.round(2).to_string())
    ratio = table.loc["baseline", "seconds"] / table.loc["batched", "seconds"]
    print(f"\nratio baseline/batched wall time: {ratio:.2f}x")


if __name__ == "__main__":
    main()

"""A run's dbt step in the run's process against dbt as a child process (dagster-dbt's way).

On a fresh database of the embedded PostgreSQL the demo shop is seeded and ``--days`` days of
``analytics.fct_orders`` are written; then per round the demo's marts are built over windows of
``--window`` days through dagster-dbt's resource, exactly as a run's dbt step starts dbt
(``dbt_process_env``, ``installed_dbt().cli(["build", --event-time-start/end])``), once with
dbt in this process (``BACKFILL_DBT_IN_PROCESS=1``, the default) and once as a child process
(``0``, the baseline). Printed per path: wall seconds per build, CPU seconds per build (this
process and its children, ``getrusage``), and the ratio of each to the child's. Best of
``--rounds``.

Run in a process that has imported the definitions, as a forked run has (the fork server
preloads dbt's CLI): the in-process build pays no import.

Usage: python benchmarks/dbt_in_process.py [--days 30] [--window 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import time

from common import fresh_database

from backfill_assets.core import settings
from backfill_assets.core.database import connect
from backfill_assets.core.registry import load_registry
from backfill_assets.core.settings import DBT_IN_PROCESS_ENV
from backfill_assets.core.tables import ensure_table
from backfill_assets.core.writer import replace_partition
from backfill_assets.defs.dbt import dbt_process_env, installed_dbt
from backfill_assets.defs.resources import PostgresResource
from backfill_assets.tooling import embedded
from backfill_assets.tooling.demo_data import demo_table, seed


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def build(postgres, registry, dbt, first: str, end: str) -> tuple[float, float]:
    """One ``dbt build`` of the marts over ``first``..``end`` (exclusive): wall, CPU seconds."""
    started, cpu = time.perf_counter(), cpu_seconds()
    with dbt_process_env(postgres, registry):
        invocation = dbt.cli(["build", "--event-time-start", first, "--event-time-end", end])
        list(invocation.stream_raw_events())
        invocation.wait()
    assert invocation.process.returncode == 0, invocation.get_error()
    return time.perf_counter() - started, cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--window", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for name in (settings.DATA_URL_ENV, settings.DAGSTER_URL_ENV, DBT_IN_PROCESS_ENV):
        os.environ.pop(name, None)
    embedded.start(settings.embedded_pgdata())
    admin = settings.embedded_url(settings.embedded_pgdata(), "postgres")
    url = fresh_database(admin, "bench_dbt")
    table = demo_table()
    registry = load_registry()
    days = table.partitioning.keys_between("2024-03-01", "2024-12-31")[: args.days + 1]
    with connect(url) as conn:
        seed(conn, orders_per_day=200)
        ensure_table(conn, table)
        for day in days:
            replace_partition(conn, table, table.partitioning.window(day))
    postgres = PostgresResource(url=url)
    dbt = installed_dbt()
    windows = [
        (days[i], days[min(i + args.window, len(days) - 1)])
        for i in range(0, len(days) - 1, args.window)
    ]
    build(postgres, registry, dbt, days[0], days[-1])  # the tables exist, the parse is kept
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.rounds):
        for path, value in (("child process", "0"), ("in process", "1")):
            os.environ[DBT_IN_PROCESS_ENV] = value
            timings = [build(postgres, registry, dbt, first, end) for first, end in windows]
            wall = sum(t[0] for t in timings) / len(timings)
            cpu = sum(t[1] for t in timings) / len(timings)
            if path not in best or wall < best[path][0]:
                best[path] = (wall, cpu)
    base_wall, base_cpu = best["child process"]
    print(f"{len(windows)} builds of {args.window} days per round, best of {args.rounds} rounds")
    print(f"{'path':<14} {'wall s/build':>12} {'x child':>8} {'CPU s/build':>12} {'x child':>8}")
    for path, (wall, cpu) in best.items():
        print(
            f"{path:<14} {wall:>12.3f} {wall / base_wall:>8.2f} {cpu:>12.3f} {cpu / base_cpu:>8.2f}"
        )


if __name__ == "__main__":
    main()

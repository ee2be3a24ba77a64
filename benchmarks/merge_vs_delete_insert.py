"""merge against delete_insert on one large partition where 1 % of the rows changed.

On a fresh database of the embedded PostgreSQL the demo shop is seeded, then one day's orders
are multiplied to ``--rows`` (a large partition). ``analytics.fct_orders`` (delete_insert) and a
twin declared ``strategy: merge`` are loaded, then per round 1 % of the day's source rows change
(0.8 % updated, 0.1 % deleted, 0.1 % new) and each strategy rewrites the day through its full
write (guard, write, snapshot, verification, audit: what a run does per partition). Printed per
path: wall time, WAL bytes (``pg_current_wal_lsn()`` before/after), dead tuples left in the
target (``pg_stat_user_tables.n_dead_tup``), rows kept in the snapshot, and the time's ratio to
``raw``, one ``INSERT ... SELECT`` of the day into an emptied, equally indexed twin (the
physical-limit proxy of ``backfill_speed.py``). Times are the best of ``--rounds``; WAL and dead
tuples are the last round's (they barely vary).

Usage: python benchmarks/merge_vs_delete_insert.py [--day 2024-06-03] [--rows 30000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

from common import fresh_database
from psycopg import sql

from backfill_assets.core import settings
from backfill_assets.core.audit import AuditTrail, RunInfo
from backfill_assets.core.database import connect
from backfill_assets.core.guards import guard
from backfill_assets.core.params import params_for
from backfill_assets.core.snapshots import ensure_snapshot_table, snapshot_table
from backfill_assets.core.strategies import WriteHooks, strategy_of
from backfill_assets.tooling import embedded
from backfill_assets.tooling.demo_data import demo_table, seed

DELETE_INSERT = demo_table()
MERGE = replace(DELETE_INSERT, name="fct_orders_merge", strategy="merge")
RAW = sql.Identifier("bench", "raw_target")
COPY = 100_000_000
"""Order ids of the day's copies start at multiples of this."""
NEW = 10**12
"""Order ids of a round's new orders start at multiples of this (past every copy's)."""


def amplify(conn, day: str, rows: int) -> None:
    """Copy the day's orders (new ids, same day) until it holds about ``rows`` orders."""
    day_orders = (
        "ordered_at >= %(day)s::timestamp AT TIME ZONE 'UTC' "
        "AND ordered_at < (%(day)s::date + 1)::timestamp AT TIME ZONE 'UTC'"
    )
    have = conn.execute(f"SELECT count(*) FROM app.orders WHERE {day_orders}", {"day": day})
    copies = max(0, rows // have.fetchone()[0] - 1)
    conn.execute(
        "INSERT INTO app.orders SELECT o.order_id + c::bigint * %(copy)s::bigint, o.customer_id, "
        "o.ordered_at, o.arrived_at, o.status, o.net_amount, o.tax_amount, o.sales_channel "
        f"FROM app.orders AS o, generate_series(1, %(copies)s) AS c WHERE {day_orders}",
        {"day": day, "copies": copies, "copy": COPY},
    )
    conn.execute("VACUUM ANALYZE app.orders")


def change_one_percent(conn, day: str, round_no: int) -> None:
    """0.8 % of the day's orders get a new amount, 0.1 % are deleted, 0.1 % are new."""
    day_orders = (
        "ordered_at >= %(day)s::timestamp AT TIME ZONE 'UTC' "
        "AND ordered_at < (%(day)s::date + 1)::timestamp AT TIME ZONE 'UTC'"
    )
    bound = {"day": day, "r": round_no}
    conn.execute(
        "UPDATE app.orders SET net_amount = net_amount + 1 "
        f"WHERE {day_orders} AND app.hash01(order_id, %(r)s) < 0.008",
        bound,
    )
    conn.execute(
        f"DELETE FROM app.orders WHERE {day_orders} "
        "AND app.hash01(order_id, %(r)s) BETWEEN 0.008 AND 0.009",
        bound,
    )
    conn.execute(
        "INSERT INTO app.orders SELECT order_id + (%(r)s::bigint + 1) * %(new)s::bigint, "
        "customer_id, ordered_at, arrived_at, status, net_amount, tax_amount, sales_channel "
        "FROM app.orders "
        f"WHERE {day_orders} AND app.hash01(order_id, %(r)s) BETWEEN 0.009 AND 0.010",
        bound | {"new": NEW},
    )


def table_stats(conn, table) -> tuple[int, int]:
    """``n_dead_tup`` of ``table``, and the WAL position, as the server sees them now."""
    conn.execute("SELECT pg_stat_clear_snapshot()")
    dead = conn.execute(
        "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = to_regclass(%s)",
        [table.identifier.as_string(conn)],
    ).fetchone()[0]
    return dead, conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]


def measured(conn, table, write) -> dict[str, float]:
    """Time, WAL bytes and dead tuples of ``write()``, read after its statistics are flushed."""
    dead, lsn = table_stats(conn, table)
    started = time.perf_counter()
    kept = write()
    seconds = time.perf_counter() - started
    conn.execute("SELECT pg_stat_force_next_flush()")  # flushed as this session goes idle
    time.sleep(0.2)
    dead_after, lsn_after = table_stats(conn, table)
    wal = conn.execute("SELECT pg_wal_lsn_diff(%s, %s)", [lsn_after, lsn]).fetchone()[0]
    return {"seconds": seconds, "wal_MB": float(wal) / 1e6, "dead": dead_after - dead, "kept": kept}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--day", default="2024-06-03")
    parser.add_argument("--rows", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for name in (settings.DATA_URL_ENV, settings.DAGSTER_URL_ENV):
        os.environ.pop(name, None)
    embedded.start(settings.embedded_pgdata())
    admin = settings.embedded_url(settings.embedded_pgdata(), "postgres")
    url = fresh_database(admin, "bench_merge")
    window = DELETE_INSERT.partitioning.window(args.day)

    import pandas as pd

    results: dict[str, list[dict]] = {"raw": [], "delete_insert": [], "merge": []}
    with connect(url) as conn, AuditTrail(url) as audit:
        seed(conn, orders_per_day=200)
        amplify(conn, args.day, args.rows)
        hooks = WriteHooks(info=print, warn=print)
        run = RunInfo(None, "bench", "bench", {})
        for table in (DELETE_INSERT, MERGE):
            strategy_of(table).ensure_target(conn, table)
            ensure_snapshot_table(conn, table)
        conn.execute("CREATE SCHEMA bench")
        conn.execute(
            sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL)").format(RAW, DELETE_INSERT.identifier)
        )
        into_raw = sql.SQL("INSERT INTO {} ({cols}) SELECT {cols} FROM ({query}) AS src").format(
            RAW, cols=DELETE_INSERT.column_list(), query=DELETE_INSERT.source_query
        )

        def write(table):
            params = params_for(table, {})
            guarded = guard(conn, table, window, params)
            outcome = strategy_of(table).write(
                conn, audit, run, table, window, params, guarded, hooks
            )
            assert outcome.succeeded, outcome.error
            return outcome.snapshot_rows

        def raw() -> int:
            with conn.transaction():
                conn.execute(into_raw, window.as_params())
            return 0

        for table in (DELETE_INSERT, MERGE):
            write(table)  # the first load
        rows = conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE {}").format(
                MERGE.identifier, MERGE.window_filter()
            ),
            window.as_params(),
        ).fetchone()[0]
        for round_no in range(args.rounds):
            change_one_percent(conn, args.day, round_no)
            for table in (DELETE_INSERT, MERGE):
                conn.execute(sql.SQL("TRUNCATE {}").format(snapshot_table(table)))
                conn.execute(sql.SQL("VACUUM ANALYZE {}").format(table.identifier))
            conn.execute(sql.SQL("TRUNCATE {}").format(RAW))
            conn.execute("CHECKPOINT")
            # A checkpoint's first change of a page logs the whole page: each path starts
            # right after one, as each would on a quiet server.
            results["raw"].append(measured(conn, DELETE_INSERT, raw))
            conn.execute("CHECKPOINT")
            results["delete_insert"].append(
                measured(conn, DELETE_INSERT, lambda: write(DELETE_INSERT))
            )
            conn.execute("CHECKPOINT")
            results["merge"].append(measured(conn, MERGE, lambda: write(MERGE)))
        server = conn.execute("SHOW server_version").fetchone()[0]

    table = pd.DataFrame(
        {
            path: {
                "seconds": min(r["seconds"] for r in rounds),
                "wal_MB": rounds[-1]["wal_MB"],
                "dead_tuples": rounds[-1]["dead"],
                "snapshot_rows": rounds[-1]["kept"],
            }
            for path, rounds in results.items()
        }
    ).T.rename_axis("path")
    table["x_raw"] = table["seconds"] / table.loc["raw", "seconds"]
    print(
        f"\n{DELETE_INSERT.qualified_name} {args.day}: {rows} rows, 1 % of them changed "
        f"(0.8 % updated, 0.1 % deleted, 0.1 % new); PostgreSQL {server}; full write per path "
        f"(guard, write, snapshot, checks, audit); best of {args.rounds} rounds; raw: one "
        "INSERT ... SELECT of the day into an empty twin"
    )
    print(table.round(3).to_string())
    ratio = table.loc["delete_insert"] / table.loc["merge"]
    print(
        f"merge vs delete_insert: time x{1 / ratio['seconds']:.2f}, {ratio['wal_MB']:.1f}x less "
        f"WAL, {table.loc['merge', 'dead_tuples']:.0f} dead tuples instead of "
        f"{table.loc['delete_insert', 'dead_tuples']:.0f}"
    )


if __name__ == "__main__":
    main()

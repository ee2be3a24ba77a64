"""SIGKILL of a writer at random moments: nothing half-written, the audit and snapshots true.

A writer process (``tests/kill_writer.py``, the backfill's own per-partition path) rewrites ten
days while the test kills it at a seeded random moment of its work: after a random number of
committed days, then a random part of a day's write later, so kills land before, inside and
between the days' transactions whatever the machine's load (a kill timed from the start alone
missed the middle of a 0.1 s run under load). What the writer left is read once its server
sessions have ended: a COMMIT it sent just before the kill can still land. After every kill:
- every day holds exactly its old rows or exactly its new ones, no order_id twice;
- a day changed if and only if this trial left a ``succeeded`` audit row for it, whose checksums
  are the day's before and after; no row is left ``running``;
- every snapshot row belongs to a succeeded write (same audit id and write id), as many rows as
  that write's audit row says it kept.

``make test`` runs 30 trials; ``make soak`` runs 300 (BACKFILL_SOAK_TRIALS, BACKFILL_SOAK_SEED).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from support import FCT_ORDERS, fingerprints

TRIALS = int(os.environ.get("BACKFILL_SOAK_TRIALS", "30"))
SEED = int(os.environ.get("BACKFILL_SOAK_SEED", "20241125"))
DAYS = [f"2024-06-{day:02d}" for day in range(1, 11)]
WRITER = Path(__file__).with_name("kill_writer.py")


def start_writer(data_url: str) -> subprocess.Popen:
    writer = subprocess.Popen(
        [sys.executable, str(WRITER), data_url, *DAYS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout.readline().strip() == "ready", writer.stderr.read()
    return writer


def read_until(writer: subprocess.Popen, line: str) -> None:
    """Read the writer's progress lines up to ``line``."""
    while (got := writer.stdout.readline().strip()) != line:
        assert got, writer.stderr.read()  # the writer ended without printing it


def wait_until_its_sessions_end(conn) -> None:
    """A killed client's server session can still be finishing what it sent (a COMMIT lands after
    the kill): read what the writer left only once its sessions are gone."""
    others = (
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    deadline = time.monotonic() + 30
    while conn.execute(others).fetchone()[0]:
        assert time.monotonic() < deadline, "the killed writer's sessions did not end"
        time.sleep(0.01)


def trial_rows(conn, after_id: int) -> dict[str, list[tuple]]:
    rows: dict[str, list[tuple]] = {}
    for partition, status, before, after, inserted in conn.execute(
        "SELECT partition_key, status, checksum_before, checksum_after, rows_after "
        "FROM backfill_audit.backfill_runs WHERE id > %s ORDER BY id",
        [after_id],
    ):
        rows.setdefault(partition, []).append((status, before, after, inserted))
    return rows


def snapshot_mismatches(conn) -> list[tuple]:
    """Snapshot writes with no succeeded audit row of the same ids, or another row count."""
    return conn.execute(
        "SELECT s.audit_id, s.write_id, s.kept, a.status, a.snapshot_rows FROM "
        "(SELECT audit_id, write_id, count(*) AS kept "
        " FROM backfill_snapshots.analytics__fct_orders GROUP BY 1, 2) AS s "
        "LEFT JOIN backfill_audit.backfill_runs AS a "
        "ON a.id = s.audit_id AND a.write_id = s.write_id "
        "WHERE a.status IS DISTINCT FROM 'succeeded' OR a.snapshot_rows <> s.kept"
    ).fetchall()


def test_a_writer_killed_at_random_moments_leaves_every_day_old_or_new_and_the_audit_true(
    data_url, conn
):
    for _ in range(2):  # the first run creates the tables; time the second
        writer = start_writer(data_url)
        started = time.monotonic()
        read_until(writer, "done")
        day_s = (time.monotonic() - started) / len(DAYS)
        writer.wait(timeout=60)
    rng = random.Random(SEED)
    outcomes = {"none written": 0, "some written": 0, "all written": 0}

    for trial in range(TRIALS):
        old = fingerprints(conn, DAYS)
        last_id = conn.execute("SELECT max(id) FROM backfill_audit.backfill_runs").fetchone()[0]
        conn.execute(
            "UPDATE app.orders SET net_amount = net_amount + 0.01 "
            "WHERE ordered_at >= %s AND ordered_at < %s::date + 1",
            [DAYS[0], DAYS[-1]],
        )
        writer = start_writer(data_url)
        for day in DAYS[: rng.randrange(len(DAYS))]:
            read_until(writer, f"wrote {day}")
        time.sleep(rng.uniform(0, day_s * 1.5))
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
        wait_until_its_sessions_end(conn)

        now = fingerprints(conn, DAYS)
        rows = trial_rows(conn, last_id)
        context = f"trial {trial} (seed {SEED})"
        assert all(status != "running" for day in rows.values() for status, *_ in day), context
        written = 0
        for day in DAYS:
            succeeded = [r for r in rows.get(day, []) if r[0] == "succeeded"]
            assert len(succeeded) <= 1, (context, day)
            if succeeded:
                _, before, after, after_rows = succeeded[0]
                assert (before, after, after_rows) == (
                    old[day].checksum,
                    now[day].checksum,
                    now[day].rows,
                ), (context, day, "the audit row is what committed")
                assert now[day] != old[day], (context, day)
                written += 1
            else:
                assert now[day] == old[day], (context, day, "no audit row, so unchanged")
        duplicated = conn.execute(
            "SELECT count(*) - count(DISTINCT order_id) FROM analytics.fct_orders"
        ).fetchone()[0]
        assert duplicated == 0, context
        assert snapshot_mismatches(conn) == [], context
        if written == 0:
            outcomes["none written"] += 1
        elif written == len(DAYS):
            outcomes["all written"] += 1
        else:
            outcomes["some written"] += 1

    print(f"{TRIALS} kills (seed {SEED}, a day's write {day_s * 1000:.0f} ms): {outcomes}")
    assert outcomes["some written"] >= TRIALS // 4, f"kills should land mid-run: {outcomes}"
    assert FCT_ORDERS.qualified_name == "analytics.fct_orders"

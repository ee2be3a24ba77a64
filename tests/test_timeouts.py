"""Writes on a database that serves an application: every statement under the table's limits.

A write that cannot get a lock within ``timeouts.lock`` gives up rather than queue (and make
everything behind it queue), backs off and tries the partition again; a statement running over
``timeouts.statement`` is cancelled. Either way the partition keeps its old rows until a write
commits.
"""

from __future__ import annotations

import dataclasses
import threading
import time

from support import FCT_ORDERS, REGISTRY, audit_rows, fingerprints, other_session

from backfill_assets.core import snapshots
from backfill_assets.core.audit import AuditTrail, RunInfo
from backfill_assets.core.guards import guard
from backfill_assets.core.params import params_for
from backfill_assets.core.partition_write import write_verified
from backfill_assets.core.rollback import restore, snapshots_of_backfill
from backfill_assets.core.tables import Timeouts, ensure_table

DAY = "2024-04-03"


def write(conn, data_url, table, warnings, backfill_id=None):
    window = table.partitioning.window(DAY)
    params = params_for(table, {})
    with AuditTrail(data_url) as audit:
        return write_verified(
            conn,
            audit,
            RunInfo("run-timeouts", backfill_id, "tester", {}),
            table,
            window,
            params,
            guard(conn, table, window, params),
            warnings.append,
        )


def prepared(conn, data_url, timeouts: Timeouts):
    table = dataclasses.replace(FCT_ORDERS, timeouts=timeouts)
    ensure_table(conn, table)
    snapshots.ensure_snapshot_table(conn, table)
    assert write(conn, data_url, table, []).succeeded
    conn.execute("UPDATE app.orders SET net_amount = net_amount + 1")
    return table


def hold_share_lock(data_url, seconds: float) -> threading.Thread:
    """Another session holding a lock that blocks DELETE (as a long index build would)."""
    return other_session(data_url, "LOCK TABLE analytics.fct_orders IN SHARE MODE", seconds)


def test_a_write_that_meets_a_held_lock_backs_off_retries_and_succeeds_once_it_is_released(
    data_url, conn
):
    table = prepared(conn, data_url, Timeouts(lock_ms=200, statement_ms=60_000, lock_retries=20))
    warnings: list[str] = []
    holder = hold_share_lock(data_url, seconds=2.0)

    started = time.monotonic()
    outcome = write(conn, data_url, table, warnings)
    took = time.monotonic() - started
    holder.join()

    assert outcome.succeeded, outcome.error
    assert took >= 1.5, "it waited for the lock to go"
    assert warnings and all("was not granted within 200 ms" in w for w in warnings)
    assert "retry 1/20" in warnings[0]
    assert [r["status"] for r in audit_rows(conn, dagster_run_id="run-timeouts")] == [
        "succeeded",
        "succeeded",
    ]


def test_a_lock_held_past_every_retry_fails_the_partition_with_what_to_do(data_url, conn):
    table = prepared(conn, data_url, Timeouts(lock_ms=100, statement_ms=60_000, lock_retries=2))
    before = fingerprints(conn, [DAY])
    holder = hold_share_lock(data_url, seconds=6.0)

    outcome = write(conn, data_url, table, [])
    holder.join()

    assert not outcome.succeeded
    assert "lock timeout" in outcome.error and "within 100 ms, 3 times" in outcome.error
    assert "pg_locks" in outcome.error
    assert fingerprints(conn, [DAY]) == before


def test_a_statement_over_the_tables_limit_is_cancelled_and_the_partition_keeps_its_rows(
    data_url, conn
):
    table = prepared(conn, data_url, Timeouts(lock_ms=30_000, statement_ms=1_000, lock_retries=0))
    before = fingerprints(conn, [DAY])
    holder = hold_share_lock(data_url, seconds=4.0)

    started = time.monotonic()
    outcome = write(conn, data_url, table, [])
    took = time.monotonic() - started
    holder.join()

    assert not outcome.succeeded
    assert "statement timeout" in outcome.error and "ran over 1000 ms" in outcome.error
    assert took < 3.5, "cancelled at the statement limit, not when the lock went"
    assert fingerprints(conn, [DAY]) == before


def test_a_rollback_that_meets_a_held_lock_retries_and_restores_the_rows(data_url, conn):
    table = prepared(conn, data_url, Timeouts(lock_ms=200, statement_ms=60_000, lock_retries=20))
    before = fingerprints(conn, [DAY])
    assert write(conn, data_url, table, [], backfill_id="bf-lock").succeeded
    refs = [
        dataclasses.replace(ref, table=table)
        for ref in snapshots_of_backfill(conn, REGISTRY, "bf-lock")
    ]
    warnings: list[str] = []
    holder = hold_share_lock(data_url, seconds=2.0)

    with AuditTrail(data_url) as audit:
        restore(conn, audit, RunInfo("run-rollback", None, "tester", {}), refs, warnings.append)
    holder.join()

    assert fingerprints(conn, [DAY]) == before
    assert warnings and "retry 1/20" in warnings[0]

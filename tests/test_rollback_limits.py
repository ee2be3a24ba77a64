"""A rollback is a write, under a write's limits: it waits while its backfill is paused, and a
lock it is not granted within the table's lock timeout is retried, then given up clearly, with
nothing restored."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from support import SHIPPED_LINES_SOURCE, declare_shipped_lines

from backfill_assets.core import control, rollback
from backfill_assets.core.audit import AuditTrail, RunInfo
from backfill_assets.core.params import params_for
from backfill_assets.core.registry import load_registry
from backfill_assets.core.run import RunHooks, run_table

DAYS = ["2024-03-01", "2024-03-02"]
BACKFILL = "bf_rollback_limits"


@pytest.fixture
def written(conn, data_url, tmp_path):
    """The table written once, then again after a source change: the second write's
    snapshots hold the first write's rows; returns (registry, table, the sum after each)."""
    conn.execute(SHIPPED_LINES_SOURCE)
    folder = tmp_path / "tables"
    table = declare_shipped_lines(folder, extra="timeouts: {lock: 200ms, lock_retries: 2}\n")
    hooks = RunHooks(print, print, print)
    windows = table.partitioning.windows(DAYS)
    sums = []
    for backfill_id in ("first", BACKFILL):
        with AuditTrail(data_url) as audit:
            info = RunInfo(None, backfill_id, "test", {})
            result = run_table(conn, audit, info, table, windows, params_for(table, {}), hooks)
        assert result.complete
        sums.append(amounts(conn))
        conn.execute("UPDATE shop.order_lines SET amount = amount + 1")
    return load_registry([folder]), table, sums


def amounts(conn):
    return conn.execute("SELECT sum(amount) FROM sales.shipped_lines").fetchone()[0]


def undo(conn, data_url, registry, lines: list[str]):
    refs = rollback.snapshots_of_backfill(conn, registry, BACKFILL)
    with AuditTrail(data_url) as audit:
        info = RunInfo(None, BACKFILL, "test", {})
        return rollback.restore(conn, audit, info, refs, lines.append)


def test_a_paused_backfills_rollback_waits_for_the_resume(written, conn, data_url):
    registry, _, (before, after) = written
    assert amounts(conn) == after
    control.pause(conn, BACKFILL, by="test", reason="hold the rollback")
    lines: list[str] = []
    done: list[object] = []
    with psycopg.connect(data_url, autocommit=True) as other:
        worker = threading.Thread(
            target=lambda: done.append(undo(other, data_url, registry, lines))
        )
        worker.start()
        time.sleep(4)
        assert worker.is_alive() and not done, "the rollback went on while its backfill paused"
        assert amounts(conn) == after
        assert any("paused by test" in line for line in lines), lines
        control.resume(conn, BACKFILL)
        worker.join(timeout=30)
    assert done and len(done[0]) == len(DAYS)
    assert amounts(conn) == before
    assert any("resumed after a pause" in line for line in lines), lines


def test_a_rollback_that_meets_a_held_lock_retries_then_fails_clearly_restoring_nothing(
    written, conn, data_url
):
    registry, _, (_, after) = written
    lines: list[str] = []
    with psycopg.connect(data_url) as holder:
        holder.execute("LOCK TABLE sales.shipped_lines IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(rollback.RollbackError) as refused:
            undo(conn, data_url, registry, lines)
        holder.rollback()
    retries = [line for line in lines if "a lock was not granted within 200 ms" in line]
    assert len(retries) == 2, lines
    message = str(refused.value)
    assert "changed nothing" in message and "not granted within 200 ms, 3 times" in message
    assert "pg_locks" in message, message
    assert amounts(conn) == after
    statuses = conn.execute(
        "SELECT status, error FROM backfill_audit.backfill_runs WHERE strategy = 'rollback'"
    ).fetchall()
    assert len(statuses) == len(DAYS) and {s for s, _ in statuses} == {"failed"}
    assert all("not granted within 200 ms" in error for _, error in statuses)

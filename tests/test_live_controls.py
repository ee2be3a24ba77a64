"""Controls for a database that serves an application: pause and resume, throttling.

Real runs on the real PostgreSQL: a pause reaches a run between two partitions and the run waits
instead of failing; the throttle holds writes back while another session keeps a transaction
open, and gives up (writing nothing more) when that lasts past the table's ``max_wait``.
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time

import pytest
from conftest import DATA_TEMPLATE, clone_database
from support import (
    FCT_ORDERS,
    OtherSession,
    audit_rows,
    dbt_models,
    fingerprints,
    materialize_days,
    other_session,
    step_failure_message,
    wait_for,
)

from backfill_assets.core import control
from backfill_assets.core.audit import ensure_audit_table
from backfill_assets.core.database import connect
from backfill_assets.core.registry import DEFAULT_TABLES_DIR, load_registry
from backfill_assets.core.tables import ThrottleLimits
from backfill_assets.core.throttle import Throttle, ThrottleTimeout, stress
from backfill_assets.defs.dbt import dbt_model_assets
from backfill_assets.defs.table_assets import table_asset
from backfill_assets.tooling import cli

DAYS = ["2024-04-01", "2024-04-02", "2024-04-03", "2024-04-04", "2024-04-05"]
BACKFILL = "pausetst"


def written_days(conn) -> list[str]:
    return sorted(
        row["partition_key"] for row in audit_rows(conn, status="succeeded", backfill_id=BACKFILL)
    )


def test_a_paused_backfill_waits_between_partitions_and_resumes_to_the_same_rows(
    postgres, instance, conn
):
    results = []
    ensure_audit_table(conn)
    # Day 3's partition lock, held as another writer would: the run is mid-way when paused.
    lock = "SELECT pg_advisory_lock(hashtext('analytics.fct_orders'), hashtext(%s))"
    conn.execute(lock, [DAYS[2]])
    run = threading.Thread(
        target=lambda: results.append(
            materialize_days(
                postgres, instance, DAYS[0], DAYS[-1], tags={"dagster/backfill": BACKFILL}
            )
        )
    )
    run.start()
    wait_for(lambda: written_days(conn) == DAYS[:2], 60, "the run never reached day 3")
    control.pause(conn, BACKFILL, by="tester", reason="peak hour")
    conn.execute("SELECT pg_advisory_unlock_all()")

    wait_for(lambda: written_days(conn) == DAYS[:3], 30, "the day in progress finishes")
    time.sleep(4)
    assert written_days(conn) == DAYS[:3], "nothing more is written while paused"
    assert run.is_alive(), "the run waits; it does not fail"
    assert control.resume(conn, BACKFILL)
    run.join(timeout=120)

    (result,) = results
    assert result.success
    assert written_days(conn) == DAYS
    warnings = [r.user_message for r in instance.all_logs(result.run_id) if r.level == 30]
    assert any(f"backfill {BACKFILL} paused by tester" in w and "peak hour" in w for w in warnings)
    assert any("resumed after a pause of" in w for w in warnings)
    infos = [r.user_message for r in instance.all_logs(result.run_id) if r.level == 20]
    assert any("held back 0s by the throttle and " in i and "s by a pause" in i for i in infos)
    after_pause = fingerprints(conn, DAYS)
    assert materialize_days(postgres, instance, DAYS[0], DAYS[-1]).success
    assert fingerprints(conn, DAYS) == after_pause, "the same rows as an uninterrupted run"


def test_pause_and_resume_from_the_cli_refuse_an_unknown_backfill(dagster_env, capsys, conn):
    assert cli.main(["pause", "nosuchid"]) == 2
    assert "no backfill 'nosuchid'" in capsys.readouterr().err
    assert cli.main(["pause"]) == 2
    assert "--all" in capsys.readouterr().err

    assert cli.main(["pause", "--all", "--reason", "incident 42"]) == 0
    assert "every backfill paused by" in capsys.readouterr().out
    assert [p.reason for p in control.pauses(conn)] == ["incident 42"]
    assert cli.main(["resume", "--all"]) == 0
    assert cli.main(["resume", "--all"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "every backfill: resumed",
        "every backfill: was not paused",
    ]
    assert control.pauses(conn) == []


def test_the_throttle_holds_writes_back_while_a_transaction_stays_open(data_url, conn):
    limits = ThrottleLimits(pause_ms=300, max_transaction_age_ms=1_000, max_wait_ms=60_000)
    table = dataclasses.replace(FCT_ORDERS, throttle=limits)
    said: list[str] = []
    throttle = Throttle(conn, table, said.append)
    throttle.before_partition()
    assert said == [], "nothing to hold back for"

    app = other_session(data_url, "SELECT 1", seconds=4)
    time.sleep(1.5)
    started = time.monotonic()
    throttle.before_partition()
    held = time.monotonic() - started
    app.join()

    assert held >= 2, "it waited for the transaction to end"
    assert "a transaction has been open for" in said[0] and "max_transaction_age 1s" in said[0]
    assert said[-1].startswith("analytics.fct_orders: going on after")
    assert throttle.paused_s >= 0.3 + 2


def test_only_sessions_waiting_in_this_database_count_as_contention(cluster, conn):
    """``pg_locks`` shows every database's locks, and databases copied from one template have
    the same tables' oids: a session waiting for ``app.orders`` in another database is not
    contention on this one's (it held runs back beside other tests' databases)."""
    other = clone_database(cluster, DATA_TEMPLATE, "other")
    orders = dataclasses.replace(FCT_ORDERS, schema="app", name="orders")
    lock = "LOCK TABLE app.orders IN ACCESS EXCLUSIVE MODE"
    holder = other_session(other, lock, seconds=60)
    waiter = OtherSession(other, lock, seconds=0)
    waiter.start()  # blocked behind the holder until it is released
    try:
        with connect(other) as there:
            wait_for(lambda: stress(there, orders).lock_waiters, 30, "the waiter never waited")
        assert stress(conn, orders).lock_waiters == 0
    finally:
        holder.release()
        waiter.join()


def test_a_busy_budget_rests_in_proportion_to_what_each_write_took(conn):
    """``max_busy: 0.25``: after a write of 0.2 s the writer rests 0.6 s; after one of 0.05 s,
    only what keeps the total within a quarter of the time; a wait for the pause switch counts
    as neither writing nor rest. (The clock and the sleeps are the test's; the stress checks are
    real.)"""
    table = dataclasses.replace(FCT_ORDERS, throttle=ThrottleLimits(max_busy=0.25))
    now = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(round(seconds, 6))
        now[0] += seconds

    throttle = Throttle(conn, table, print, sleep=sleep, clock=lambda: now[0])
    throttle.before_partition()
    assert slept == [], "no rest before the first write"
    now[0] += 0.2  # the first write
    throttle.before_partition()
    assert slept == [0.6], "0.2 s of writing is 25 % of 0.8 s"
    now[0] += 0.05  # a small write
    throttle.before_partition()
    assert slept == [0.6, 0.15], "0.25 s of writing is 25 % of 1.0 s"
    now[0] += 5.0  # a wait for the pause switch, then a write of 0.1 s
    throttle.not_busy(5.0)
    now[0] += 0.1
    throttle.before_partition()
    assert slept == [0.6, 0.15, 0.3], "a pause is no credit: 0.35 s of writing is 25 % of 1.4 s"
    assert throttle.busy_s == pytest.approx(0.35)
    assert throttle.budget_s == throttle.paused_s == pytest.approx(1.05)

    unlimited = Throttle(conn, FCT_ORDERS, print, sleep=sleep, clock=lambda: now[0])
    for _ in range(3):
        unlimited.before_partition()
        now[0] += 0.2
    assert unlimited.paused_s == 0 and len(slept) == 3, "no budget: no rest"


def test_a_run_under_a_busy_budget_writes_at_most_that_share_of_its_time(postgres, instance, conn):
    limits = ThrottleLimits(max_busy=0.3)
    budgeted = table_asset(dataclasses.replace(FCT_ORDERS, throttle=limits))
    result = materialize_days(postgres, instance, DAYS[0], DAYS[-1], assets=(budgeted,))

    assert result.success
    writes = audit_rows(conn, status="succeeded")
    assert [w["partition_key"] for w in writes] == DAYS
    # Before each write, the ones before it took at most 30 % of the time since the first began
    # (the throttle counts a write from its end of one rest to the start of the next: more
    # than the audit's transaction, so it rests at least this much).
    first = writes[0]["started_at"]
    for number, write in enumerate(writes[1:], start=1):
        busy = sum((w["ended_at"] - w["started_at"]).total_seconds() for w in writes[:number])
        assert (write["started_at"] - first).total_seconds() >= busy / 0.3 - 0.01
    infos = [r.user_message for r in instance.all_logs(result.run_id) if r.level == 20]
    assert any("of it keeping writes within max_busy 30% of the time" in i for i in infos), infos


def test_stress_past_max_wait_stops_the_run_and_the_rest_keep_their_rows(
    postgres, instance, conn, data_url
):
    limits = ThrottleLimits(max_transaction_age_ms=1_000, max_wait_ms=2_000)
    throttled = table_asset(dataclasses.replace(FCT_ORDERS, throttle=limits))
    assert materialize_days(postgres, instance, DAYS[0], DAYS[1]).success
    before = fingerprints(conn, DAYS[:2])
    conn.execute("UPDATE app.orders SET net_amount = net_amount + 1")
    app = other_session(data_url, "SELECT 1", seconds=8)
    time.sleep(1.2)

    result = materialize_days(postgres, instance, DAYS[0], DAYS[1], assets=(throttled,))
    app.join()

    assert not result.success
    message = "\n".join(
        str(e.event_specific_data.error) for e in result.all_events if e.is_step_failure
    )
    assert "0 of 2 partition(s)" in message and "the database stayed under stress" in message
    assert "a transaction has been open for" in message
    assert fingerprints(conn, DAYS[:2]) == before


def test_throttle_limits_are_read_from_the_declaration(tmp_path):
    from test_registry import _declaration

    from backfill_assets.core.registry import DeclarationError, load_registry

    throttle = "throttle: {pause: 500ms, max_lock_waiters: 2, max_wait: 5min}\npartitions:"
    folder = _declaration(tmp_path, ("partitions:", throttle))
    table = load_registry([folder]).table("reporting.shipped_lines")
    assert table.throttle == ThrottleLimits(pause_ms=500, max_lock_waiters=2, max_wait_ms=300_000)

    (tmp_path / "bad").mkdir()
    bad = _declaration(tmp_path / "bad", ("partitions:", "throttle: {pause: soon}\npartitions:"))
    with pytest.raises(DeclarationError, match=r"throttle\.pause: 'soon' is not a duration"):
        load_registry([bad])
    assert ThrottleTimeout.__doc__

    for given, share in (("0.3", 0.3), ("30%", 0.3), ("1", 1.0)):
        (tmp_path / given).mkdir()
        budget = f"throttle: {{max_busy: {given}}}\npartitions:"
        folder = _declaration(tmp_path / given, ("partitions:", budget))
        table = load_registry([folder]).table("reporting.shipped_lines")
        assert table.throttle.max_busy == share
    for bad_share in ("0", "2", "lots"):
        (tmp_path / f"bad_{bad_share}").mkdir()
        folder = _declaration(
            tmp_path / f"bad_{bad_share}",
            ("partitions:", f"throttle: {{max_busy: {bad_share}}}\npartitions:"),
        )
        with pytest.raises(DeclarationError, match=r"throttle\.max_busy: .* between 0\.01 and 1"):
            load_registry([folder])


def test_a_paused_backfill_builds_no_mart_until_resumed(postgres, instance, conn):
    assert materialize_days(postgres, instance, DAYS[0]).success
    control.pause(conn, BACKFILL, by="tester")
    results = []
    build = threading.Thread(
        target=lambda: results.append(
            materialize_days(
                postgres,
                instance,
                DAYS[0],
                assets=(dbt_models,),
                tags={"dagster/backfill": BACKFILL},
            )
        )
    )
    build.start()
    time.sleep(5)
    marts = "SELECT to_regclass('analytics.daily_revenue')"
    assert conn.execute(marts).fetchone()[0] is None, "nothing built while paused"
    assert build.is_alive()
    control.resume(conn, BACKFILL)
    build.join(timeout=180)

    (result,) = results
    assert result.success
    revenue = conn.execute("SELECT count(*) FROM analytics.daily_revenue").fetchone()[0]
    assert revenue == 1
    warnings = [r.user_message for r in instance.all_logs(result.run_id) if r.level == 30]
    assert any(f"backfill {BACKFILL} paused by tester" in w for w in warnings), warnings
    assert any("resumed after a pause of" in w for w in warnings)


def demo_tables_with(tmp_path, fct_orders_extra: str) -> tuple:
    """The demo's tables, fct_orders' declaration given ``fct_orders_extra`` (its timeouts, its
    throttle): its asset and the dbt models' assets built from that registry."""
    folder = tmp_path / "tables"
    shutil.copytree(DEFAULT_TABLES_DIR, folder)
    declaration = folder / "fct_orders.yaml"
    declaration.write_text(declaration.read_text() + fct_orders_extra)
    registry = load_registry([folder])
    (models,) = dbt_model_assets(registry)
    return table_asset(registry.table("analytics.fct_orders")), models


def mart_lock_waiters(conn) -> int:
    """Sessions waiting for the mart in this test's database (``pg_locks`` shows every one's)."""
    return conn.execute(
        "SELECT count(*) FROM pg_locks WHERE NOT granted "
        "AND relation = to_regclass('analytics.daily_revenue') "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    ).fetchone()[0]


def test_a_mart_build_that_meets_a_held_lock_retries_until_it_is_released(
    postgres, instance, conn, data_url, tmp_path
):
    table, models = demo_tables_with(tmp_path, "timeouts: {lock: 1s, lock_retries: 4}\n")
    day = DAYS[0]
    assert materialize_days(postgres, instance, day, assets=[table, models]).success
    holder = other_session(data_url, "BEGIN; LOCK TABLE analytics.daily_revenue", 300)
    results = []
    build = threading.Thread(
        target=lambda: results.append(materialize_days(postgres, instance, day, assets=[models]))
    )
    build.start()
    wait_for(lambda: mart_lock_waiters(conn), 120, "dbt never reached the mart's lock")
    waited_from = time.monotonic()
    time.sleep(2.5)  # longer than the 1 s lock timeout: only a retry can still succeed
    holder.release()
    build.join(timeout=120)

    (result,) = results
    assert result.success, step_failure_message(result)
    assert time.monotonic() - waited_from > 2.5
    revenue = conn.execute("SELECT count(*) FROM analytics.daily_revenue").fetchone()[0]
    assert revenue == 1


def test_the_dbt_marts_give_up_on_a_lock_after_their_retries_instead_of_queueing(
    postgres, instance, conn, data_url, tmp_path
):
    table, models = demo_tables_with(tmp_path, "timeouts: {lock: 1s, lock_retries: 2}\n")
    day = DAYS[0]
    assert materialize_days(postgres, instance, day, assets=[table, models]).success
    # Another session holds the mart's table exclusively for longer than the test will wait.
    # (Released when the run ends: a fixed hold ran out on a loaded machine before dbt began.)
    holder = other_session(data_url, "BEGIN; LOCK TABLE analytics.daily_revenue", 300)
    started = time.monotonic()

    result = materialize_days(postgres, instance, day, assets=[table, models])
    elapsed = time.monotonic() - started
    holder.release()

    assert not result.success
    assert elapsed < 120, f"dbt waited {elapsed:.0f}s for the lock (3 tries of 1 s)"
    logs = "\n".join(str(r.user_message) for r in instance.all_logs(result.run_id))
    assert "lock timeout" in logs + step_failure_message(result)


def test_the_dbt_marts_are_held_back_by_the_throttle_and_give_up_past_max_wait(
    postgres, instance, conn, data_url, tmp_path
):
    table, models = demo_tables_with(
        tmp_path, "throttle: {max_transaction_age: 1s, max_wait: 2s}\n"
    )
    assert materialize_days(postgres, instance, DAYS[0], assets=[table]).success
    app = other_session(data_url, "SELECT 1", seconds=10)
    time.sleep(1.2)

    result = materialize_days(postgres, instance, DAYS[0], assets=[models])
    app.join()

    assert not result.success
    message = step_failure_message(result)
    assert "the dbt models were not built" in message and "stayed under stress" in message
    assert "a transaction has been open for" in message
    marts = "SELECT to_regclass('analytics.daily_revenue')"
    assert conn.execute(marts).fetchone()[0] is None, "nothing built"

"""No read or write of the project's own tables waits as long as another session holds a lock.

Every connection starts under a lock and a statement timeout (``core/session_limits.py``). Here
another session holds ACCESS EXCLUSIVE on the audit or a snapshot table (what a migration, a
VACUUM FULL or a forgotten ``LOCK TABLE`` does) for longer than any of these tests may take.
"""

from __future__ import annotations

import logging
import time

import psycopg
from support import FCT_ORDERS, fingerprints, other_session

from backfill_assets.core import settings, snapshots
from backfill_assets.core.audit import AuditTrail, RunInfo, ensure_audit_table
from backfill_assets.core.database import connect
from backfill_assets.core.guards import guard
from backfill_assets.core.params import params_for
from backfill_assets.core.partition_write import write_verified
from backfill_assets.core.run_sizing import UNMEASURED_PER_RUN
from backfill_assets.core.session_limits import bookkeeping
from backfill_assets.core.tables import ensure_table
from backfill_assets.defs.definitions import measured_costs
from backfill_assets.tooling import cli

DAY = "2024-04-01"
HELD_S = 120.0
"""Far longer than any limit here (a test that waited for the lock would take at least this),
however slowly a loaded machine sets the test up; each test releases it when done."""


def hold(url: str, table: str, seconds: float = HELD_S):
    return other_session(url, f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE", seconds)


def ready_to_write(conn):
    """fct_orders and its snapshot table created; the day's window and default parameters."""
    ensure_table(conn, FCT_ORDERS)
    snapshots.ensure_snapshot_table(conn, FCT_ORDERS)
    return FCT_ORDERS.partitioning.window(DAY), params_for(FCT_ORDERS, {})


def test_connections_start_under_the_bookkeeping_limits_unless_configured(conn, monkeypatch):
    settings_now = conn.execute(
        "SELECT current_setting('lock_timeout'), current_setting('statement_timeout')"
    ).fetchone()
    assert settings_now == ("5s", "1min")
    monkeypatch.setenv(settings.LOCK_TIMEOUT_ENV, "750")
    assert bookkeeping().lock_ms == 750


def test_the_definitions_load_sizes_runs_by_default_and_warns_when_the_history_is_locked(
    data_url, conn, monkeypatch, caplog
):
    ensure_audit_table(conn)
    monkeypatch.setenv(settings.DATA_URL_ENV, data_url)
    holder = hold(data_url, "backfill_audit.backfill_runs")

    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="backfill_assets"):
        measured = measured_costs()
    took = time.monotonic() - started

    assert measured == {}
    assert took < 5, f"the load waited {took:.1f} s for the locked history"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "backfill_audit.backfill_runs" in warning and "within 2000 ms" in warning
    assert f"get {UNMEASURED_PER_RUN} partitions per run" in warning
    holder.release()


def test_an_audit_read_from_the_cli_fails_within_the_lock_timeout_in_one_line(
    data_url, conn, dagster_env, monkeypatch, capsys
):
    ensure_audit_table(conn)
    monkeypatch.setenv(settings.LOCK_TIMEOUT_ENV, "1000")
    holder = hold(data_url, "backfill_audit.backfill_runs")

    started = time.monotonic()
    code = cli.main(["audit"])
    took = time.monotonic() - started

    _, err = capsys.readouterr()
    assert code == 2 and took < 10, (code, took)
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: backfill_audit.backfill_runs: a lock was not granted within")
    assert "1000 ms" in err and settings.LOCK_TIMEOUT_ENV in err
    holder.release()


def test_a_snapshot_expiry_from_the_cli_fails_within_the_lock_timeout_in_one_line(
    data_url, conn, dagster_env, monkeypatch, capsys
):
    ensure_table(conn, FCT_ORDERS)
    snapshots.ensure_snapshot_table(conn, FCT_ORDERS)
    monkeypatch.setenv(settings.LOCK_TIMEOUT_ENV, "1000")
    schema, name = snapshots.snapshot_relation(FCT_ORDERS)
    holder = hold(data_url, f"{schema}.{name}")

    started = time.monotonic()
    code = cli.main(["snapshots", "expire", "--days", "1"])
    took = time.monotonic() - started

    _, err = capsys.readouterr()
    assert code == 2 and took < 10, (code, took)
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: the snapshot tables: a lock was not granted within 1000 ms")
    holder.release()


def test_a_write_whose_audit_insert_times_out_is_rolled_back_and_the_warning_says_so(
    data_url, conn, monkeypatch
):
    monkeypatch.setenv(settings.LOCK_TIMEOUT_ENV, "500")
    window, params = ready_to_write(conn)
    warnings: list[str] = []
    run = RunInfo("run-audit-locked", None, "tester", {})
    with AuditTrail(data_url, warn=warnings.append) as audit:
        guarded = guard(conn, FCT_ORDERS, window, params)
        assert write_verified(conn, audit, run, FCT_ORDERS, window, params, guarded).succeeded
        before = fingerprints(conn, [DAY])
        conn.execute("UPDATE app.orders SET net_amount = net_amount + 1")
        guarded = guard(conn, FCT_ORDERS, window, params)
        holder = hold(data_url, "backfill_audit.backfill_runs")
        outcome = write_verified(conn, audit, run, FCT_ORDERS, window, params, guarded)
    holder.release()

    assert not outcome.succeeded and "the write was rolled back" in outcome.error
    assert fingerprints(conn, [DAY]) == before
    (warning,) = warnings
    assert f"of analytics.fct_orders {DAY} not written" in warning
    assert "the write was rolled back: nothing changed in the partition" in warning
    assert "goes on" not in warning


def test_a_writer_waits_for_its_turn_on_a_partition_longer_than_the_session_lock_timeout(
    data_url, conn, monkeypatch
):
    """Writers of one partition take turns by an advisory lock: waiting is the point there."""
    monkeypatch.setenv(settings.LOCK_TIMEOUT_ENV, "300")
    window, params = ready_to_write(conn)
    key = [FCT_ORDERS.qualified_name, DAY]
    holder = other_session(
        data_url,
        "SELECT pg_advisory_xact_lock(hashtext('{}'), hashtext('{}'))".format(*key),
        seconds=2.0,
    )
    with connect(data_url) as writer, AuditTrail(data_url) as audit:
        run = RunInfo("run-turn", None, "tester", {})
        guarded = guard(writer, FCT_ORDERS, window, params)
        started = time.monotonic()
        outcome = write_verified(writer, audit, run, FCT_ORDERS, window, params, guarded)
        took = time.monotonic() - started
    holder.release()

    assert outcome.succeeded, outcome.error
    assert took >= 1.0, "it waited for the other writer"


def test_the_lock_timeout_setting_refuses_a_value_that_is_not_milliseconds(monkeypatch):
    monkeypatch.setenv(settings.LOCK_TIMEOUT_ENV, "5s")
    try:
        bookkeeping()
    except settings.SettingsError as exc:
        assert f"{settings.LOCK_TIMEOUT_ENV}='5s'" in str(exc) and "milliseconds" in str(exc)
    else:
        raise AssertionError("accepted 5s")


def test_a_connection_keeps_options_the_url_gives(data_url):
    url = f"{data_url}&options=-c%20lock_timeout%3D123ms"
    with connect(url) as conn:
        assert conn.execute("SHOW lock_timeout").fetchone()[0] == "123ms"
    with psycopg.connect(data_url) as plain:  # libpq's own default: none
        assert plain.execute("SHOW lock_timeout").fetchone()[0] == "0"

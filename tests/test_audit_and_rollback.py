"""The audit trail, snapshots and rollback, through real runs on a real PostgreSQL."""

from __future__ import annotations

import threading
import time

import pytest
from dagster import AssetKey
from support import (
    FCT_ORDERS,
    REGISTRY,
    audit_rows,
    fingerprints,
    materialize_days,
    record_past_writes,
    rollback_backfill,
    step_failure_message,
)

from backfill_assets.core import partition_write, snapshots
from backfill_assets.core.audit import AuditTrail, RunInfo
from backfill_assets.core.database import connect
from backfill_assets.core.guards import guard
from backfill_assets.core.params import params_for
from backfill_assets.core.partition_write import write_verified
from backfill_assets.core.rollback import RollbackError, restore, snapshots_of_backfill
from backfill_assets.core.tables import ensure_table
from backfill_assets.tooling import cli

DAYS = ["2024-04-01", "2024-04-02", "2024-04-03"]
BACKFILL = {"dagster/backfill": "fixtax01"}


def rewrite_source(conn) -> None:
    """What a backfill fixes: every net amount of the window changes."""
    conn.execute("UPDATE app.orders SET net_amount = net_amount + 1")


def test_an_audit_table_left_by_an_earlier_version_gains_the_new_columns_at_the_next_write(
    postgres, instance, conn
):
    assert materialize_days(postgres, instance, DAYS[0], tags=BACKFILL).success
    conn.execute("ALTER TABLE backfill_audit.backfill_runs DROP COLUMN changes")

    assert materialize_days(postgres, instance, DAYS[1], tags=BACKFILL).success

    (row,) = audit_rows(conn, partition_key=DAYS[1])
    assert row["status"] == "succeeded" and row["changes"]["rows_added"] == row["rows_inserted"]


def test_audit_rows_record_succeeded_and_failed_partitions_with_correct_counts(
    postgres, instance, conn
):
    assert materialize_days(postgres, instance, DAYS[0], DAYS[1], tags=BACKFILL).success
    conn.execute(
        "UPDATE app.orders SET net_amount = -1 WHERE order_id = (SELECT min(order_id) FROM "
        "app.orders WHERE ordered_at >= '2024-04-03' AND ordered_at < '2024-04-04')"
    )
    failed_run = materialize_days(postgres, instance, DAYS[2], tags=BACKFILL)
    assert not failed_run.success

    rows = {row["partition_key"]: row for row in audit_rows(conn, backfill_id="fixtax01")}
    written = fingerprints(conn, DAYS[:2])
    for day in DAYS[:2]:
        row = rows[day]
        assert row["status"] == "succeeded" and row["error"] is None
        assert (row["rows_before"], row["rows_deleted"]) == (0, 0)
        assert row["rows_inserted"] == row["rows_after"] == written[day].rows
        assert row["checksum_after"] == written[day].checksum
        assert row["asset_key"] == "analytics/fct_orders"
        assert row["strategy"] == "delete_insert"
        assert row["sql_hash"] == FCT_ORDERS.sql_hash
        assert row["code_version"] not in ("", "unknown")
        assert row["launched_by"] and row["ended_at"] >= row["started_at"]
        assert row["parameters"]["max_shrink"] == FCT_ORDERS.max_shrink
    failed = rows[DAYS[2]]
    assert failed["status"] == "failed"
    assert failed["dagster_run_id"] == failed_run.run_id
    assert "fct_orders_net_amount_check" in failed["error"]
    assert failed["rows_inserted"] is None and failed["ended_at"] is not None


def test_a_write_whose_audit_row_is_refused_is_rolled_back_with_its_snapshot(data_url, conn):
    """The audit row commits with the data or not at all: no unaudited write, no orphan snapshot."""
    ensure_table(conn, FCT_ORDERS)
    snapshots.ensure_snapshot_table(conn, FCT_ORDERS)
    window = FCT_ORDERS.partitioning.window(DAYS[0])
    params = params_for(FCT_ORDERS, {})
    run = RunInfo("run-unaudited", None, "tester", {})
    with AuditTrail(data_url) as audit:
        first = write_verified(
            conn, audit, run, FCT_ORDERS, window, params, guard(conn, FCT_ORDERS, window, params)
        )
        before = fingerprints(conn, [DAYS[0]])
        kept = conn.execute("SELECT count(*) FROM backfill_snapshots.analytics__fct_orders")
        snapshot_rows = kept.fetchone()[0]
        rewrite_source(conn)
        conn.execute(
            "CREATE FUNCTION backfill_audit.refuse() RETURNS trigger LANGUAGE plpgsql AS "
            "$$BEGIN IF NEW.status = 'succeeded' THEN RAISE EXCEPTION 'audit refused'; END IF; "
            "RETURN NEW; END$$"
        )
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON backfill_audit.backfill_runs "
            "FOR EACH ROW EXECUTE FUNCTION backfill_audit.refuse()"
        )
        second = write_verified(
            conn, audit, run, FCT_ORDERS, window, params, guard(conn, FCT_ORDERS, window, params)
        )

    assert first.succeeded and not second.succeeded
    assert "audit refused" in second.error
    assert fingerprints(conn, [DAYS[0]]) == before
    kept = conn.execute("SELECT count(*) FROM backfill_snapshots.analytics__fct_orders")
    assert kept.fetchone()[0] == snapshot_rows
    statuses = [r["status"] for r in audit_rows(conn, dagster_run_id="run-unaudited")]
    assert statuses == ["succeeded", "failed"]


def write_day(conn, audit, run, day=DAYS[0]):
    window = FCT_ORDERS.partitioning.window(day)
    params = params_for(FCT_ORDERS, {})
    return write_verified(
        conn, audit, run, FCT_ORDERS, window, params, guard(conn, FCT_ORDERS, window, params)
    )


def test_a_locked_audit_table_fails_the_write_within_the_lock_timeout_and_says_why(data_url, conn):
    ensure_table(conn, FCT_ORDERS)
    snapshots.ensure_snapshot_table(conn, FCT_ORDERS)
    run = RunInfo("run-locked-audit", None, "tester", {})
    with AuditTrail(data_url) as audit, connect(data_url) as locker:
        assert write_day(conn, audit, run).succeeded
        before = fingerprints(conn, [DAYS[0]])
        rewrite_source(conn)
        with locker.transaction():
            # Reads go on, inserts wait: what a maintenance job or a careless session does.
            locker.execute("LOCK TABLE backfill_audit.backfill_runs IN EXCLUSIVE MODE")
            release = threading.Timer(60, locker.cancel)  # never hang the suite
            release.start()
            started = time.monotonic()
            outcome = write_day(conn, audit, run)
            waited = time.monotonic() - started
            release.cancel()

    assert not outcome.succeeded
    assert waited < 30, f"the write waited {waited:.0f}s for the audit table"
    assert "backfill_audit.backfill_runs stayed locked by another session" in outcome.error
    assert "the write was rolled back" in outcome.error
    assert fingerprints(conn, [DAYS[0]]) == before


def test_a_run_against_a_locked_audit_table_fails_its_days_quickly_and_writes_nothing(
    postgres, instance, conn, data_url
):
    assert materialize_days(postgres, instance, DAYS[0]).success
    conn.execute("UPDATE backfill_audit.backfill_runs SET status = 'running'")  # a legacy row
    before = fingerprints(conn, [DAYS[0]])
    rewrite_source(conn)
    with connect(data_url) as locker, locker.transaction():
        locker.execute("LOCK TABLE backfill_audit.backfill_runs IN EXCLUSIVE MODE")
        release = threading.Timer(90, locker.cancel)  # never hang the suite
        release.start()
        started = time.monotonic()
        result = materialize_days(postgres, instance, DAYS[0])
        took = time.monotonic() - started
        release.cancel()

    assert not result.success
    assert took < 60, f"the run was held up {took:.0f}s by the locked audit table"
    assert "stayed locked by another session" in step_failure_message(result)
    assert fingerprints(conn, [DAYS[0]]) == before


def test_a_rollback_whose_audit_row_is_refused_restores_nothing_and_says_why(
    postgres, instance, conn, data_url
):
    assert materialize_days(postgres, instance, DAYS[0], tags=BACKFILL).success
    rewrite_source(conn)
    assert materialize_days(postgres, instance, DAYS[0], tags=BACKFILL).success
    before = fingerprints(conn, [DAYS[0]])
    audit_before = audit_rows(conn)
    conn.execute(
        "DO $$BEGIN CREATE ROLE auditless; EXCEPTION WHEN duplicate_object THEN NULL; END$$"
    )
    conn.execute("GRANT USAGE ON SCHEMA analytics, backfill_audit, backfill_snapshots TO auditless")
    conn.execute("GRANT ALL ON ALL TABLES IN SCHEMA analytics, backfill_snapshots TO auditless")
    conn.execute("GRANT SELECT ON ALL TABLES IN SCHEMA backfill_audit TO auditless")
    conn.execute("GRANT USAGE ON ALL SEQUENCES IN SCHEMA backfill_audit TO auditless")
    conn.execute("SET ROLE auditless")
    run = RunInfo("run-rollback", None, "tester", {})
    refs = [snapshots_of_backfill(conn, REGISTRY, "fixtax01")[0]]
    with AuditTrail(data_url) as audit, pytest.raises(RollbackError) as refused:
        restore(conn, audit, run, refs)
    conn.execute("RESET ROLE")

    assert "rollback failed and changed nothing" in str(refused.value)
    assert "grant INSERT on backfill_audit.backfill_runs" in str(refused.value)
    assert fingerprints(conn, [DAYS[0]]) == before
    added = audit_rows(conn)[len(audit_before) :]
    assert [(r["status"], r["strategy"]) for r in added] == [("failed", "rollback")]
    assert added[0]["error"].startswith("rollback not applied: the audit row could not be written")


def test_rows_left_running_by_a_killed_process_are_closed_as_abandoned(conn, capsys, dagster_env):
    record_past_writes(conn, "analytics.fct_orders", seconds=1, count=2)
    conn.execute("UPDATE backfill_audit.backfill_runs SET status = 'running' WHERE id = 2")

    assert cli.main(["audit", "--close-abandoned"]) == 0
    assert cli.main(["audit", "--close-abandoned"]) == 0

    assert capsys.readouterr().out.splitlines() == [
        "closed 1 abandoned audit row(s) as failed: [2]",
        "closed 0 abandoned audit row(s) as failed: -",
    ]
    rows = {row["id"]: row for row in audit_rows(conn)}
    assert rows[1]["status"] == "succeeded"
    assert rows[2]["status"] == "failed" and rows[2]["error"].startswith("abandoned:")


def test_a_run_closes_rows_left_running_by_a_killed_process(postgres, instance, conn):
    record_past_writes(conn, "analytics.fct_orders", seconds=1, count=1)
    conn.execute("UPDATE backfill_audit.backfill_runs SET status = 'running'")

    result = materialize_days(postgres, instance, DAYS[0])

    assert result.success
    closed = audit_rows(conn, id=1)[0]
    assert closed["status"] == "failed" and closed["error"].startswith("abandoned:")
    warnings = [r.user_message for r in instance.all_logs(result.run_id) if r.level == 30]
    assert any("left running by a killed process: [1]" in w for w in warnings), warnings


def test_an_interrupted_write_keeps_the_old_rows_and_records_it_as_failed(
    data_url, conn, monkeypatch
):
    ensure_table(conn, FCT_ORDERS)
    snapshots.ensure_snapshot_table(conn, FCT_ORDERS)
    window = FCT_ORDERS.partitioning.window(DAYS[0])
    params = params_for(FCT_ORDERS, {})
    run = RunInfo("run-interrupted", None, "tester", {})
    with AuditTrail(data_url) as audit:
        first = write_verified(
            conn, audit, run, FCT_ORDERS, window, params, guard(conn, FCT_ORDERS, window, params)
        )
        before = fingerprints(conn, [DAYS[0]])
        rewrite_source(conn)

        def interrupted(*_):
            raise KeyboardInterrupt  # what a terminated run or Ctrl-C raises mid-transaction

        monkeypatch.setattr(partition_write, "verify", interrupted)
        with pytest.raises(KeyboardInterrupt):
            write_verified(
                conn,
                audit,
                run,
                FCT_ORDERS,
                window,
                params,
                guard(conn, FCT_ORDERS, window, params),
            )

    assert first.succeeded and before[DAYS[0]].rows > 0
    assert fingerprints(conn, [DAYS[0]]) == before
    last = audit_rows(conn, dagster_run_id="run-interrupted")[-1]
    assert last["status"] == "failed" and "KeyboardInterrupt" in last["error"]
    assert last["ended_at"] is not None


def test_rolling_back_a_backfill_restores_the_exact_prior_rows_of_every_partition(
    postgres, instance, conn, data_url
):
    assert materialize_days(postgres, instance, DAYS[0], DAYS[-1]).success
    prior = fingerprints(conn, [*DAYS, "2024-04-04"])
    rewrite_source(conn)
    assert materialize_days(postgres, instance, DAYS[0], DAYS[1], tags=BACKFILL).success
    assert materialize_days(postgres, instance, DAYS[2], tags=BACKFILL).success
    assert fingerprints(conn, DAYS) != {d: prior[d] for d in DAYS}

    result = rollback_backfill.execute_in_process(
        run_config={"ops": {"restore_snapshots": {"config": {"backfill_id": "fixtax01"}}}},
        resources={"postgres": postgres},
        instance=instance,
        tags={"backfill_assets/launched_by": "alice"},
    )

    assert result.success
    assert fingerprints(conn, [*DAYS, "2024-04-04"]) == prior
    rollbacks = audit_rows(conn, strategy="rollback")
    assert sorted(r["partition_key"] for r in rollbacks) == DAYS
    assert all(r["status"] == "succeeded" and r["restored_from"] for r in rollbacks)
    assert {r["launched_by"] for r in rollbacks} == {"alice"}
    assert {r["checksum_after"] for r in rollbacks} == {prior[d].checksum for d in DAYS}
    restored = {m.partition for m in result.asset_materializations_for_node("restore_snapshots")}
    assert restored == set(DAYS)
    assert instance.get_latest_materialization_event(AssetKey(["analytics", "fct_orders"]))


def test_a_rollback_can_itself_be_rolled_back(postgres, instance, conn, data_url):
    assert materialize_days(postgres, instance, DAYS[0]).success
    rewrite_source(conn)
    assert materialize_days(postgres, instance, DAYS[0], tags=BACKFILL).success
    fixed = fingerprints(conn, [DAYS[0]])
    config = {"partition": DAYS[0], "table": "analytics.fct_orders"}
    run_config = {"ops": {"restore_snapshots": {"config": config}}}

    for _ in range(2):
        assert rollback_backfill.execute_in_process(
            run_config=run_config, resources={"postgres": postgres}, instance=instance
        ).success

    assert fingerprints(conn, [DAYS[0]]) == fixed


def test_rolling_back_a_backfill_whose_day_was_written_again_refuses_and_names_the_newer_write(
    postgres, instance, conn
):
    """Restoring the pre-backfill rows would silently undo the later backfill's write too."""
    assert materialize_days(postgres, instance, DAYS[0], DAYS[1], tags=BACKFILL).success
    rewrite_source(conn)
    later = {"dagster/backfill": "later001"}
    assert materialize_days(postgres, instance, DAYS[1], tags=later).success
    before = fingerprints(conn, DAYS[:2])

    result = _rollback_backfill(postgres, instance, "fixtax01")

    assert not result.success
    message = step_failure_message(result)
    assert "no longer holds 1 of its partition(s)" in message
    assert f"analytics.fct_orders {DAYS[1]}: write" in message and "by later001" in message
    assert fingerprints(conn, DAYS[:2]) == before
    assert audit_rows(conn, strategy="rollback") == []

    # Undoing the newer one, then undoing that undo, puts its rows back: still refused.
    assert _rollback_backfill(postgres, instance, "later001").success
    assert _rollback_partition(postgres, instance, DAYS[1]).success
    assert fingerprints(conn, DAYS[:2]) == before
    assert not _rollback_backfill(postgres, instance, "fixtax01").success
    # Newest first, then it goes through; a second time there is nothing left to undo.
    assert _rollback_backfill(postgres, instance, "later001").success
    assert _rollback_backfill(postgres, instance, "fixtax01").success
    twice = _rollback_backfill(postgres, instance, "fixtax01")
    assert not twice.success
    assert "by fixtax01" in step_failure_message(twice)


def test_rolling_back_an_unknown_backfill_fails_clearly_and_changes_nothing(
    postgres, instance, conn
):
    assert materialize_days(postgres, instance, DAYS[0]).success
    before = fingerprints(conn, [DAYS[0]])

    result = _rollback_backfill(postgres, instance, "nosuchid")

    assert not result.success
    assert "backfill 'nosuchid' wrote no partition" in str(result.all_events)
    assert fingerprints(conn, [DAYS[0]]) == before
    assert audit_rows(conn, strategy="rollback") == []


def test_erasing_a_customer_purges_them_from_every_snapshot(postgres, instance, conn):
    assert materialize_days(postgres, instance, DAYS[0], DAYS[1]).success
    rewrite_source(conn)
    assert materialize_days(postgres, instance, DAYS[0], DAYS[1]).success
    snapshot = snapshots.snapshot_table(FCT_ORDERS).as_string(conn)
    customer = conn.execute(f"SELECT customer_id FROM {snapshot} LIMIT 1").fetchone()[0]
    others = conn.execute(
        f"SELECT count(*) FROM {snapshot} WHERE customer_id <> %s", [customer]
    ).fetchone()[0]

    erased = snapshots.erase_subject(conn, [FCT_ORDERS], customer)

    assert erased["analytics.fct_orders"] > 0
    assert (
        conn.execute(
            f"SELECT count(*) FROM {snapshot} WHERE customer_id = %s", [customer]
        ).fetchone()[0]
        == 0
    )
    assert conn.execute(f"SELECT count(*) FROM {snapshot}").fetchone()[0] == others
    # A snapshot with fewer rows than its write kept (the erased person's) still rolls back.
    assert _rollback_partition(postgres, instance, DAYS[0]).success
    restored = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE customer_id = %s) FROM analytics.fct_orders "
        "WHERE order_day = %s",
        [customer, DAYS[0]],
    ).fetchone()
    assert restored[0] > 0 and restored[1] == 0


def test_an_expired_snapshot_is_purged_and_the_rollback_says_so(postgres, instance, conn, data_url):
    assert materialize_days(postgres, instance, DAYS[0]).success
    rewrite_source(conn)
    assert materialize_days(postgres, instance, DAYS[0], tags=BACKFILL).success
    before = fingerprints(conn, [DAYS[0]])

    assert snapshots.expire(conn, FCT_ORDERS, retention_days=0) > 0

    with AuditTrail(data_url) as audit, pytest.raises(RollbackError, match="has expired"):
        restore(
            conn,
            audit,
            RunInfo(None, None, "tester", {}),
            snapshots_of_backfill(conn, REGISTRY, "fixtax01"),
        )
    assert fingerprints(conn, [DAYS[0]]) == before


def test_snapshots_can_be_switched_off_per_backfill_and_rollback_then_refuses(
    postgres, instance, conn
):
    assert materialize_days(postgres, instance, DAYS[0]).success
    tags = {**BACKFILL, "backfill_assets/snapshots": "false"}
    assert materialize_days(postgres, instance, DAYS[0], tags=tags).success

    assert audit_rows(conn, backfill_id="fixtax01")[0]["snapshot_rows"] is None
    with pytest.raises(RollbackError, match="kept no snapshot"):
        snapshots_of_backfill(conn, REGISTRY, "fixtax01")


def _collide_audit_ids(postgres, instance, conn, day: str, other: str) -> dict:
    """Two writes of ``other``, the audit table recreated, two writes of ``day``: the second write
    of each gets audit id 2, and both snapshots sit in the one snapshot table."""
    for _ in range(2):
        assert materialize_days(postgres, instance, other).success
    conn.execute("DROP SCHEMA backfill_audit CASCADE")
    assert materialize_days(postgres, instance, day).success
    prior = fingerprints(conn, [day, other])
    rewrite_source(conn)
    assert materialize_days(postgres, instance, day).success
    latest = max(audit_rows(conn, partition_key=day), key=lambda row: row["id"])
    shared = conn.execute(
        "SELECT count(DISTINCT write_id) FROM backfill_snapshots.analytics__fct_orders "
        "WHERE audit_id = %s",
        [latest["id"]],
    ).fetchone()[0]
    assert shared == 2, "the setup did not make two writes share an audit id"
    return prior


def _rollback_partition(postgres, instance, day: str):
    return _rollback(postgres, instance, {"partition": day, "table": "analytics.fct_orders"})


def _rollback_backfill(postgres, instance, backfill_id: str):
    return _rollback(postgres, instance, {"backfill_id": backfill_id})


def _rollback(postgres, instance, config: dict):
    """The rollback_backfill job, as the UI's launchpad runs it; failures are returned."""
    return rollback_backfill.execute_in_process(
        run_config={"ops": {"restore_snapshots": {"config": config}}},
        resources={"postgres": postgres},
        instance=instance,
        raise_on_error=False,
    )


def test_a_rollback_after_the_audit_table_was_recreated_restores_only_its_own_write(
    postgres, instance, conn
):
    day, other = DAYS[0], "2024-04-05"
    prior = _collide_audit_ids(postgres, instance, conn, day, other)
    other_now = fingerprints(conn, [other])

    assert _rollback_partition(postgres, instance, day).success

    assert fingerprints(conn, [day]) == {day: prior[day]}
    assert fingerprints(conn, [other]) == other_now
    duplicated = conn.execute(
        "SELECT count(*) FROM (SELECT order_id FROM analytics.fct_orders GROUP BY order_id "
        "HAVING count(*) > 1) AS d"
    ).fetchone()[0]
    assert duplicated == 0


def test_a_snapshot_that_does_not_match_its_audit_row_is_refused_and_changes_nothing(
    postgres, instance, conn
):
    day, other = DAYS[0], "2024-04-05"
    _collide_audit_ids(postgres, instance, conn, day, other)
    # As snapshots and audit rows written before write ids existed: only the audit id is left.
    conn.execute("UPDATE backfill_snapshots.analytics__fct_orders SET write_id = NULL")
    conn.execute("UPDATE backfill_audit.backfill_runs SET write_id = NULL")
    before = fingerprints(conn, [day, other])

    result = _rollback_partition(postgres, instance, day)

    assert not result.success
    assert "does not match its audit row" in str(result.all_events)
    assert fingerprints(conn, [day, other]) == before
    assert [r["status"] for r in audit_rows(conn, strategy="rollback")] == []


def test_the_reason_given_at_launch_is_kept_in_every_audit_row_and_shown(
    postgres, instance, conn, dagster_env, capsys
):
    why = "TAX-1234: wrong rates in Q2"
    tags = {"backfill_assets/reason": why, "dagster/backfill": "whyb"}
    assert materialize_days(postgres, instance, DAYS[0], DAYS[1], tags=tags).success
    assert cli.main(["rollback", "--backfill", "whyb", "--reason", "TAX-1234 reverted"]) == 0

    rows = audit_rows(conn)
    assert [(r["strategy"], r["reason"]) for r in rows] == [
        ("delete_insert", why),
        ("delete_insert", why),
        ("rollback", "TAX-1234 reverted"),
        ("rollback", "TAX-1234 reverted"),
    ]
    capsys.readouterr()
    assert cli.main(["audit", "--backfill", "whyb"]) == 0
    assert "TAX-1234: wrong rates in Q2" in capsys.readouterr().out

"""Dead run workers: detected by run monitoring, their runs failed, retried, the backfill completed.

The hard case is the one the code server cannot report: daemon, code server and run worker killed
together (a killed process group, a reboot). The run stays STARTED in storage; the next daemon's
monitoring asks the launcher (``defs/run_launcher.py``) whether its worker lives.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from conftest import PRIVATE_PGDATA
from dagster import AssetKey, DagsterInstance, DagsterRunStatus, RunsFilter
from support import failed_run_report, wait_for

from backfill_assets.core.database import connect
from backfill_assets.defs.dagster_internals import BACKFILL_ID_TAG
from backfill_assets.defs.run_launcher import process_state, worker_start
from backfill_assets.tooling import cli, embedded
from backfill_assets.tooling.launch import running_daemon

DAY = "2024-05-01"
FCT_ORDERS = AssetKey(["analytics", "fct_orders"])
PARENT_RUN_TAG = "dagster/parent_run_id"


def test_a_live_dead_zombie_or_reused_worker_pid_is_told_apart():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert process_state(child.pid, time.time()) == "running"
        assert "newer process" in process_state(child.pid, time.time() - 60), "a reused pid"
        child.kill()
        deadline = time.monotonic() + 10
        while process_state(child.pid, time.time()) == "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert process_state(child.pid, time.time()) == "has exited", "a zombie is not alive"
    finally:
        child.kill()
        child.wait()
    assert process_state(child.pid, time.time()) == "no longer exists"


def test_a_run_whose_worker_died_with_the_daemon_is_failed_retried_and_its_backfill_completes(
    dagster_env, tmp_path, capsys, conn
):
    log = tmp_path / "daemon.log"
    # The day's partition lock, held as another writer would: the run's worker waits on it.
    conn.execute("SELECT pg_advisory_lock(hashtext('analytics.fct_orders'), hashtext(%s))", [DAY])
    with running_daemon(dagster_env, log) as daemon:
        args = ["launch", "--select", "analytics/fct_orders", "--from", DAY, "--to", DAY]
        assert cli.main([*args, "--json"]) == 0
        backfill_id = json.loads(capsys.readouterr().out)["backfill_id"]
        with DagsterInstance.get() as instance:
            run = wait_for(
                lambda: instance.get_runs(filters=RunsFilter(tags={BACKFILL_ID_TAG: backfill_id})),
                180,
                "the daemon never started the backfill",
            )[0]
            pid, _ = wait_for(lambda: worker_start(instance, run.run_id), 180, "no run worker")
        wait_for(
            lambda: conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database()"
            ).fetchone()[0],
            120,
            "the run worker never reached the write",
        )
        os.killpg(daemon.pid, signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)  # in case the code server had a session of its own
        daemon.wait()
    conn.execute("SELECT pg_advisory_unlock_all()")
    with DagsterInstance.get() as instance:
        assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.STARTED

    killed_at = time.monotonic()
    with running_daemon(dagster_env, log):
        with DagsterInstance.get() as instance:
            wait_for(
                lambda: instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE,
                60,
                "monitoring did not fail the dead run",
            )
            failed_after = time.monotonic() - killed_at
        code = cli.main(["status", backfill_id, "--wait"])
        out = capsys.readouterr().out

    with DagsterInstance.get() as instance:
        runs = instance.get_runs(filters=RunsFilter(tags={BACKFILL_ID_TAG: backfill_id}))
        report = failed_run_report(instance, [r.run_id for r in runs], log)
        messages = [record.message for record in instance.all_logs(run.run_id)]
        materialized = instance.get_materialized_partitions(FCT_ORDERS)
    assert code == 0, f"{out}\n{report}"
    assert failed_after < 45, "within the monitoring interval (15 s) and a daemon start"
    assert any(f"run worker pid {pid} no longer exists" in m for m in messages), messages
    retries = [r for r in runs if r.tags.get(PARENT_RUN_TAG) == run.run_id]
    assert [r.status for r in retries] == [DagsterRunStatus.SUCCESS], report
    assert materialized == {DAY}
    rows = conn.execute(
        "SELECT count(*), count(DISTINCT order_id) FROM analytics.fct_orders"
    ).fetchone()
    assert rows[0] == rows[1] > 0
    audit = conn.execute(
        "SELECT status, count(*) FROM backfill_audit.backfill_runs GROUP BY 1"
    ).fetchall()
    assert audit == [("succeeded", 1)], "the killed write left no audit row"


def test_a_backfill_interrupted_by_a_database_restart_completes_on_retry_without_duplicates(
    private_cluster_env, tmp_path, capsys
):
    """The server holding the data and Dagster's storage stops while a run waits to write its
    fifth day, then starts again. Seen: the run reports its four committed days and fails (the
    connection is gone); `retry` writes the other six. Every day then holds its rows once."""
    data_url, dagster_env = private_cluster_env
    days = [f"2024-04-{day:02d}" for day in range(1, 11)]
    log = tmp_path / "daemon.log"
    with running_daemon(dagster_env, log):
        with connect(data_url) as holder:
            holder.execute(
                "SELECT pg_advisory_lock(hashtext('analytics.fct_orders'), hashtext(%s))",
                [days[4]],
            )
            args = ["launch", "--select", "analytics/fct_orders", "--json"]
            assert cli.main([*args, "--from", days[0], "--to", days[-1]]) == 0
            backfill_id = json.loads(capsys.readouterr().out)["backfill_id"]
            wait_for(
                lambda: holder.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database()"
                ).fetchone()[0],
                180,
                "the run never reached its fifth day",
            )
            embedded.stop(PRIVATE_PGDATA)
        time.sleep(2)
        embedded.start(PRIVATE_PGDATA)
        first = cli.main(["status", backfill_id, "--wait"])
        status = capsys.readouterr()
        if first != 0:
            retried = cli.main(["retry", backfill_id, "--wait"])
            out, err = capsys.readouterr()
            assert retried == 0, f"{status.out}{status.err}\n{out}\n{err}"

    with connect(data_url) as conn:
        rows, distinct, written = conn.execute(
            "SELECT count(*), count(DISTINCT order_id), count(DISTINCT order_day) "
            "FROM analytics.fct_orders"
        ).fetchone()
        expected = conn.execute(
            "SELECT count(*) FROM app.orders WHERE ordered_at >= %s AND ordered_at < %s::date + 1",
            [days[0], days[-1]],
        ).fetchone()[0]
        latest = conn.execute(
            "SELECT DISTINCT ON (partition_key) partition_key, rows_after FROM "
            "backfill_audit.backfill_runs WHERE status = 'succeeded' "
            "ORDER BY partition_key, id DESC"
        ).fetchall()
    assert (rows, distinct, written) == (expected, expected, len(days))
    assert [day for day, _ in latest] == days
    assert sum(after for _, after in latest) == rows, "each day's latest audit row is its rows"


def _cli_materialize(env: dict[str, str], day: str, log) -> subprocess.Popen:
    """``dagster asset materialize`` of one day: a run executed in the CLI's own process."""
    command = ["dagster", "asset", "materialize", "-m", "backfill_assets.definitions"]
    command += ["--select", "analytics/fct_orders", "--partition", day]
    return subprocess.Popen(
        command,
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_killed_cli_materializes_are_failed_and_a_later_backfill_runs_without_a_hand(
    dagster_env, tmp_path, capsys, conn
):
    """Two SIGKILLed ``dagster asset materialize`` runs used to stay STARTED for good: they never
    logged the launcher's "Started process" event, so monitoring counted them alive, and they
    filled both of the queue's slots. Their workers are recorded now, and found dead."""
    killed_days = ["2024-05-02", "2024-05-03"]
    for day in killed_days:  # held as another writer would: each run waits on its day
        conn.execute(
            "SELECT pg_advisory_lock(hashtext('analytics.fct_orders'), hashtext(%s))", [day]
        )
    with (tmp_path / "cli.log").open("ab") as cli_log:
        workers = [_cli_materialize(dagster_env, day, cli_log) for day in killed_days]
    try:
        wait_for(
            lambda: (
                conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database()"
                ).fetchone()[0]
                == 2
            ),
            180,
            "the CLI runs never reached their writes: " + (tmp_path / "cli.log").read_text(),
        )
    finally:
        for worker in workers:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    conn.execute("SELECT pg_advisory_unlock_all()")
    with DagsterInstance.get() as instance:
        killed = instance.get_runs(filters=RunsFilter(statuses=[DagsterRunStatus.STARTED]))
    assert len(killed) == 2, "both runs are left STARTED by the kill"

    log = tmp_path / "daemon.log"
    with running_daemon(dagster_env, log):
        args = ["launch", "--select", "analytics/fct_orders", "--from", DAY, "--to", DAY]
        assert cli.main([*args, "--json"]) == 0
        backfill_id = json.loads(capsys.readouterr().out)["backfill_id"]
        code = cli.main(["status", backfill_id, "--wait"])
        out = capsys.readouterr().out
        with DagsterInstance.get() as instance:
            runs = instance.get_runs(filters=RunsFilter(tags={BACKFILL_ID_TAG: backfill_id}))
            report = failed_run_report(instance, [r.run_id for r in runs], log)
            statuses = [instance.get_run_by_id(run.run_id).status for run in killed]
            messages = [m.message for run in killed for m in instance.all_logs(run.run_id)]
    assert code == 0, f"{out}\n{report}"
    assert statuses == [DagsterRunStatus.FAILURE] * 2
    pids = {str(worker.pid) for worker in workers}
    dead = [m for m in messages if "no longer exists" in m and any(p in m for p in pids)]
    assert len(dead) == 2, messages
    days = conn.execute("SELECT DISTINCT order_day::text FROM analytics.fct_orders").fetchall()
    assert days == [(DAY,)], "the killed runs wrote nothing"

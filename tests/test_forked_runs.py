"""Runs forked from the launcher's fork server: recorded, watched and cancelable as the code
server's spawned runs are, and Dagster's own launching one setting away.

Every daemon test already runs its backfills through the forked path; these pin what the fork
server adds (``defs/run_launcher.py``): the worker recorded at launch (the pid that then reports
"Started process for run"), a killed worker's run failed at once by its launcher (not up to 15 s
later by run monitoring) and retried, and ``fork_runs: false``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal

import yaml
from dagster import DagsterEventType, DagsterInstance, DagsterRun, DagsterRunStatus, RunsFilter
from support import audit_rows, failed_run_report, wait_for

from backfill_assets.core import control
from backfill_assets.core.settings import DAGSTER_HOME
from backfill_assets.defs.dagster_internals import BACKFILL_ID_TAG, GRPC_INFO_TAG
from backfill_assets.defs.run_launcher import WORKER_TAG, MonitoredRunLauncher, worker_start
from backfill_assets.tooling import cli
from backfill_assets.tooling.launch import running_daemon, wait_for_backfill

DAYS = ["--from", "2024-06-01", "--to", "2024-06-03"]


def launch(capsys, *span: str) -> str:
    assert cli.main(["launch", "--select", "analytics/fct_orders", *span, "--json"]) == 0
    return json.loads(capsys.readouterr().out)["backfill_id"]


def runs_of(instance: DagsterInstance, backfill_id: str) -> list:
    return instance.get_runs(filters=RunsFilter(tags={BACKFILL_ID_TAG: backfill_id}))


def test_a_forked_run_killed_is_failed_by_its_launcher_at_once_and_retried_to_the_same_rows(
    dagster_env, tmp_path, capsys, conn
):
    log = tmp_path / "daemon.log"
    with running_daemon(dagster_env, log), DagsterInstance.get() as instance:
        backfill_id = launch(capsys, *DAYS)
        control.pause(conn, backfill_id, by="tester", reason="hold the run")
        run = wait_for(
            lambda: next((r for r in runs_of(instance, backfill_id) if WORKER_TAG in r.tags), None),
            180,
            "the daemon never started the backfill's run",
            poll_s=0.2,
        )
        pid = json.loads(run.tags[WORKER_TAG])["pid"]
        wait_for(
            lambda: instance.get_run_by_id(run.run_id).status == DagsterRunStatus.STARTED,
            120,
            "the run never started",
        )
        os.kill(pid, signal.SIGKILL)
        failed = wait_for(
            lambda: (r := instance.get_run_by_id(run.run_id)).is_finished and r,
            10,  # run monitoring polls every 15 s: only the launcher is this quick
            "the killed run was not failed within 10 s",
        )
        assert failed.status == DagsterRunStatus.FAILURE
        said = [
            e.message for e in instance.all_logs(run.run_id, of_type=DagsterEventType.ENGINE_EVENT)
        ]
        assert any(f"Run execution process for {run.run_id}" in m for m in said), said
        control.resume(conn, backfill_id)
        status = wait_for_backfill(instance, backfill_id, timeout_s=180, poll_s=0.2).daemon_status
        runs = runs_of(instance, backfill_id)
        assert status == "COMPLETED_SUCCESS", failed_run_report(
            instance, [r.run_id for r in runs], log
        )
        assert len(runs) == 2, "the killed run and its retry"
        for forked in runs:
            worker = json.loads(forked.tags[WORKER_TAG])
            assert worker["forked"] and worker["run"] == forked.run_id
            assert GRPC_INFO_TAG not in forked.tags, "not started by the code server"
            started = worker_start(instance, forked.run_id)
            assert started and started[0] == worker["pid"], "the launcher recorded its worker"
    written = audit_rows(conn, table_name="analytics.fct_orders", status="succeeded")
    assert sorted(a["partition_key"] for a in written) == ["2024-06-01", "2024-06-02", "2024-06-03"]
    duplicates = conn.execute(
        "SELECT count(*) - count(DISTINCT order_id) FROM analytics.fct_orders"
    ).fetchone()[0]
    assert duplicates == 0


def test_with_fork_runs_false_the_code_server_starts_the_runs_as_dagster_does(
    dagster_env, tmp_path, capsys
):
    home = tmp_path / "spawning_home"
    home.mkdir()
    config = yaml.safe_load((DAGSTER_HOME / "dagster.yaml").read_text())
    config["run_launcher"]["config"] = {"fork_runs": False}
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    shutil.rmtree(dagster_env["DAGSTER_HOME"])
    shutil.copytree(home, dagster_env["DAGSTER_HOME"])
    log = tmp_path / "daemon.log"
    with running_daemon(dagster_env, log), DagsterInstance.get() as instance:
        backfill_id = launch(capsys, "--from", "2024-06-01", "--to", "2024-06-01")
        status = wait_for_backfill(instance, backfill_id, timeout_s=180, poll_s=0.2).daemon_status
        (run,) = runs_of(instance, backfill_id)
        assert status == "COMPLETED_SUCCESS", failed_run_report(instance, [run.run_id], log)
        assert GRPC_INFO_TAG in run.tags, "started by the code server"
        assert not json.loads(run.tags[WORKER_TAG]).get("forked")


def _exit_at_once() -> None:
    raise SystemExit(1)


def test_a_run_canceled_before_its_process_could_record_it_ends_canceled_not_failed(instance):
    """The cancel's SIGINT can reach a forked run before Dagster's handlers are in place (the
    process is still starting): it exits without a word. Its run was CANCELING, so the launcher
    records it canceled, not crashed (which would fail it and have it retried)."""
    launcher = MonitoredRunLauncher()
    launcher.register_instance(instance)
    run = instance.add_run(DagsterRun(job_name="backfill_job", status=DagsterRunStatus.CANCELING))
    process = multiprocessing.get_context("fork").Process(target=_exit_at_once)
    process.start()

    launcher._reap(run.run_id, process)

    assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.CANCELED
    crashed = instance.add_run(DagsterRun(job_name="backfill_job", status=DagsterRunStatus.STARTED))
    process = multiprocessing.get_context("fork").Process(target=_exit_at_once)
    process.start()
    launcher._reap(crashed.run_id, process)
    assert instance.get_run_by_id(crashed.run_id).status == DagsterRunStatus.FAILURE

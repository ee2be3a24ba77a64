"""`backfill-assets cancel`: whatever the kind of backfill, what is queued or running is canceled.

``dagster job backfill`` queues one run per partition and marks its backfill COMPLETED at once, so
Dagster's own cancel (the daemon acting on CANCELING) never reaches those runs. No daemon runs in
these tests: the runs stay queued, as they do until a daemon dequeues them.
"""

from __future__ import annotations

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
from support import FCT_ORDERS_KEY, dagster_job_backfill, launched_job_backfill

from backfill_assets.defs.dagster_internals import BACKFILL_ID_TAG
from backfill_assets.tooling import cli
from backfill_assets.tooling.launch import launch_asset_backfill

JOB = "backfill__analytics__fct_orders"
DAYS = [f"2024-04-{day:02d}" for day in range(1, 11)]


def runs_of(backfill_id: str):
    with DagsterInstance.get() as instance:
        return instance.get_runs(filters=RunsFilter(tags={BACKFILL_ID_TAG: backfill_id}))


def test_cancel_cancels_every_queued_run_of_a_job_backfill_dagster_marked_completed(
    dagster_env, capsys
):
    launched = dagster_job_backfill(dagster_env, JOB, "--partitions", ",".join(DAYS))
    backfill_id = launched_job_backfill(launched)
    with DagsterInstance.get() as instance:
        assert instance.get_backfill(backfill_id).status.value == "COMPLETED"
    assert {run.status for run in runs_of(backfill_id)} == {DagsterRunStatus.QUEUED}
    assert cli.main(["status", backfill_id]) == 3
    assert "10 in flight" in capsys.readouterr().out

    assert cli.main(["cancel", backfill_id]) == 0
    assert f"backfill {backfill_id}: canceled 10 queued run(s)" in capsys.readouterr().out

    runs = runs_of(backfill_id)
    assert len(runs) == len(DAYS)
    assert {run.status for run in runs} == {DagsterRunStatus.CANCELED}
    with DagsterInstance.get() as instance:
        assert instance.get_backfill(backfill_id).status.value == "CANCELED"
        started = instance.get_runs(
            filters=RunsFilter(job_name=JOB, statuses=[DagsterRunStatus.STARTED])
        )
    assert started == []


def test_status_and_cancel_agree_that_a_canceled_job_backfill_has_ended(dagster_env, capsys):
    launched = dagster_job_backfill(dagster_env, JOB, "--partitions", ",".join(DAYS[:2]))
    backfill_id = launched_job_backfill(launched)
    assert cli.main(["cancel", backfill_id]) == 0
    capsys.readouterr()

    assert cli.main(["status", backfill_id]) == 1
    out = capsys.readouterr().out
    assert "status: finished (Dagster: CANCELED)" in out
    assert f"not materialized: * {DAYS[0]}, * {DAYS[1]}" in out
    assert cli.main(["cancel", backfill_id]) == 2
    assert "already ended (CANCELED) and none of its runs is queued" in capsys.readouterr().err


def test_cancel_of_an_asset_backfill_the_daemon_has_not_picked_up_marks_it_canceling(
    dagster_env, capsys
):
    with DagsterInstance.get() as instance:
        backfill_id = launch_asset_backfill(instance, [FCT_ORDERS_KEY], DAYS[0], DAYS[-1])
    assert cli.main(["cancel", backfill_id]) == 0
    assert "canceled 0 queued run(s)" in capsys.readouterr().out
    with DagsterInstance.get() as instance:
        assert instance.get_backfill(backfill_id).status.value == "CANCELING"
    assert cli.main(["status", backfill_id]) == 3
    assert "status: canceling (Dagster: CANCELING)" in capsys.readouterr().out

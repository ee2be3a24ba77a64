"""SIGKILL of every kind of run at random moments: the queue drains with no hand, nothing doubles.

Beside the writer's kill soak (``test_kill_soak.py``), the paths that once left the queue stuck or
a mart duplicated: a ``dagster asset materialize`` from the command line (in-process: it used to
stay STARTED for good), a run the daemon launched for a backfill (its worker killed), and a plain
``dbt build`` of the marts (no Dagster around it). A daemon runs throughout. After the kills,
with no hand: every run ends (monitoring fails the dead ones, retries re-run them), a backfill of
every day then completes, and every table and mart holds each key once, the marts agreeing with
the table they are built from.

``make test`` runs 3 trials (one of each kind); ``make soak`` runs 15 (BACKFILL_QUEUE_SOAK_TRIALS,
seeded by BACKFILL_SOAK_SEED).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
from support import failed_run_report, plain_dbt_env, wait_for

from backfill_assets.core.settings import DEFAULT_DBT_PROJECT_DIR
from backfill_assets.defs.dagster_internals import BACKFILL_ID_TAG
from backfill_assets.defs.run_launcher import WORKER_TAG
from backfill_assets.project import DBT_EXECUTABLE
from backfill_assets.tooling import cli
from backfill_assets.tooling.launch import running_daemon

TRIALS = int(os.environ.get("BACKFILL_QUEUE_SOAK_TRIALS", "3"))
SEED = int(os.environ.get("BACKFILL_SOAK_SEED", "20241125"))
DAYS = [f"2024-06-{day:02d}" for day in range(1, 7)]
IN_FLIGHT = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.CANCELING,
]


def kill_cli_materialize(env, rng, log, capsys) -> str:
    day = rng.choice(DAYS)
    command = ["dagster", "asset", "materialize", "-m", "backfill_assets.definitions"]
    command += ["--select", "analytics/fct_orders", "--partition", day]
    process = subprocess.Popen(
        command, env={**os.environ, **env}, stdout=log, stderr=log, start_new_session=True
    )
    time.sleep(rng.uniform(2, 8))  # loading the definitions, starting the run, writing
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return f"dagster asset materialize {day}"


def kill_daemon_run(env, rng, log, capsys) -> str:
    first = rng.randrange(len(DAYS) - 2)
    span = ["--from", DAYS[first], "--to", DAYS[first + 2]]
    args = ["launch", "--select", "analytics/fct_orders", "--downstream", *span, "--json"]
    assert cli.main(args) == 0
    backfill_id = json.loads(capsys.readouterr().out)["backfill_id"]
    with DagsterInstance.get() as instance:
        run = wait_for(
            lambda: next(
                (
                    r
                    for r in instance.get_runs(
                        filters=RunsFilter(tags={BACKFILL_ID_TAG: backfill_id})
                    )
                    if WORKER_TAG in r.tags
                ),
                None,
            ),
            180,
            "the daemon never started the backfill's run",
            poll_s=0.2,
        )
    time.sleep(rng.uniform(0, 3))
    # A worker that had finished already: a kill after the end is a trial too.
    with contextlib.suppress(ProcessLookupError):
        os.kill(json.loads(run.tags[WORKER_TAG])["pid"], signal.SIGKILL)
    return f"the run worker of backfill {backfill_id} ({' '.join(span)})"


def kill_dbt_build(env, rng, log, capsys) -> str:
    first = rng.randrange(len(DAYS) - 2)
    command = [DBT_EXECUTABLE, "build", "--select", "daily_revenue", "customer_daily_orders"]
    command += ["--event-time-start", DAYS[first], "--event-time-end", DAYS[first + 2]]
    process = subprocess.Popen(
        command,
        cwd=DEFAULT_DBT_PROJECT_DIR,
        env=plain_dbt_env(os.environ["BACKFILL_PG_URL"]),
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    time.sleep(rng.uniform(1, 6))
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return f"dbt build {DAYS[first]}..{DAYS[first + 1]}"


KINDS = [kill_cli_materialize, kill_daemon_run, kill_dbt_build]


def in_flight(instance) -> list:
    return instance.get_runs(filters=RunsFilter(statuses=IN_FLIGHT))


def test_killed_runs_of_every_kind_leave_a_queue_that_drains_and_tables_without_duplicates(
    dagster_env, tmp_path, capsys, conn
):
    rng = random.Random(SEED)
    daemon_log = tmp_path / "daemon.log"
    # The marts exist before dbt is killed mid-build: a first build is another story (tested
    # in test_dbt_model).
    with running_daemon(dagster_env, daemon_log):
        launch = ["launch", "--select", "analytics/fct_orders", "--downstream", "--wait"]
        assert cli.main([*launch, "--from", DAYS[0], "--to", DAYS[-1]]) == 0, daemon_log
        capsys.readouterr()
        killed = []
        with (tmp_path / "killed.log").open("ab") as log:
            for trial in range(TRIALS):
                killed.append(KINDS[trial % len(KINDS)](dagster_env, rng, log, capsys))
        started = time.monotonic()
        with DagsterInstance.get() as instance:
            wait_for(
                lambda: not in_flight(instance),
                240,
                f"runs still in flight after killing {killed}: {in_flight(instance)}",
                poll_s=1,
            )
        drained_s = time.monotonic() - started
        code = cli.main([*launch, "--from", DAYS[0], "--to", DAYS[-1]])
        out = capsys.readouterr().out
        with DagsterInstance.get() as instance:
            runs = [r.run_id for r in instance.get_runs()]
            report = failed_run_report(instance, runs, daemon_log)
            left = in_flight(instance)
    print(f"killed {killed}; the queue drained {drained_s:.0f}s after the last kill")

    assert code == 0, f"{out}\n{report}"
    assert not left
    duplicated_orders = conn.execute(
        "SELECT count(*) - count(DISTINCT order_id) FROM analytics.fct_orders"
    ).fetchone()[0]
    duplicated_marts = conn.execute(
        "SELECT (SELECT count(*) FROM (SELECT 1 FROM analytics.customer_daily_orders "
        " GROUP BY customer_id, order_day HAVING count(*) > 1) AS c)"
        " + (SELECT count(*) FROM (SELECT 1 FROM analytics.daily_revenue "
        " GROUP BY order_day HAVING count(*) > 1) AS d)"
    ).fetchone()[0]
    assert (duplicated_orders, duplicated_marts) == (0, 0), killed
    disagreeing = conn.execute(
        "SELECT count(*) FROM analytics.daily_revenue AS r FULL JOIN ("
        " SELECT order_day, count(*) AS orders FROM analytics.fct_orders GROUP BY 1"
        ") AS f USING (order_day) WHERE r.order_count IS DISTINCT FROM f.orders"
    ).fetchone()[0]
    assert disagreeing == 0, "each day's revenue counts that day's orders"
    running = conn.execute(
        "SELECT count(*) FROM backfill_audit.backfill_runs WHERE status = 'running'"
    ).fetchone()[0]
    assert running == 0, "no audit row claims a write still runs"

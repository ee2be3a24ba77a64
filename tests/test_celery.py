"""Steps on Celery workers over RabbitMQ (``BACKFILL_EXECUTOR=celery``), for real: the machine's
RabbitMQ on 127.0.0.1 (``make test`` starts one where none runs), workers started by
``backfill-assets worker`` in folders of their own, asset backfills through the project's daemon.
Each test has a queue of its own, deleted after it."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import psycopg
import pytest
import yaml
from conftest import DAGSTER_TEMPLATE, DATA_TEMPLATE, clone_database, storage_overrides
from dagster import (
    AssetKey,
    DagsterEventType,
    DagsterInstance,
    RunsFilter,
    instance_for_test,
)
from support import (
    dbt_models,
    failed_run_report,
    fct_orders,
    materialize_days,
    other_session,
    record_past_writes,
    wait_for,
)

from backfill_assets.core import settings
from backfill_assets.core.database import connect
from backfill_assets.defs.dagster_internals import BACKFILL_ID_TAG, PartitionKeyFilter
from backfill_assets.defs.resources import PostgresResource
from backfill_assets.defs.run_launcher import STARTED_PROCESS, WORKER_TAG, process_state
from backfill_assets.tooling import cli
from backfill_assets.tooling.launch import launch_asset_backfill, running_daemon, wait_for_backfill
from backfill_assets.tooling.worker import check_broker, delete_queue, running_workers

FCT_ORDERS = AssetKey(["analytics", "fct_orders"])
FIRST, LAST = "2024-04-01", "2024-04-12"
DAYS = [f"2024-04-{day:02d}" for day in range(1, 13)]
BEFORE = "2024-03-31"
IN_CELERY_WORKER = "in celery worker"
SLOW_WRITES = """
CREATE FUNCTION public.slow_write() RETURNS trigger LANGUAGE plpgsql
    AS $$ BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$;
CREATE TRIGGER slow_write AFTER INSERT ON analytics.fct_orders
    FOR EACH STATEMENT EXECUTE FUNCTION public.slow_write();
"""
"""Each write of a partition of fct_orders holds its transaction 2 s longer: writes overlap."""
LOCK_FCT_ORDERS = "LOCK TABLE analytics.fct_orders IN SHARE MODE"
"""An application's lock that makes the backfill's writes of fct_orders wait, mid-transaction."""


@pytest.fixture
def celery_env(dagster_env, monkeypatch) -> dict[str, str]:
    """The daemon's and the workers' environment with ``BACKFILL_EXECUTOR=celery`` and a queue
    of this test's own on the machine's broker; the queue is deleted afterwards."""
    queue = f"backfill-test-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv(settings.EXECUTOR_ENV, "celery")
    monkeypatch.setenv(settings.CELERY_QUEUE_ENV, queue)
    choice = settings.executor()
    check_broker(choice)  # RabbitMQ must run (make test starts it): a clear failure otherwise
    yield {
        **dagster_env,
        settings.EXECUTOR_ENV: "celery",
        settings.CELERY_QUEUE_ENV: queue,
        settings.CELERY_BROKER_ENV: choice.broker,
    }
    delete_queue(choice)


def names(env: dict[str, str], count: int) -> list[str]:
    """Workers' names of this test's own: Celery's remote-control queue is one per name and
    host (``NAME@host.celery.pidbox``), and tests side by side start workers on one host."""
    queue = env[settings.CELERY_QUEUE_ENV]
    return [f"w{i + 1}-{queue.rsplit('-', 1)[1]}" for i in range(count)]


def step_workers(instance: DagsterInstance, run_ids) -> dict[tuple[str, str], list[str]]:
    """(run, step) → the Celery workers that executed it, in order, from dagster-celery's engine
    events "Executing steps ... in celery worker"."""
    found: dict[tuple[str, str], list[str]] = {}
    for run_id in run_ids:
        for record in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
            event = record.dagster_event
            if IN_CELERY_WORKER in (event.message or ""):
                worker = event.engine_event_data.metadata["Celery worker"].value
                found.setdefault((run_id, event.step_key), []).append(worker)
    return found


def started_pid(instance: DagsterInstance, run_id: str) -> int:
    """The run's own process, from the launcher's event "Started process for run (pid: N)"."""
    for record in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        if record.dagster_event.message.startswith(STARTED_PROCESS):
            return int(record.dagster_event.message.split("pid: ")[1].rstrip(")."))
    raise AssertionError(f"run {run_id} recorded no started process")


def set_runs_and_writers(home: Path, instance: DagsterInstance, runs: int, writers: int) -> None:
    """``runs`` runs at a time in this test's dagster.yaml, ``writers`` in the writers' pool."""
    path = home / "dagster.yaml"
    config = yaml.safe_load(path.read_text())
    config["concurrency"]["runs"]["max_concurrent_runs"] = runs
    path.write_text(yaml.safe_dump(config))
    instance.event_log_storage.set_concurrency_slots("postgres_writes", writers)


class WriterSampler(threading.Thread):
    """The most sessions inside a partition's write at once, sampled every few milliseconds: a
    table's write and a dbt batch both hold the (table or model, partition) advisory lock, two
    int4 keys, for their whole transaction (first builds and schema changes lock one bigint)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.most, self.samples = url, 0, 0
        self.stopped = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stopped.is_set():
                (writing,) = conn.execute(
                    "SELECT count(DISTINCT pid) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND objsubid = 2 AND granted AND database = "
                    "(SELECT oid FROM pg_database WHERE datname = current_database())"
                ).fetchone()
                self.most, self.samples = max(self.most, writing), self.samples + 1
                time.sleep(0.01)


def partition_checksums(url: str) -> dict[tuple[str, str], tuple]:
    """Rows and an order-independent hash per (table, day) of the table and its marts."""
    queries = {
        "analytics.fct_orders": "order_day",
        "analytics.daily_revenue": "order_day",
        "analytics.customer_daily_orders": "order_day",
    }
    found = {}
    with psycopg.connect(url) as conn:
        for table, day in queries.items():
            rows = conn.execute(
                f"SELECT {day}::text, count(*), sum(hashtextextended(t::text, 0)) FROM {table} t "
                f"WHERE {day} BETWEEN %s AND %s GROUP BY 1",
                [FIRST, LAST],
            ).fetchall()
            found |= {(table, str(key)): (count, digest) for key, count, digest in rows}
    return found


def kept_and_audited(url: str) -> dict[str, object]:
    """What a backfill leaves besides the rows: the audit's writes (table, partition, status,
    rows), and the snapshots' rows per table (their content, not their names' run ids)."""
    with psycopg.connect(url) as conn:
        audit = conn.execute(
            "SELECT table_name, partition_key, status, rows_before, rows_deleted, rows_inserted, "
            "rows_after, snapshot_rows FROM backfill_audit.backfill_runs "
            "WHERE launched_by <> 'tester' ORDER BY 1, 2, 3, 4"
        ).fetchall()
        snapshots = conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'backfill_snapshots' AND c.relkind IN ('r', 'p')"
        ).fetchall()
        kept = Counter()
        for (name,) in snapshots:
            kept[name] += conn.execute(
                f'SELECT count(*) FROM backfill_snapshots."{name}"'
            ).fetchone()[0]
    return {"audit": audit, "snapshot rows": dict(kept)}


def check_results(instance: DagsterInstance) -> dict[tuple[str, str], str]:
    """Every check's latest result per day, as the UI reads them."""
    results = {}
    for check_key in [*fct_orders.check_keys, *dbt_models.check_keys]:
        for day in DAYS:
            records = instance.event_log_storage.get_latest_asset_check_execution_by_key(
                [check_key], partition_filter=PartitionKeyFilter(key=day)
            )
            record = records.get(check_key)
            results[(check_key.to_user_string(), day)] = record.status.value if record else None
    return results


def test_a_backfill_on_celery_workers_spreads_its_steps_and_writes_what_in_process_writes(
    celery_env, data_url, conn, cluster, instance, postgres, tmp_path
):
    """Three workers, four runs of three days (fct_orders, then its dbt marts), at most four runs
    at a time but two in the writers' pool, and a write of fct_orders takes 2 s (a trigger):
    two runs write side by side, never three. The steps run on more than one worker, and rows,
    checks, audit and snapshots equal one in-process run of the same days on a copy of the same
    database."""
    record_past_writes(conn, "analytics.fct_orders", seconds=20)  # 60 s a run: 3 days a run
    assert materialize_days(postgres, instance, BEFORE).success
    conn.execute(SLOW_WRITES)
    home = Path(celery_env["DAGSTER_HOME"])
    log = tmp_path / "daemon.log"
    sampler = WriterSampler(data_url)
    with (
        DagsterInstance.get() as instance,
        running_workers(celery_env, tmp_path / "workers", names(celery_env, 3)),
    ):
        set_runs_and_writers(home, instance, runs=4, writers=2)
        with running_daemon(celery_env, log):
            sampler.start()
            backfill_id = launch_asset_backfill(
                instance, [FCT_ORDERS, *dbt_models.keys], FIRST, LAST
            )
            report = wait_for_backfill(instance, backfill_id, timeout_s=400)
            sampler.stopped.set()
        ids = run_ids(instance, backfill_id)
        assert report.daemon_status == "COMPLETED_SUCCESS", failed_run_report(instance, ids, log)
        executed = step_workers(instance, ids)
        recorded = [json.loads(instance.get_run_by_id(i).tags[WORKER_TAG])["pid"] for i in ids]
        started = [started_pid(instance, i) for i in ids]
    assert recorded == started, "a step on a worker recorded itself as the run's process"
    assert len(ids) == 4
    assert len(executed) == 8, executed  # two steps a run
    assert all(len(workers) == 1 for workers in executed.values()), executed  # each once
    assert len({worker for workers in executed.values() for worker in workers}) >= 2, executed
    sampler.join()
    assert sampler.samples > 100
    assert sampler.most == 2, f"{sampler.most} sessions wrote at once; the pool allows 2"
    celery_checks = check_results(instance)

    # The same days in one in-process run, on a copy of the same database.
    in_process_url = clone_database(cluster, DATA_TEMPLATE, "inprocess")
    with connect(in_process_url) as other:
        record_past_writes(other, "analytics.fct_orders", seconds=20)
    storage = settings.to_sqlalchemy(clone_database(cluster, DAGSTER_TEMPLATE, "inprocess"))
    with instance_for_test(overrides=storage_overrides(storage)) as in_process:
        in_process_postgres = PostgresResource(url=in_process_url)
        assert materialize_days(in_process_postgres, in_process, BEFORE).success
        result = materialize_days(
            in_process_postgres,
            in_process,
            FIRST,
            LAST,
            assets=(fct_orders, dbt_models),
        )
        assert result.success
        assert check_results(in_process) == celery_checks
    assert set(celery_checks.values()) == {"SUCCEEDED"}
    assert partition_checksums(in_process_url) == partition_checksums(data_url)
    assert len(partition_checksums(data_url)) == 3 * len(DAYS)
    assert kept_and_audited(in_process_url) == kept_and_audited(data_url)


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (a prefork worker's pool)."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def day_sums(conn, table_rows: str) -> dict[str, tuple]:
    return {
        str(day): (count, total)
        for day, count, total in conn.execute(
            f"SELECT order_day, count(*), sum(gross_amount) FROM ({table_rows}) t "
            "WHERE order_day BETWEEN %s AND %s GROUP BY 1",
            [FIRST, "2024-04-04"],
        )
    }


SOURCE_DAYS = (
    "SELECT (ordered_at AT TIME ZONE 'UTC')::date AS order_day, net_amount + tax_amount "
    "AS gross_amount FROM app.orders"
)


def test_a_worker_killed_in_the_middle_of_a_write_loses_and_duplicates_no_day(
    celery_env, data_url, conn, instance, postgres, tmp_path
):
    """Four days written once, then their source changed; the backfill's write of the first day
    waits on a lock an application holds when its worker is SIGKILLed. Its pool child dies with
    it, the step goes back to the queue and the other worker executes it again: every day ends
    new, once, the killed write left the day old and nothing in the audit, and the run
    succeeds."""
    last = "2024-04-04"
    assert materialize_days(postgres, instance, FIRST, last).success
    conn.execute(
        "UPDATE app.orders SET net_amount = net_amount + 1 WHERE ordered_at >= %s "
        "AND ordered_at < %s::date + 1",
        [FIRST, last],
    )
    old = day_sums(conn, "SELECT * FROM analytics.fct_orders")
    new = day_sums(conn, SOURCE_DAYS)
    assert old.keys() == new.keys() == set(DAYS[:4]) and all(old[d] != new[d] for d in old)
    log = tmp_path / "daemon.log"
    application = other_session(data_url, LOCK_FCT_ORDERS, 300)
    with (
        running_workers(celery_env, tmp_path / "workers", names(celery_env, 2)) as workers,
        running_daemon(celery_env, log),
    ):
        launched_at = conn.execute("SELECT clock_timestamp()").fetchone()[0]
        backfill_id = launch_asset_backfill(instance, [FCT_ORDERS], FIRST, last)
        wait_for(
            lambda: conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND application_name <> 'other_session'"
            ).fetchone()[0],
            120,
            "the backfill's write never waited on the application's lock",
            poll_s=0.05,
        )
        ((run_id, step), [holder]) = wait_for(
            lambda: list(step_workers(instance, run_ids(instance, backfill_id)).items()),
            30,
            "no worker recorded the step",
        )[0]
        killed = next(w for w in workers if holder.startswith(f"{w.name}@"))
        pool = children(killed.process.pid)
        assert pool, "a prefork worker executes its step in a child process"
        os.kill(killed.process.pid, signal.SIGKILL)
        wait_for(
            lambda: all(process_state(pid, time.time()) != "running" for pid in pool),
            10,
            "the pool child outlived its worker",
        )
        assert day_sums(conn, "SELECT * FROM analytics.fct_orders") == old  # old, under the lock
        again = wait_for(
            lambda: (
                len(found := step_workers(instance, [run_id]).get((run_id, step), [])) > 1 and found
            ),
            60,
            "the killed worker's step was not given to another worker",
        )
        application.release()
        wait_for_backfill(instance, backfill_id, timeout_s=300)
        backfill = instance.get_backfill(backfill_id)
        ids = run_ids(instance, backfill_id)
        assert backfill.status.value == "COMPLETED_SUCCESS", failed_run_report(instance, ids, log)
    assert again[0] == holder and not again[1].startswith(f"{killed.name}@")
    assert ids == [run_id]  # the step was executed again within its run
    assert day_sums(conn, "SELECT * FROM analytics.fct_orders") == new
    (duplicates,) = conn.execute(
        "SELECT count(*) - count(DISTINCT order_id) FROM analytics.fct_orders"
    ).fetchone()
    assert duplicates == 0
    written = conn.execute(
        "SELECT partition_key, status, count(*) FROM backfill_audit.backfill_runs "
        "WHERE started_at >= %s GROUP BY 1, 2 ORDER BY 1",
        [launched_at],
    ).fetchall()
    assert written == [(day, "succeeded", 1) for day in DAYS[:4]]


def run_ids(instance: DagsterInstance, backfill_id: str) -> list[str]:
    return [
        run.run_id for run in instance.get_runs(RunsFilter(tags={BACKFILL_ID_TAG: backfill_id}))
    ]


@pytest.mark.parametrize(
    ("variables", "said"),
    [
        ({}, "BACKFILL_EXECUTOR is not celery: runs execute their steps in their own process"),
        ({settings.EXECUTOR_ENV: "celry"}, "BACKFILL_EXECUTOR='celry' is not an executor"),
        (
            {settings.EXECUTOR_ENV: "celery", settings.CELERY_BROKER_ENV: "redis://h:6379/0"},
            "BACKFILL_CELERY_BROKER='redis://h:6379/0' is not a broker URL",
        ),
        (
            {settings.EXECUTOR_ENV: "celery", settings.CELERY_BROKER_ENV: "pyamqp:/u:secret@h//"},
            "BACKFILL_CELERY_BROKER='pyamqp:/u:***@h//' is not a broker URL",
        ),
        (
            {
                settings.EXECUTOR_ENV: "celery",
                settings.CELERY_BROKER_ENV: "pyamqp://u:secret@127.0.0.1:1//",
            },
            "the Celery broker pyamqp://u:***@127.0.0.1:1// (BACKFILL_CELERY_BROKER) is not "
            "reachable",
        ),
    ],
)
def test_a_worker_without_celery_settings_or_broker_is_refused_saying_what_to_set(
    variables, said, monkeypatch, tmp_path, capsys
):
    for name in (settings.EXECUTOR_ENV, settings.CELERY_BROKER_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["worker", "--name", "w1"]) == 2
    err = capsys.readouterr().err
    assert said in err and "secret" not in err
    assert list(tmp_path.iterdir()) == []  # no folder made, nothing started


def test_launch_warns_when_no_worker_listens_on_the_queue(celery_env, capsys):
    """The runs would wait for a worker, STARTED: the launch says so (on stderr, so that
    ``--json`` stays JSON) and where to start one."""
    args = ["launch", "--select", "analytics/fct_orders", "--from", FIRST, "--to", FIRST, "--json"]
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["assets"] == ["analytics/fct_orders"]
    assert f"no Celery worker listens on queue {celery_env[settings.CELERY_QUEUE_ENV]!r}" in err


@pytest.mark.parametrize("paused", [False, True], ids=["writing", "paused"])
def test_cancel_stops_a_step_running_on_a_worker_before_its_next_partition(
    paused, celery_env, conn, instance, postgres, tmp_path, capsys
):
    """A cancel is a signal to the run's process; dagster-celery then revokes only the steps
    not started. The step on the worker reads its run's status between partitions, and while a
    pause holds it, and stops: of eight 2-second writes, the cancel given after the first (or
    during a pause that follows it) leaves most unwritten (a paused one: no more)."""
    assert materialize_days(postgres, instance, BEFORE).success
    conn.execute(SLOW_WRITES)
    last = DAYS[7]
    with (
        running_workers(celery_env, tmp_path / "workers", names(celery_env, 1)),
        running_daemon(celery_env, tmp_path / "daemon.log"),
    ):
        launched_at = conn.execute("SELECT clock_timestamp()").fetchone()[0]
        backfill_id = launch_asset_backfill(instance, [FCT_ORDERS], FIRST, last)
        written = (
            "SELECT count(*) FROM backfill_audit.backfill_runs WHERE started_at >= %s "
            "AND status = 'succeeded'"
        )
        wait_for(
            lambda: conn.execute(written, [launched_at]).fetchone()[0],
            120,
            "the backfill never wrote a partition",
        )
        if paused:
            assert cli.main(["pause", backfill_id]) == 0
            before = wait_for(lambda: settled(conn, written, [launched_at]), 30, "still writing")
        assert cli.main(["cancel", backfill_id]) == 0
        canceled_at = time.monotonic()
        wait_for_backfill(instance, backfill_id, timeout_s=120)
        took = time.monotonic() - canceled_at
        (run,) = instance.get_runs(RunsFilter(tags={BACKFILL_ID_TAG: backfill_id}))
    assert run.status.value == "CANCELED"
    count = conn.execute(written, [launched_at]).fetchone()[0]
    # Unstopped, the step writes all eight (tested): 2 s each, checked at most once a second.
    assert 1 <= count <= 5, f"{count} of 8 partitions written after the cancel"
    assert took < 60, f"the run ended {took:.0f} s after the cancel"
    if paused:
        assert count == before


def settled(conn, query: str, params: list, quiet_s: float = 3.0) -> int | None:
    """``query``'s count once it has not changed for ``quiet_s`` (the writer waits in a
    pause), else None."""
    first = conn.execute(query, params).fetchone()[0]
    time.sleep(quiet_s)
    return first if conn.execute(query, params).fetchone()[0] == first else None

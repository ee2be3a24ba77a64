"""A run's dbt commands run inside the run's process (``defs/dbt_in_process.py``).

The same build through dagster-dbt's resource, once in process and once as dbt's own child
process (``BACKFILL_DBT_IN_PROCESS=0``): dbt's events come from this process only in the first,
and both leave the same rows and the same node results. Terminating an in-process build that waits
on a lock cancels its query at once, as Ctrl-C does to dbt's CLI.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time

import pytest
from support import REGISTRY, dbt_resource, fct_orders, materialize_days, other_session, wait_for

from backfill_assets.core.registry import DEFAULT_TABLES_DIR, load_registry
from backfill_assets.core.settings import DBT_IN_PROCESS_ENV
from backfill_assets.defs import dbt_in_process
from backfill_assets.defs.dbt import dbt_process_env
from backfill_assets.tooling import cli

DAYS = ["2024-04-01", "2024-04-02"]
WINDOW = ["--event-time-start", "2024-04-01", "--event-time-end", "2024-04-03"]
MARTS = "analytics.daily_revenue", "analytics.customer_daily_orders"


def mart_rows(conn) -> dict[str, list[tuple]]:
    return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in MARTS}


def build(postgres, *args: str):
    """``dbt build`` of the marts over DAYS as a run's dbt step starts it; its events."""
    with dbt_process_env(postgres, REGISTRY):
        invocation = dbt_resource.cli(["build", *WINDOW, *args], raise_on_error=False)
        events = list(invocation.stream_raw_events())
        invocation.wait()
    return invocation, events


def node_results(events) -> list[tuple[str, str]]:
    """(unique_id, status) of each node dbt finished."""
    nodes = [e.raw_event["data"]["node_info"] for e in events if is_finished(e)]
    return sorted((node["unique_id"], node["node_status"]) for node in nodes)


def is_finished(event) -> bool:
    return event.raw_event["info"]["name"] in ("LogModelResult", "LogTestResult")


def test_a_dbt_build_runs_in_the_calling_process_with_the_results_of_dbts_own_process(
    postgres, instance, conn, monkeypatch
):
    assert materialize_days(postgres, instance, DAYS[0], DAYS[-1], assets=[fct_orders]).success

    inside, inside_events = build(postgres)
    inside_rows = mart_rows(conn)
    monkeypatch.setenv(DBT_IN_PROCESS_ENV, "0")
    child, child_events = build(postgres)

    assert isinstance(inside.process, dbt_in_process.InProcessDbt)
    assert isinstance(child.process, subprocess.Popen)
    assert {e.raw_event["info"]["pid"] for e in inside_events} == {os.getpid()}
    assert os.getpid() not in {e.raw_event["info"]["pid"] for e in child_events}
    assert inside.process.returncode == child.process.returncode == 0
    assert node_results(inside_events) == node_results(child_events)
    assert len(node_results(inside_events)) > 2, "models and their tests ran"
    assert inside_rows["analytics.daily_revenue"], "the marts have the two days"
    assert mart_rows(conn) == inside_rows
    assert inside.get_artifact("run_results.json")["results"]


def test_an_in_process_build_exits_as_dbts_cli_1_for_a_failed_node_2_for_a_bad_command(
    postgres, instance, conn
):
    assert materialize_days(postgres, instance, DAYS[0], assets=[fct_orders]).success
    conn.execute("ALTER TABLE analytics.fct_orders RENAME COLUMN net_amount TO net")
    try:
        failed, failed_events = build(postgres)
    finally:
        conn.execute("ALTER TABLE analytics.fct_orders RENAME COLUMN net TO net_amount")
    broken, _ = build(postgres, "--no-such-flag")

    assert failed.process.returncode == 1
    assert ("model.shop.daily_revenue", "error") in node_results(failed_events)
    assert "net_amount" in str(failed.get_error())
    assert broken.process.returncode == 2
    assert "--no-such-flag" in str(broken.get_error())


def lock_waiters(conn) -> int:
    """Sessions of this database waiting for a lock (dbt's, behind the holder's)."""
    return conn.execute(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    ).fetchone()[0]


def revenue_versions(conn) -> dict[str, tuple]:
    """Each day of daily_revenue: its row and the transaction that wrote it."""
    rows = conn.execute(
        "SELECT order_day::text, xmin::text, daily_revenue::text FROM analytics.daily_revenue"
    ).fetchall()
    return {day: (xmin, row) for day, xmin, row in rows}


THREE_DAYS = ["--event-time-start", "2024-04-01", "--event-time-end", "2024-04-04"]
HOLDS = {
    "first-batch": "BEGIN; LOCK TABLE analytics.daily_revenue",
    "second-batch": "BEGIN; SELECT * FROM analytics.daily_revenue "
    "WHERE order_day = '2024-04-02' FOR UPDATE",
}


@pytest.mark.parametrize(
    ("held", "sig"), [("first-batch", signal.SIGINT), ("second-batch", signal.SIGTERM)]
)
def test_an_interrupted_in_process_build_stops_at_once_and_starts_nothing_more(
    postgres, instance, conn, data_url, tmp_path, held, sig
):
    assert materialize_days(postgres, instance, "2024-04-01", "2024-04-03").success
    with dbt_process_env(postgres, REGISTRY):
        dbt_resource.cli(["build", *THREE_DAYS]).wait()
    before = revenue_versions(conn)
    # dbt's statements would wait a minute for the lock another session holds.
    folder = tmp_path / "tables"
    shutil.copytree(DEFAULT_TABLES_DIR, folder)
    for declaration in folder.glob("*.yaml"):
        declaration.write_text(declaration.read_text() + "timeouts: {lock: 60s}\n")
    holder = other_session(data_url, HOLDS[held], 120)
    # As the run's dbt step: the environment dbt was given stays until the build ends.
    with dbt_process_env(postgres, load_registry([folder])):
        invocation = dbt_resource.cli(["build", *THREE_DAYS], raise_on_error=False)
        # dagster-dbt reads dbt's log as it comes (a full pipe would stop dbt).
        reader = threading.Thread(target=lambda: list(invocation.stream_raw_events()))
        reader.start()
        try:
            wait_for(lambda: lock_waiters(conn), 60, "dbt never reached the held lock")
            interrupted = time.monotonic()
            invocation.process.send_signal(sig)
            code = invocation.process.wait(timeout=30)
            ended_in = time.monotonic() - interrupted
            reader.join(timeout=30)
        finally:
            holder.release()

    assert code != 0
    assert ended_in < 10, f"the build ended {ended_in:.1f}s after the interrupt"
    assert lock_waiters(conn) == 0
    after = revenue_versions(conn)
    assert after["2024-04-02"] == before["2024-04-02"], "the interrupted day keeps its row"
    assert after["2024-04-03"] == before["2024-04-03"], "no batch starts after the interrupt"
    if held == "first-batch":
        assert after == before


def test_a_dbt_command_while_another_runs_in_process_gets_a_process_of_its_own(
    postgres, instance, monkeypatch
):
    assert materialize_days(postgres, instance, DAYS[0], assets=[fct_orders]).success
    monkeypatch.setattr(dbt_in_process, "_ONE_AT_A_TIME", threading.Lock())
    dbt_in_process._ONE_AT_A_TIME.acquire()  # as while another in-process build runs

    busy, events = build(postgres)

    assert isinstance(busy.process, subprocess.Popen)
    assert busy.process.returncode == 0 and node_results(events)


def test_a_bad_in_process_setting_is_refused_naming_it_before_anything_starts(monkeypatch, capsys):
    monkeypatch.setenv(DBT_IN_PROCESS_ENV, "yes")
    monkeypatch.setenv("BACKFILL_PG_URL", "postgresql://nobody@127.0.0.1:1/none")

    assert cli.main(["daemon"]) == 2

    err = capsys.readouterr().err.strip()
    assert f"{DBT_IN_PROCESS_ENV}='yes' is neither 1 nor 0" in err and len(err.splitlines()) == 1

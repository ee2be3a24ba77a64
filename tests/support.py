"""Helpers shared by the tests: real materializations, and reading back what they recorded."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import psycopg
from dagster import AssetCheckKey, AssetKey, DagsterInstance, materialize
from psycopg.rows import dict_row

from backfill_assets.core import settings
from backfill_assets.core.audit import ensure_audit_table
from backfill_assets.core.fingerprint import Fingerprint, partition_fingerprint
from backfill_assets.core.registry import DEFAULT_TABLES_DIR, load_registry
from backfill_assets.core.tables import TableSpec
from backfill_assets.defs.dagster_internals import PartitionKeyFilter
from backfill_assets.defs.dbt import dbt_model_assets, installed_dbt
from backfill_assets.defs.rollback import rollback_job
from backfill_assets.defs.table_assets import table_asset
from backfill_assets.project import dbt_env

# The demo's declarations (tables/), whatever BACKFILL_TABLES_PATH says.
REGISTRY = load_registry([DEFAULT_TABLES_DIR])
FCT_ORDERS = REGISTRY.table("analytics.fct_orders")
FCT_ORDERS_KEY = AssetKey(["analytics", "fct_orders"])
fct_orders = table_asset(FCT_ORDERS)
(dbt_models,) = dbt_model_assets(REGISTRY)
# The demo's dbt project (BACKFILL_DBT_PROJECT is unset while the tests import this module).
dbt_resource = installed_dbt()
rollback_backfill = rollback_job(REGISTRY)


def materialize_days(
    postgres,
    instance: DagsterInstance,
    first: str,
    last: str | None = None,
    *,
    assets: Sequence = (fct_orders,),
    tags: Mapping[str, str] | None = None,
):
    """One run over ``first``..``last`` (inclusive), as a backfill run of that range would be."""
    range_tags = {
        "dagster/asset_partition_range_start": first,
        "dagster/asset_partition_range_end": last or first,
    }
    return materialize(
        list(assets),
        resources={"postgres": postgres, "dbt": dbt_resource},
        instance=instance,
        tags={**range_tags, **(tags or {})},
        raise_on_error=False,
    )


def fingerprints(conn: psycopg.Connection, keys: Sequence[str]) -> dict[str, Fingerprint]:
    return {
        key: partition_fingerprint(conn, FCT_ORDERS, FCT_ORDERS.partitioning.window(key))
        for key in keys
    }


def latest_check(
    instance: DagsterInstance, check_name: str, partition: str, asset_key: AssetKey = FCT_ORDERS_KEY
):
    """The latest execution of a check for one partition, read the way the UI reads it."""
    key = AssetCheckKey(asset_key, check_name)
    records = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [key], partition_filter=PartitionKeyFilter(key=partition)
    )
    return records.get(key)


def audit_rows(conn: psycopg.Connection, **where: object) -> list[dict]:
    conditions = " AND ".join(f"{column} = %({column})s" for column in where) or "true"
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            f"SELECT * FROM backfill_audit.backfill_runs WHERE {conditions} ORDER BY id", where
        ).fetchall()


def step_failure_message(result) -> str:
    return "\n".join(
        str(event.event_specific_data.error) for event in result.all_events if event.is_step_failure
    )


def failed_run_report(instance: DagsterInstance, run_ids, daemon_log) -> str:
    """Why a daemon-executed run failed: its step and run failure messages, and the daemon's tail.

    An end-to-end test that only says "not every partition materialized" is useless in CI; this
    puts the real error in the assertion message.
    """
    lines = []
    for run_id in run_ids:
        run = instance.get_run_by_id(run_id)
        if run is None or run.status.value == "SUCCESS":
            continue
        lines.append(f"run {run_id} {run.status.value} tags={dict(run.tags)}")
        for record in instance.all_logs(run_id):
            event = record.dagster_event
            if event is not None and (event.is_step_failure or event.is_run_failure):
                lines.append(f"  {event.event_type_value}: {event.message}")
                error = getattr(event.event_specific_data, "error", None)
                if error is not None:
                    lines.append(f"  {error.to_string()}"[-2000:])
            elif record.level >= 40 and record.user_message:
                lines.append(f"  log: {record.user_message[-500:]}")
    lines.append(
        f"daemon log tail:\n{daemon_log.read_text()[-2000:]}" if daemon_log.exists() else ""
    )
    return "\n".join(lines)


def record_past_writes(conn, table: str, seconds: float, count: int = 20) -> None:
    """Audit rows as earlier backfills leave them: ``count`` writes of ``seconds`` each."""
    ensure_audit_table(conn)
    conn.execute(
        "INSERT INTO backfill_audit.backfill_runs (asset_key, table_name, partition_key, strategy,"
        " code_version, sql_hash, launched_by, started_at, ended_at, status)"
        " SELECT 'a', %s, '2024-01-01', 'delete_insert', 'c', 'h', 'tester', now(),"
        " now() + make_interval(secs => %s), 'succeeded' FROM generate_series(1, %s)",
        [table, seconds, count],
    )


def database_checksum(conn) -> dict[str, tuple[int, object]]:
    """Rows and an order-independent hash of every table of the database."""
    tables = conn.execute(
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n "
        "ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') "
        "AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')"
    ).fetchall()
    return {
        name: conn.execute(
            f"SELECT count(*), coalesce(sum(hashtextextended(t::text, 0)), 0) FROM {name} AS t"
        ).fetchone()
        for (name,) in tables
    }


def wait_for(condition, timeout_s: float, what: str, *, poll_s: float = 0.1):
    """Poll ``condition`` until it returns something true, and return that; fail saying ``what``
    did not happen within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (found := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(poll_s)
    return found


class OtherSession(threading.Thread):
    """A session holding its transaction open in a thread; ``release`` ends it early."""

    def __init__(self, url: str, statement: str, seconds: float) -> None:
        super().__init__(daemon=True)
        self.url, self.statement, self.seconds = url, statement, seconds
        self.opened, self.released = threading.Event(), threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.url, application_name="other_session") as other:
            other.execute(self.statement)  # the transaction stays open until the block ends
            self.opened.set()
            self.released.wait(self.seconds)

    def release(self) -> None:
        self.released.set()
        self.join()


def other_session(url: str, statement: str, seconds: float) -> OtherSession:
    """Another session (an application, a maintenance job) that runs ``statement`` and keeps its
    transaction, with whatever locks it took, open for ``seconds`` (or until released); returns
    once it is open."""
    session = OtherSession(url, statement, seconds)
    session.start()
    assert session.opened.wait(30)
    return session


@contextmanager
def running_webserver(env: dict[str, str], log_path) -> Iterator[str]:
    """``dagster-webserver`` on a free port of 127.0.0.1 for the block; yields its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = ["dagster-webserver", "-w", str(settings.WORKSPACE_FILE), "-h", "127.0.0.1"]
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [*command, "-p", str(port)],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/server_info", timeout=5):
                    break
            except OSError:
                assert process.poll() is None, log_path.read_text()[-2000:]
                assert time.monotonic() < deadline, "the webserver did not start"
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def plain_dbt_env(data_url: str) -> dict[str, str]:
    """What a person running dbt by hand against ``data_url`` has: the profile's variables."""
    return {
        **os.environ,
        **settings.connection_parts(data_url).as_dbt_env(),
        **dbt_env(),
    }


def dagster_job_backfill(
    env: Mapping[str, str], job: str, *args: str
) -> subprocess.CompletedProcess:
    """Dagster's stock ``dagster job backfill -j JOB ARGS --noprompt``, as a user types it."""
    command = ["dagster", "job", "backfill", "-w", str(settings.WORKSPACE_FILE), "-j", job]
    return subprocess.run(
        [*command, *args, "--noprompt"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )


def launched_job_backfill(completed: subprocess.CompletedProcess) -> str:
    """The id ``dagster job backfill`` printed, or a failure with what it printed."""
    marker = "Launched backfill job `"
    assert completed.returncode == 0 and marker in completed.stdout, (
        completed.stdout[-2000:],
        completed.stderr[-2000:],
    )
    return completed.stdout.split(marker, 1)[1].split("`", 1)[0]


# A table the demo does not have: order lines shipped per day, keyed on (order_id, line_no).
SHIPPED_LINES_SOURCE = """
CREATE SCHEMA shop;
CREATE TABLE shop.order_lines (
    order_id bigint NOT NULL, line_no int NOT NULL, shipped_on date NOT NULL,
    amount numeric(12,2) NOT NULL, PRIMARY KEY (order_id, line_no));
INSERT INTO shop.order_lines
SELECT 1000 + o, l, DATE '2024-03-01' + (o % 3), (o * 10 + l)::numeric
FROM generate_series(0, 59) AS o, generate_series(1, 3) AS l;
"""


def declare_shipped_lines(
    folder: Path, strategy: str = "delete_insert", extra: str = ""
) -> TableSpec:
    """``sales.shipped_lines``'s two files in ``folder``, as a user writes them, for
    ``strategy`` (``extra``: more YAML, e.g. ``timeouts: ...``); its spec. The source is
    ``SHIPPED_LINES_SOURCE``: 60 orders of 3 lines on 2024-03-01..03."""
    folder.mkdir(exist_ok=True)
    (folder / "shipped_lines.sql").write_text(
        "SELECT order_id, line_no, shipped_on, amount FROM shop.order_lines\n"
        "WHERE shipped_on >= %(start)s AND shipped_on < %(end)s\n"
    )
    (folder / "shipped_lines.yaml").write_text(
        textwrap.dedent(
            f"""\
            table: sales.shipped_lines
            strategy: {strategy}
            upstream: [shop.order_lines]
            partitions: {{column: shipped_on, every: day, start: 2024-01-01, end: 2025-01-01}}
            columns:
              order_id: bigint not null
              line_no: integer not null
              shipped_on: date not null
              amount: numeric(12,2) not null
            unique_key: [order_id, line_no]
            measures: [amount]
            """
        )
        + extra
    )
    return load_registry([folder]).table("sales.shipped_lines")

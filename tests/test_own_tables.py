"""A user's own table beside the demo's: one YAML declaration and one SQL file, nothing else.

The table (``tests/own_tables/shipped_lines.yaml``) is unlike the demo's orders on purpose: a
composite key, another date column, dates in the 1990s, monthly partitions.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, DagsterRunStatus, RunsFilter, materialize
from support import FCT_ORDERS, failed_run_report, latest_check

from backfill_assets.core import settings
from backfill_assets.core.contract import ContractError
from backfill_assets.core.fingerprint import partition_fingerprint
from backfill_assets.core.partitioning import UnknownPartitionError
from backfill_assets.core.registry import DEFAULT_TABLES_DIR, TABLES_PATH_ENV, load_registry
from backfill_assets.core.tables import ensure_table
from backfill_assets.core.writer import replace_partition
from backfill_assets.defs.checks import CHECKS
from backfill_assets.defs.dagster_internals import AssetCheckExecutionRecordStatus
from backfill_assets.defs.definitions import build_definitions
from backfill_assets.defs.table_assets import table_asset
from backfill_assets.tooling import cli
from backfill_assets.tooling.launch import launch_asset_backfill, running_daemon, wait_for_backfill

OWN_TABLES = Path(__file__).parent / "own_tables"
KEY = AssetKey(["reporting", "shipped_lines"])
MONTHS = ["1995-03-01", "1995-04-01", "1995-05-01", "1995-06-01", "1995-07-01", "1995-08-01"]
RECOMPUTE = """
SELECT order_no, line_no, ship_date, upper(ship_mode), quantity,
       round(extended_price * (1 - discount), 2)
FROM legacy.order_lines WHERE ship_date >= '1995-03-01' AND ship_date < '1995-09-01'
"""


@pytest.fixture
def own_tables(monkeypatch, conn) -> list[Path]:
    """The demo's tables/ and the test's own folder, with the own table's source filled."""
    conn.execute((OWN_TABLES / "order_lines_source.sql").read_text())
    dirs = [DEFAULT_TABLES_DIR, OWN_TABLES]
    monkeypatch.setenv(TABLES_PATH_ENV, ":".join(str(d) for d in dirs))
    return dirs


def test_an_own_monthly_table_is_backfilled_through_the_daemon_beside_the_demo_table(
    own_tables, dagster_env, conn, tmp_path
):
    registry = load_registry(own_tables)
    ensure_table(conn, FCT_ORDERS)
    demo_day = FCT_ORDERS.partitioning.window("2024-04-01")
    replace_partition(conn, FCT_ORDERS, demo_day)
    demo_before = partition_fingerprint(conn, FCT_ORDERS, demo_day)
    daemon_log = tmp_path / "daemon.log"

    with DagsterInstance.get() as instance, running_daemon(dagster_env, daemon_log):
        backfill_id = launch_asset_backfill(
            instance,
            [KEY],
            MONTHS[0],
            MONTHS[-1],
            definitions=build_definitions(registry, check_sql=False),
        )
        progress = wait_for_backfill(instance, backfill_id, timeout_s=600)
        assert set(progress.runs.values()) == {DagsterRunStatus.SUCCESS}, failed_run_report(
            instance, progress.runs, daemon_log
        )
        assert instance.get_materialized_partitions(KEY) == set(MONTHS)
        for month in MONTHS:
            for check in CHECKS:
                record = latest_check(instance, check.name, month, asset_key=KEY)
                assert record.status == AssetCheckExecutionRecordStatus.SUCCEEDED, (check, month)
                assert record.partition == month and record.run_id in progress.runs
        runs = instance.get_runs(filters=RunsFilter(tags={"dagster/backfill": backfill_id}))
        assert len(runs) == 1, "six months fit one run of the backfill policy"

    written, only_written, only_recomputed = conn.execute(
        f"""SELECT (SELECT count(*) FROM reporting.shipped_lines),
                   (SELECT count(*) FROM (SELECT * FROM reporting.shipped_lines
                                          EXCEPT ALL ({RECOMPUTE})) AS a),
                   (SELECT count(*) FROM (({RECOMPUTE})
                                          EXCEPT ALL SELECT * FROM reporting.shipped_lines) AS b)"""
    ).fetchone()
    assert written > 0 and only_written == 0 and only_recomputed == 0
    assert partition_fingerprint(conn, FCT_ORDERS, demo_day) == demo_before
    with DagsterInstance.get() as instance:
        assert instance.get_materialized_partitions(AssetKey(["analytics", "fct_orders"])) == set()


def test_keys_outside_the_own_tables_range_are_refused_with_that_range(own_tables, capsys):
    registry = load_registry(own_tables)
    table = registry.table("reporting.shipped_lines")
    for key in ("1994-12-01", "1997-01-01", "1995-03-15", "1995-13-01"):
        with pytest.raises(UnknownPartitionError, match="1995-01-01 to 1996-12-01"):
            table.partitioning.window(key)
    definitions = build_definitions(registry, check_sql=False)
    with pytest.raises(UnknownPartitionError, match="1995-01-01 to 1996-12-01"):
        launch_asset_backfill(None, [KEY], "1994-11-01", "1995-02-01", definitions=definitions)
    # The demo table keeps its own range.
    with pytest.raises(UnknownPartitionError, match="2024-01-01 to 2024-12-31"):
        registry.table("analytics.fct_orders").partitioning.window("1995-03-01")

    args = ["rollback", "--table", "reporting.shipped_lines", "--partition", "1994-12-01"]
    assert cli.main(args) == 2
    assert "monthly partitions from 1995-01-01 to 1996-12-01" in capsys.readouterr().err
    assert cli.main(["rollback", "--partition", "1995-03-01"]) == 2
    assert "name a table" in capsys.readouterr().err


def test_dagster_job_backfill_refuses_months_outside_the_own_table_and_queues_nothing(
    own_tables, dagster_env
):
    command = ["dagster", "job", "backfill", "-w", str(settings.WORKSPACE_FILE)]
    command += [
        "-j",
        "backfill__reporting__shipped_lines",
        "--from",
        "1994-11-01",
        "--to",
        "1995-02-01",
    ]
    completed = subprocess.run(
        [*command, "--noprompt"],
        env={**dagster_env, TABLES_PATH_ENV: os.environ[TABLES_PATH_ENV]},
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode != 0
    assert "1994-11-01" in completed.stderr
    with DagsterInstance.get() as instance:
        assert instance.get_backfills() == []


def _table_with_sql(tmp_path: Path, edit) -> Path:
    folder = tmp_path / "tables"
    folder.mkdir()
    shutil.copy(OWN_TABLES / "shipped_lines.yaml", folder)
    sql = (OWN_TABLES / "shipped_lines.sql").read_text()
    (folder / "shipped_lines.sql").write_text(edit(sql))
    return folder


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (
            lambda sql: sql.replace("       upper(l.ship_mode) AS ship_mode,\n", ""),
            "missing ship_mode",
        ),
        (lambda sql: sql.replace("l.quantity,", "l.quantity, l.discount,"), "extra discount"),
    ],
    ids=["missing-column", "extra-column"],
)
def test_a_table_whose_sql_does_not_yield_its_columns_fails_loading_and_writes_nothing(
    tmp_path, monkeypatch, data_url, conn, edit, problem
):
    conn.execute((OWN_TABLES / "order_lines_source.sql").read_text())
    folder = _table_with_sql(tmp_path, edit)
    monkeypatch.setenv(settings.DATA_URL_ENV, data_url)
    relations = "SELECT count(*) FROM pg_class"
    before = conn.execute(relations).fetchone()

    with pytest.raises(ContractError) as error:
        build_definitions(load_registry([folder]))

    message = str(error.value)
    assert "reporting.shipped_lines" in message and str(folder / "shipped_lines.sql") in message
    assert problem in message
    assert conn.execute(relations).fetchone() == before
    assert conn.execute("SELECT to_regnamespace('reporting')").fetchone() == (None,)


def test_without_the_demo_tables_the_demo_marts_are_left_out_and_commands_work(
    monkeypatch, conn, dagster_env, capsys
):
    conn.execute((OWN_TABLES / "order_lines_source.sql").read_text())
    monkeypatch.setenv(TABLES_PATH_ENV, str(OWN_TABLES))  # tables/ left out, as README says
    graph = build_definitions(load_registry(), check_sql=False).resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert "reporting/shipped_lines" in keys
    assert not [k for k in keys if k.startswith("analytics/")], "the demo's marts read fct_orders"

    span = ["--from", "1995-03-01", "--to", "1995-04-01"]
    assert cli.main(["plan", "--select", "reporting/shipped_lines", *span]) == 0
    assert "reporting.shipped_lines: 2 partitions" in capsys.readouterr().out


def test_a_query_ending_in_a_comment_writes_its_partition(tmp_path, monkeypatch, data_url, conn):
    conn.execute((OWN_TABLES / "order_lines_source.sql").read_text())
    folder = _table_with_sql(tmp_path, lambda sql: sql.rstrip().rstrip(";") + "\n-- v2 reviewed")
    monkeypatch.setenv(settings.DATA_URL_ENV, data_url)
    registry = load_registry([DEFAULT_TABLES_DIR, folder])
    build_definitions(registry)  # the contract check runs the query
    table = registry.by_asset_path()[("reporting", "shipped_lines")]
    ensure_table(conn, table)

    result = replace_partition(conn, table, table.partitioning.window("1995-03-01"))

    expected = conn.execute(
        "SELECT count(*) FROM legacy.order_lines "
        "WHERE ship_date >= '1995-03-01' AND ship_date < '1995-04-01'"
    ).fetchone()[0]
    assert result.rows_written == expected > 0


@pytest.mark.parametrize("bad_type", ["bigit not null", "bigint not nul"])
def test_a_column_type_postgresql_does_not_know_fails_loading(
    tmp_path, monkeypatch, data_url, conn, bad_type
):
    conn.execute((OWN_TABLES / "order_lines_source.sql").read_text())
    folder = _table_with_sql(tmp_path, lambda sql: sql)
    declaration = folder / "shipped_lines.yaml"
    declaration.write_text(
        declaration.read_text().replace("order_no: bigint not null", f"order_no: {bad_type}")
    )
    monkeypatch.setenv(settings.DATA_URL_ENV, data_url)

    with pytest.raises(ContractError, match="column types PostgreSQL does not know: order_no"):
        build_definitions(load_registry([folder]))


def test_a_measure_postgresql_cannot_sum_fails_loading_naming_it(
    tmp_path, monkeypatch, data_url, conn
):
    conn.execute((OWN_TABLES / "order_lines_source.sql").read_text())
    folder = _table_with_sql(tmp_path, lambda sql: sql)
    declaration = folder / "shipped_lines.yaml"
    declaration.write_text(
        declaration.read_text().replace(
            "measures: [quantity, net_price]", "measures: [quantity, ship_mode]"
        )
    )
    monkeypatch.setenv(settings.DATA_URL_ENV, data_url)

    with pytest.raises(ContractError, match=r"measures ship_mode \(text\) cannot be summed"):
        build_definitions(load_registry([folder]))


def test_the_tables_command_reports_each_contract_and_fails_on_a_broken_one(
    tmp_path, monkeypatch, data_url, conn, capsys
):
    conn.execute((OWN_TABLES / "order_lines_source.sql").read_text())
    folder = _table_with_sql(tmp_path, lambda sql: sql.replace("%(end)s", "date '1999-01-01'"))
    monkeypatch.setenv(settings.DATA_URL_ENV, data_url)
    monkeypatch.setenv(TABLES_PATH_ENV, f"{DEFAULT_TABLES_DIR}:{folder}")

    assert cli.main(["tables"]) == 1
    out = capsys.readouterr().out
    assert "analytics.fct_orders" in out and "contract: ok" in out
    assert "contract: error: table reporting.shipped_lines" in out and "does not use %(end)s" in out


def test_dagster_fails_to_load_the_code_location_with_the_contract_message(
    tmp_path, dagster_env, conn
):
    conn.execute((OWN_TABLES / "order_lines_source.sql").read_text())
    folder = _table_with_sql(tmp_path, lambda sql: sql.replace("l.line_no,", "l.line_no AS line,"))
    completed = subprocess.run(
        ["dagster", "definitions", "validate", "-w", str(settings.WORKSPACE_FILE)],
        env={**dagster_env, TABLES_PATH_ENV: str(folder)},
        capture_output=True,
        text=True,
        check=False,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode != 0
    assert "does not yield the declared columns: missing line_no; extra line" in output


def test_a_declaration_that_gained_a_column_asks_for_the_alter_then_writes_it(
    tmp_path, postgres, instance, conn
):
    conn.execute((OWN_TABLES / "order_lines_source.sql").read_text())
    before = load_registry([OWN_TABLES]).table("reporting.shipped_lines")
    assert materialize(
        [table_asset(before)], partition_key="1995-03-01", **_run(postgres, instance)
    ).success
    written = partition_fingerprint(conn, before, before.partitioning.window("1995-03-01"))

    folder = _table_with_sql(
        tmp_path, lambda sql: sql.replace("l.quantity,", "l.quantity, l.discount,")
    )
    declaration = folder / "shipped_lines.yaml"
    declaration.write_text(
        declaration.read_text().replace("unique_key:", "  discount: numeric(4,2)\nunique_key:", 1)
    )
    after = load_registry([folder]).table("reporting.shipped_lines")
    refused = materialize(
        [table_asset(after)], partition_key="1995-03-01", **_run(postgres, instance)
    )

    assert not refused.success
    alter = "ALTER TABLE reporting.shipped_lines ADD COLUMN discount numeric(4,2)"
    assert alter in str(refused.all_events)
    assert partition_fingerprint(conn, before, before.partitioning.window("1995-03-01")) == written

    conn.execute(alter)
    assert materialize(
        [table_asset(after)], partition_key="1995-03-01", **_run(postgres, instance)
    ).success
    kept = conn.execute(
        "SELECT count(*), count(discount) FROM backfill_snapshots.reporting__shipped_lines"
    ).fetchone()
    assert kept[0] == written.rows and kept[1] == 0, "the snapshot kept the rows before the column"
    assert conn.execute(
        "SELECT count(*) FROM reporting.shipped_lines WHERE discount IS NULL"
    ).fetchone() == (0,)


def _run(postgres, instance) -> dict:
    return {"resources": {"postgres": postgres}, "instance": instance, "raise_on_error": False}

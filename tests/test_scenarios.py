"""The backfill scenarios of docs/scenarios.md, end to end on the demo shop through the daemon,
as a user follows them: the same commands, the same declarations."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from dagster import DagsterInstance
from psycopg.rows import dict_row
from support import (
    FCT_ORDERS,
    audit_rows,
    failed_run_report,
    fingerprints,
    latest_check,
    wait_for,
)

from backfill_assets.core.params import LAUNCHED_BY
from backfill_assets.core.registry import DEFAULT_TABLES_DIR, TABLES_PATH_ENV
from backfill_assets.core.settings import (
    DBT_PROJECT_ENV,
    DEFAULT_DBT_PROJECT_DIR,
    REPO_ROOT,
    WORKSPACE_FILE,
)
from backfill_assets.core.tables import ensure_table
from backfill_assets.core.writer import replace_partition
from backfill_assets.defs.dagster_internals import BulkActionsFilter
from backfill_assets.tooling import cli
from backfill_assets.tooling.launch import running_daemon, wait_for_backfill

NEW_COLUMN = REPO_ROOT / "scenarios" / "new_not_null_column"


def test_a_new_not_null_column_is_filled_for_all_history_then_made_not_null(
    conn, dagster_env, monkeypatch, tmp_path, capsys
):
    # Step 1 of the scenario: the schema change, a nullable column (instant).
    conn.execute("ALTER TABLE app.orders ADD COLUMN total_price numeric(12, 2)")
    # The application already writes the column for new orders: those values stay.
    conn.execute("UPDATE app.orders SET total_price = 0.01 WHERE order_id % 97 = 0")
    written = conn.execute("SELECT count(*) FROM app.orders WHERE total_price = 0.01").fetchone()
    tables = f"{DEFAULT_TABLES_DIR}:{NEW_COLUMN}"
    monkeypatch.setenv(TABLES_PATH_ENV, tables)
    why = "SHOP-42: total_price for history"

    with running_daemon({**dagster_env, TABLES_PATH_ENV: tables}, tmp_path / "daemon.log"):
        span = ["--from", "2024-01-01", "--to", "2024-12-01"]
        code = cli.main(["launch", "--select", "app/orders", *span, "--reason", why, "--wait"])
    out = capsys.readouterr().out
    if code != 0:
        with DagsterInstance.get() as instance:
            runs = [r.dagster_run.run_id for r in instance.get_run_records()]
            raise AssertionError(out + failed_run_report(instance, runs, tmp_path / "daemon.log"))

    missing, wrong = conn.execute(
        "SELECT count(*) FILTER (WHERE total_price IS NULL), count(*) FILTER (WHERE total_price "
        "<> net_amount + tax_amount AND total_price <> 0.01) FROM app.orders"
    ).fetchone()
    assert (missing, wrong) == (0, 0)
    assert (
        conn.execute("SELECT count(*) FROM app.orders WHERE total_price = 0.01").fetchone()
        == written
    ), "the application's values are kept"
    audits = audit_rows(conn, strategy="batched_update", status="succeeded")
    assert len(audits) == 12 and {a["reason"] for a in audits} == {why}

    # Step 4: NOT NULL without a long lock.
    assert cli.main(["finish-column", "app.orders", "total_price"]) == 0
    assert conn.execute(
        "SELECT attnotnull FROM pg_attribute WHERE attrelid = 'app.orders'::regclass "
        "AND attname = 'total_price'"
    ).fetchone()[0]


TAX_FIX = REPO_ROOT / "scenarios" / "tax_fix"
WRONG_TAX = """
SELECT count(*) FROM analytics.fct_orders AS f JOIN app.customers AS c USING (customer_id)
JOIN app.tax_rates AS r ON r.country = c.country
WHERE f.order_day >= %s AND f.order_day < %s AND f.tax_amount <> round(f.net_amount * r.rate, 2)
"""


def test_a_tax_bug_is_fixed_at_the_source_then_exactly_its_three_months_are_rebuilt(
    conn, dagster_env, monkeypatch, tmp_path, capsys
):
    ensure_table(conn, FCT_ORDERS)
    days = FCT_ORDERS.partitioning.keys_between("2024-03-30", "2024-07-02")
    for day in days:  # what earlier loads left: the bug copied into fct_orders
        replace_partition(conn, FCT_ORDERS, FCT_ORDERS.partitioning.window(day))
    neighbours = ["2024-03-30", "2024-03-31", "2024-07-01", "2024-07-02"]
    before = fingerprints(conn, neighbours)
    assert conn.execute(WRONG_TAX, ["2024-04-01", "2024-07-01"]).fetchone()[0] > 0, "the bug"
    tables = f"{DEFAULT_TABLES_DIR}:{TAX_FIX}"
    monkeypatch.setenv(TABLES_PATH_ENV, tables)
    why = "TAX-7: German rate charged to everyone in Q2 2024"

    with running_daemon({**dagster_env, TABLES_PATH_ENV: tables}, tmp_path / "daemon.log"):
        fix = ["--select", "app/orders", "--from", "2024-04-01", "--to", "2024-06-01"]
        rebuild = ["--select", "analytics/fct_orders", "--downstream"]
        rebuild += ["--from", "2024-04-01", "--to", "2024-06-30"]
        for args in (fix, rebuild):
            code = cli.main(["launch", *args, "--reason", why, "--wait"])
            if code != 0:
                with DagsterInstance.get() as instance:
                    runs = [r.dagster_run.run_id for r in instance.get_run_records()]
                    report = failed_run_report(instance, runs, tmp_path / "daemon.log")
                raise AssertionError(capsys.readouterr().out + report)

    assert conn.execute(WRONG_TAX, ["2024-04-01", "2024-07-01"]).fetchone()[0] == 0
    assert fingerprints(conn, neighbours) == before, "the other months are untouched"
    fixed = audit_rows(conn, table_name="app.orders", status="succeeded")
    assert [a["partition_key"] for a in fixed] == ["2024-04-01", "2024-05-01", "2024-06-01"]
    assert all(a["rows_updated"] > 0 and a["reason"] == why for a in fixed)
    rebuilt = audit_rows(conn, table_name="analytics.fct_orders", status="succeeded")
    assert len(rebuilt) == 91 and {a["reason"] for a in rebuilt} == {why}
    with DagsterInstance.get() as instance:
        shifted = latest_check(instance, "change_within_threshold", "2024-05-15")
        assert shifted.event.asset_check_evaluation.severity.value == "WARN"
        assert not shifted.event.asset_check_evaluation.passed, "analysts hear numbers shifted"


def hold_back_late_orders(conn) -> None:
    """As if the first load ran before some orders reached the database (``arrived_at`` days
    later): they wait in ``app.not_yet_arrived``."""
    conn.execute(
        "CREATE TABLE app.not_yet_arrived AS SELECT * FROM app.orders "
        "WHERE arrived_at > ordered_at + interval '1 day'"
    )
    conn.execute(
        "DELETE FROM app.orders WHERE order_id IN (SELECT order_id FROM app.not_yet_arrived)"
    )


def test_late_arriving_rows_are_found_and_only_their_partitions_backfilled(
    conn, dagster_env, tmp_path, capsys
):
    week = ["--from", "2024-09-08", "--to", "2024-09-14"]
    hold_back_late_orders(conn)
    late_days = [
        str(day)
        for (day,) in conn.execute(
            "SELECT DISTINCT (ordered_at AT TIME ZONE 'UTC')::date FROM app.not_yet_arrived "
            "WHERE ordered_at >= '2024-09-08' AND ordered_at < '2024-09-15' ORDER BY 1"
        )
    ]
    assert late_days == ["2024-09-10", "2024-09-11"], "the demo data's late days"

    with running_daemon(dagster_env, tmp_path / "daemon.log"):
        assert cli.main(["launch", "--select", "analytics/fct_orders", *week, "--wait"]) == 0
        assert cli.main(["stale", "--select", "analytics/fct_orders", *week]) == 0
        conn.execute("INSERT INTO app.orders SELECT * FROM app.not_yet_arrived")  # they arrive
        capsys.readouterr()

        assert cli.main(["stale", "--select", "analytics/fct_orders", *week]) == 1
        out = capsys.readouterr().out
        assert "2 of 7 written partition(s) are stale" in out
        listed = [line.split(":")[0].strip() for line in out.splitlines() if "rows written" in line]
        assert listed == late_days

        launch = ["stale", "--select", "analytics/fct_orders", *week, "--launch", "--wait"]
        assert cli.main([*launch, "--reason", "late orders"]) == 0
        assert cli.main(["stale", "--select", "analytics/fct_orders", *week]) == 0
        assert "0 of 7 written" in capsys.readouterr().out

        # A correction upstream: as many rows as written, other values.
        conn.execute(
            "UPDATE app.orders SET net_amount = net_amount + 1 WHERE order_id = (SELECT "
            "min(order_id) FROM app.orders WHERE ordered_at >= '2024-09-12' "
            "AND ordered_at < '2024-09-13')"
        )
        assert cli.main(["stale", "--select", "analytics/fct_orders", *week]) == 1
        corrected = [
            line for line in capsys.readouterr().out.splitlines() if "rows written" in line
        ]
        assert len(corrected) == 1 and "2024-09-12" in corrected[0]
        assert "with other values (their checksum differs)" in corrected[0]

    refreshed = audit_rows(conn, status="succeeded", reason="late orders")
    assert sorted(a["partition_key"] for a in refreshed) == late_days


def test_the_late_data_sensor_backfills_exactly_the_days_whose_source_changed(
    conn, dagster_env, tmp_path
):
    """Scenario 3 without the CLI: the sensor a user turns on in the UI (Automation)."""
    week = ["--from", "2024-09-08", "--to", "2024-09-14"]
    hold_back_late_orders(conn)
    sensor = "late_data__analytics__fct_orders"
    with running_daemon(dagster_env, tmp_path / "daemon.log"), DagsterInstance.get() as instance:
        assert cli.main(["launch", "--select", "analytics/fct_orders", *week, "--wait"]) == 0
        conn.execute("INSERT INTO app.orders SELECT * FROM app.not_yet_arrived")  # they arrive

        # As the UI's toggle does: the daemon evaluates a sensor as soon as it is turned on.
        started = subprocess.run(
            ["dagster", "sensor", "start", sensor, "-w", str(WORKSPACE_FILE)],
            env={**os.environ, **dagster_env},
            capture_output=True,
            text=True,
        )
        assert started.returncode == 0, started.stderr
        requested = wait_for(
            lambda: instance.get_backfills(filters=BulkActionsFilter(tags={LAUNCHED_BY: sensor})),
            180,
            "the sensor requested no backfill",
            poll_s=1,
        )
        (backfill,) = requested
        progress = wait_for_backfill(instance, backfill.backfill_id, timeout_s=600)
        assert progress.failed_runs == 0
        selected = {k.to_user_string() for k in backfill.asset_selection}

    assert selected == {
        "analytics/fct_orders",
        "analytics/customer_daily_orders",
        "analytics/daily_revenue",
    }, "and what is built from the table"
    rewritten = audit_rows(conn, launched_by=sensor, status="succeeded")
    assert sorted(a["partition_key"] for a in rewritten) == ["2024-09-10", "2024-09-11"]
    assert all(a["reason"].startswith("late data: the source of 2 partition(s)") for a in rewritten)
    assert cli.main(["stale", "--select", "analytics/fct_orders", *week]) == 0


def stale_days(out: str, asset: str) -> dict[str, str]:
    """``stale``'s lines for one asset: {partition: its reasons}."""
    section, found = False, {}
    for line in out.splitlines():
        if not line.startswith(" "):
            section = line.startswith(asset + " ")
        elif section and line.strip()[:4].isdigit():
            day, why = line.strip().split(": ", 1)
            found[day] = why
    return found


def test_a_logic_change_marks_exactly_the_partitions_written_before_it_stale(
    conn, dagster_env, monkeypatch, tmp_path, capsys
):
    """The logic changes on copies of the demo's tables and dbt project (the tests beside this
    one keep theirs): the days written before it are stale, and the rewritten day's marts."""
    tables, project = tmp_path / "tables", tmp_path / "dbt_project"
    shutil.copytree(DEFAULT_TABLES_DIR, tables)
    shutil.copytree(
        DEFAULT_DBT_PROJECT_DIR,
        project,
        ignore=shutil.ignore_patterns("target", "dbt_packages", "logs", "package-lock.yml"),
    )
    monkeypatch.setenv(TABLES_PATH_ENV, str(tables))
    monkeypatch.setenv(DBT_PROJECT_ENV, str(project))
    env = {**dagster_env, TABLES_PATH_ENV: str(tables), DBT_PROJECT_ENV: str(project)}
    days = ["--from", "2024-03-01", "--to", "2024-03-05"]
    model = project / "models" / "marts" / "daily_revenue.sql"
    original = model.read_text()
    with running_daemon(env, tmp_path / "daemon.log"):
        select = ["--select", "analytics/fct_orders"]
        assert cli.main(["launch", *select, "--downstream", *days, "--wait"]) == 0
        assert cli.main(["stale", *select, "--downstream", *days]) == 0
        assert "0 of 5 written partition(s) are stale" in capsys.readouterr().out

        # The logic changes: the table's SQL (no March row changes: the code version does)
        # and a dbt mart's SQL. Then one day of the table is rewritten with the new logic.
        query = tables / "fct_orders.sql"
        query.write_text(query.read_text().replace("'web')", "'web' /* since v2 */)"))
        model.write_text("-- v2: reviewed\n" + original)
        assert (
            cli.main(["launch", *select, "--from", "2024-03-03", "--to", "2024-03-03", "--wait"])
            == 0
        )
        capsys.readouterr()

        assert cli.main(["stale", *select, "--downstream", *days]) == 1
        out = capsys.readouterr().out
        code = "code changed since it was written (new code version)"
        old_days = ["2024-03-01", "2024-03-02", "2024-03-04", "2024-03-05"]
        assert stale_days(out, "analytics/fct_orders") == dict.fromkeys(old_days, code)
        rewritten = "upstream analytics/fct_orders 2024-03-03 was rewritten since"
        assert stale_days(out, "analytics/customer_daily_orders") == {"2024-03-03": rewritten}
        revenue = stale_days(out, "analytics/daily_revenue")
        both = f"{code}; {rewritten}"
        assert revenue == {**dict.fromkeys(old_days, code), "2024-03-03": both}

        # One command: those days, and what reads them.
        assert cli.main(["stale", *select, "--downstream", *days, "--launch", "--wait"]) == 0
        assert cli.main(["stale", *select, "--downstream", *days]) == 0
        out = capsys.readouterr().out
        assert out.count("0 of 5 written partition(s) are stale") == 3, out
    rewrites = audit_rows(conn, table_name="analytics.fct_orders", status="succeeded")
    assert sorted(a["partition_key"] for a in rewrites[5:]) == [
        "2024-03-01",
        "2024-03-02",
        "2024-03-03",
        "2024-03-03",
        "2024-03-04",
        "2024-03-05",
    ], "each day once more, 03-03 twice: once for the new logic, once with its marts"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--select", "analytics/nope"], "unknown asset"),
        (["--select", "analytics/fct_orders", "--from", "2023-12-31"], "from 2024-01-01 to"),
        (["--select", "analytics/fct_orders", "--reason", "x" * 501], "keep it to 500"),
    ],
    ids=["unknown", "out-of-range", "long-reason"],
)
def test_bad_input_to_stale_is_one_line_and_launches_nothing(dagster_env, capsys, args, message):
    assert cli.main(["stale", *args, "--launch"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    with DagsterInstance.get() as instance:
        assert instance.get_backfills() == []


def _rows(conn, relation: str, person: int, *, about: bool) -> list[tuple]:
    """Every row of ``relation`` about the person (``about``) or about anyone else, in order."""
    where = "customer_id = %s" if about else "customer_id IS DISTINCT FROM %s"
    query = f"SELECT * FROM {relation} WHERE {where} ORDER BY 1, 2, 3"
    return conn.execute(query, [person]).fetchall()


def _snapshot_rows_about(conn, person: int) -> int:
    tables = conn.execute(
        "SELECT format('%I.%I', table_schema, table_name) FROM information_schema.columns "
        "WHERE table_schema = 'backfill_snapshots' AND column_name = 'customer_id'"
    ).fetchall()
    return sum(
        conn.execute(f"SELECT count(*) FROM {t} WHERE customer_id = %s", [person]).fetchone()[0]
        for (t,) in tables
    )


def test_an_erasure_leaves_no_row_of_the_person_anywhere_and_changes_no_other_row(
    conn, dagster_env, tmp_path, capsys
):
    week = ["--from", "2024-05-06", "--to", "2024-05-12"]
    fact, mart, revenue = (
        "analytics.fct_orders",
        "analytics.customer_daily_orders",
        "analytics.daily_revenue",
    )
    with running_daemon(dagster_env, tmp_path / "daemon.log"):
        launch = ["launch", "--select", "analytics/fct_orders", "--downstream", *week, "--wait"]
        assert cli.main(launch) == 0
        assert cli.main(launch) == 0  # written twice: the snapshots hold the first rows
        (person,) = conn.execute(
            f"SELECT customer_id FROM {fact} GROUP BY 1 "
            "ORDER BY count(DISTINCT order_day) DESC, 1 LIMIT 1"
        ).fetchone()
        days = [
            str(d)
            for (d,) in conn.execute(
                f"SELECT DISTINCT order_day FROM {fact} WHERE customer_id = %s ORDER BY 1", [person]
            )
        ]
        theirs = len(_rows(conn, fact, person, about=True))
        assert len(days) >= 2 and _snapshot_rows_about(conn, person) > 0
        others = {r: _rows(conn, r, person, about=False) for r in (fact, mart)}
        revenue_before = dict(
            (str(day), count)
            for day, count in conn.execute(f"SELECT order_day, order_count FROM {revenue}")
        )
        capsys.readouterr()

        # While the source still holds the person, a rewrite would put them back: refused.
        erase = ["erase", "--subject", str(person), "--reason", "GDPR-17: erasure request"]
        assert cli.main(erase) == 2
        assert "still yields" in capsys.readouterr().err
        with DagsterInstance.get() as instance:
            launched = len(instance.get_backfills())

        # The application erases the person at the source; then the erasure.
        conn.execute("DELETE FROM app.orders WHERE customer_id = %s", [person])
        conn.execute("DELETE FROM app.customers WHERE customer_id = %s", [person])
        assert cli.main(erase) == 0, capsys.readouterr()
        with DagsterInstance.get() as instance:
            assert len(instance.get_backfills()) == launched + 1

    for relation in (fact, mart):
        assert _rows(conn, relation, person, about=True) == []
        assert _rows(conn, relation, person, about=False) == others[relation], "no other row"
    assert _snapshot_rows_about(conn, person) == 0
    revenue_after = dict(
        (str(day), count)
        for day, count in conn.execute(f"SELECT order_day, order_count FROM {revenue}")
    )
    changed = sorted(d for d in revenue_before if revenue_after[d] != revenue_before[d])
    assert changed == days, "the daily totals moved on the person's days only"

    rewrites = audit_rows(conn, table_name=fact, reason="GDPR-17: erasure request")
    assert sorted(a["partition_key"] for a in rewrites) == days

    with conn.cursor(row_factory=dict_row) as cur:
        (record,) = cur.execute("SELECT * FROM backfill_audit.erasures").fetchall()
    assert set(record) == {
        "id",
        "erased_at",
        "reason",
        "requested_by",
        "backfill_ids",
        "rows_erased",
        "relations_checked",
        "rows_remaining",
    }
    assert record["rows_remaining"] == 0 and record["reason"] == "GDPR-17: erasure request"
    assert record["rows_erased"][fact] == theirs and record["rows_erased"][mart] == len(days)
    assert record["rows_erased"][f"snapshots of {fact}"] > 0
    assert {fact, mart} <= set(record["relations_checked"])
    assert cli.main(["audit", "--erasures"]) == 0
    assert "GDPR-17: erasure request" in capsys.readouterr().out
    words = [record["requested_by"], *record["backfill_ids"], *record["relations_checked"]]
    assert not any(str(person) in text for text in [*words, *record["rows_erased"]]), (
        "the record names no person"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--subject", "abc", "--reason", "GDPR-1"], "--subject 'abc' fits no subject column"),
        (["--subject", "7", "--reason", "  "], "--reason is empty"),
        (["--subject", " ", "--reason", "GDPR-1"], "--subject is empty"),
        (["--subject", "7", "--reason", "x" * 501], "keep it to 500"),
    ],
    ids=["wrong-type", "empty-reason", "empty-subject", "long-reason"],
)
def test_bad_input_to_erase_is_one_line_and_changes_nothing(
    conn, dagster_env, capsys, args, message
):
    ensure_table(conn, FCT_ORDERS)
    replace_partition(conn, FCT_ORDERS, FCT_ORDERS.partitioning.window("2024-05-06"))
    before = fingerprints(conn, ["2024-05-06"])
    assert cli.main(["erase", *args]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and len(captured.err.strip().splitlines()) == 1
    assert captured.out == "", "nothing else said"
    assert fingerprints(conn, ["2024-05-06"]) == before
    with DagsterInstance.get() as instance:
        assert instance.get_backfills() == []


def test_erase_skips_subject_columns_that_cannot_hold_the_value_and_checks_every_partition(
    conn, dagster_env, monkeypatch, tmp_path, capsys
):
    """An email erases from the table keyed by email; the bigint customer_id tables are skipped,
    not a reason to refuse. The source is checked over every partition, written or not."""
    own = REPO_ROOT / "tests" / "own_tables"
    conn.execute((own / "order_lines_source.sql").read_text())
    folder = tmp_path / "tables"
    folder.mkdir()
    declaration = (own / "shipped_lines.yaml").read_text()
    (folder / "shipped_lines.yaml").write_text(declaration + "subject_column: ship_mode\n")
    shutil.copy(own / "shipped_lines.sql", folder)
    monkeypatch.setenv(TABLES_PATH_ENV, f"{DEFAULT_TABLES_DIR}:{folder}")
    mode = conn.execute("SELECT min(ship_mode) FROM legacy.order_lines").fetchone()[0]

    assert cli.main(["erase", "--subject", mode.upper(), "--reason", "GDPR-3"]) == 2
    captured = capsys.readouterr()
    assert "fits no subject column" not in captured.err, "the bigint tables are skipped"
    assert "the source of reporting.shipped_lines still yields" in captured.err
    assert "Nothing was launched" in captured.err
    with DagsterInstance.get() as instance:
        assert instance.get_backfills() == []

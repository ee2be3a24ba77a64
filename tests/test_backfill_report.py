"""The backfill report: what a backfill changed per partition, as analysts read it (the CLI's
Markdown and JSON, the HTML page with charts, each partition's ``changes`` metadata in the UI);
its numbers must equal SQL over the tables before and after."""

from __future__ import annotations

import json
from decimal import Decimal

from dagster import AssetKey, AssetRecordsFilter, DagsterInstance
from support import FCT_ORDERS, audit_rows

from backfill_assets.core.tables import TableSpec
from backfill_assets.tooling import cli
from backfill_assets.tooling.launch import running_daemon

DAYS = ["2024-07-01", "2024-07-02", "2024-07-03"]
WINDOW = "ordered_at >= '2024-07-01' AND ordered_at < '2024-07-04'"


def expected_changes(conn, table: TableSpec) -> dict[str, dict]:
    """Per day, by SQL over a copy taken before the backfill and the table after it."""
    sums = ", ".join(f"sum(a.{m}) AS before_{m}, sum(b.{m}) AS after_{m}" for m in table.measures)
    rows = conn.execute(
        "SELECT coalesce(b.order_day, a.order_day)::text AS day, "
        "count(a.order_id), count(b.order_id), "
        "count(*) FILTER (WHERE a.order_id IS NULL), count(*) FILTER (WHERE b.order_id IS NULL), "
        "count(*) FILTER (WHERE a.order_id IS NOT NULL AND b.order_id IS NOT NULL "
        f"AND ROW(a.*)::text <> ROW(b.*)::text), {sums} "
        "FROM report_test.fct_before AS a FULL JOIN "
        "(SELECT * FROM analytics.fct_orders WHERE order_day BETWEEN '2024-07-01' AND '2024-07-03')"
        " AS b ON a.order_id = b.order_id GROUP BY 1 ORDER BY 1"
    ).fetchall()
    found = {}
    for day, before, after, added, removed, changed, *measure_sums in rows:
        found[day] = {
            "rows_before": before,
            "rows_after": after,
            "rows_added": added,
            "rows_removed": removed,
            "rows_changed": changed,
            "sums_before": dict(zip(table.measures, measure_sums[0::2], strict=True)),
            "sums_after": dict(zip(table.measures, measure_sums[1::2], strict=True)),
        }
    return found


def test_the_report_of_a_backfill_equals_sql_over_the_table_before_and_after(
    conn, dagster_env, tmp_path, capsys
):
    days = ["--from", DAYS[0], "--to", DAYS[-1]]
    # Some orders arrive late: held back from the first load.
    conn.execute(
        f"CREATE TABLE app.held_back AS SELECT * FROM app.orders WHERE {WINDOW} "
        "ORDER BY order_id LIMIT 4"
    )
    conn.execute("DELETE FROM app.orders WHERE order_id IN (SELECT order_id FROM app.held_back)")
    with running_daemon(dagster_env, tmp_path / "daemon.log"):
        assert cli.main(["launch", "--select", "analytics/fct_orders", *days, "--wait"]) == 0
        conn.execute("CREATE SCHEMA report_test")
        conn.execute(
            "CREATE TABLE report_test.fct_before AS SELECT * FROM analytics.fct_orders "
            "WHERE order_day BETWEEN '2024-07-01' AND '2024-07-03'"
        )
        # Then: the late orders arrive, some orders are cancelled away, some amounts corrected.
        conn.execute("INSERT INTO app.orders SELECT * FROM app.held_back")
        conn.execute(
            "DELETE FROM app.orders WHERE order_id IN (SELECT order_id FROM app.orders "
            f"WHERE {WINDOW} ORDER BY order_id DESC LIMIT 3)"
        )
        conn.execute(
            "UPDATE app.orders SET net_amount = net_amount + 10 WHERE order_id IN "
            f"(SELECT order_id FROM app.orders WHERE {WINDOW} ORDER BY order_id LIMIT 6 OFFSET 10)"
        )
        launch = ["launch", "--select", "analytics/fct_orders", *days, "--json", "--wait"]
        assert cli.main([*launch, "--reason", "REP-1: late and corrected orders"]) == 0
    backfill_id = audit_rows(conn, reason="REP-1: late and corrected orders")[0]["backfill_id"]
    capsys.readouterr()
    expected = expected_changes(conn, FCT_ORDERS)
    assert sum(d["rows_added"] for d in expected.values()) == 4, "the test's own premise"
    assert sum(d["rows_removed"] for d in expected.values()) == 3
    assert sum(d["rows_changed"] for d in expected.values()) == 6

    page = tmp_path / "report.html"
    assert cli.main(["report", backfill_id, "--json", "--out", str(page)]) == 0
    reported = {row["partition"]: row for row in json.loads(capsys.readouterr().out)}
    assert sorted(reported) == DAYS
    for day, want in expected.items():
        got = reported[day]
        assert got["status"] == "succeeded"
        for count in ("rows_before", "rows_after", "rows_added", "rows_removed", "rows_changed"):
            assert got[count] == want[count], (day, count)
        for side in ("sums_before", "sums_after"):
            assert {m: Decimal(v) for m, v in got[side].items()} == want[side], (day, side)

    text = page.read_text()
    assert text.count("<svg") == 1 + len(FCT_ORDERS.measures), "rows and each measure"
    assert "REP-1: late and corrected orders" in text and all(day in text for day in DAYS)

    numbers = tmp_path / "report.json"
    assert cli.main(["report", backfill_id, "--json", "--out", str(numbers)]) == 0
    assert json.loads(numbers.read_text()) == list(reported.values()), "a .json --out: the JSON"
    assert json.loads(capsys.readouterr().out) == list(reported.values())

    assert cli.main(["report", backfill_id, "--out", str(page)]) == 0
    summary = capsys.readouterr().out
    assert "REP-1: late and corrected orders" in summary
    assert sum(line.startswith("| 2024-07-0") for line in summary.splitlines()) == 3

    # The same numbers on the partition's materialization, readable in the UI.
    with DagsterInstance.get() as instance:
        (latest,) = instance.fetch_materializations(
            AssetRecordsFilter(AssetKey(["analytics", "fct_orders"]), asset_partitions=[DAYS[1]]),
            limit=1,
        ).records
    changes = latest.event_log_entry.asset_materialization.metadata["changes"].value
    want = expected[DAYS[1]]
    assert "REP-1: late and corrected orders" in changes
    assert f"{want['rows_before']:,} → {want['rows_after']:,}" in changes
    net_before, net_after = want["sums_before"]["net_amount"], want["sums_after"]["net_amount"]
    assert f"{net_before:,} → {net_after:,}" in changes


def test_report_of_an_unknown_backfill_is_one_line(dagster_env, capsys, tmp_path):
    assert cli.main(["report", "nosuchid", "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "no backfill 'nosuchid'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.html").exists()


def test_report_to_a_missing_folder_or_a_folder_is_one_line(dagster_env, capsys, tmp_path):
    for out, problem in (
        (tmp_path / "no" / "r.html", "its folder does not exist"),
        (tmp_path, "is a folder"),
    ):
        assert cli.main(["report", "nosuchid", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert problem in err and len(err.strip().splitlines()) == 1

"""`backfill-assets launch` and `status`: asset backfills from the command line, by the daemon."""

from __future__ import annotations

import json
import time

import pytest
from dagster import AssetKey, DagsterInstance, RunsFilter
from support import database_checksum, failed_run_report, record_past_writes, running_webserver

from backfill_assets.defs.dagster_internals import BACKFILL_ID_TAG
from backfill_assets.tooling import cli
from backfill_assets.tooling.launch import closed, launch_asset_backfill, running_daemon
from backfill_assets.tooling.webserver import Webserver

DAYS = ["2024-05-01", "2024-05-02", "2024-05-03"]
FCT_ORDERS = AssetKey(["analytics", "fct_orders"])
MARTS = [AssetKey(["analytics", "daily_revenue"]), AssetKey(["analytics", "customer_daily_orders"])]


def break_one_order(conn, day: str) -> None:
    """A source row the table's CHECK (net_amount >= 0) refuses: the day fails its write."""
    conn.execute(
        "UPDATE app.orders SET net_amount = -1 WHERE order_id = (SELECT min(order_id) FROM "
        "app.orders WHERE ordered_at >= %s::date AND ordered_at < %s::date + 1)",
        [day, day],
    )


def launched_id(out: str) -> str:
    return out.split("launched asset backfill ", 1)[1].split(":", 1)[0]


def test_launch_creates_an_asset_backfill_that_the_daemon_completes_and_status_reports(
    dagster_env, tmp_path, capsys
):
    with running_daemon(dagster_env, tmp_path / "daemon.log"):
        args = ["launch", "--select", "analytics.fct_orders", "--downstream"]
        assert cli.main([*args, "--from", DAYS[0], "--to", DAYS[-1]]) == 0
        backfill_id = launched_id(capsys.readouterr().out)
        code = cli.main(["status", backfill_id, "--wait"])
        out = capsys.readouterr().out

    with DagsterInstance.get() as instance:
        backfill = instance.get_backfill(backfill_id)
        runs = instance.get_run_records()
        assert code == 0, failed_run_report(
            instance, [r.dagster_run.run_id for r in runs], tmp_path / "daemon.log"
        )
        assert backfill.is_asset_backfill and backfill.tags["backfill_assets/launched_by"]
        who = backfill.tags["backfill_assets/launched_by"]
        assert backfill.user == who, "the UI's 'Launched by' reads Dagster's user tag"
        assert all(r.dagster_run.tags.get("user") == who for r in runs), "and so do its runs"
        assert "status: finished" in out and "9/9 partitions materialized, 0 failed" in out
        for key in (FCT_ORDERS, *MARTS):
            assert instance.get_materialized_partitions(key) == set(DAYS), key
        assert len(runs) == 1, "three days of the table and its marts fit one run"
    assert cli.main(["status", backfill_id]) == 0


ONE_DAY = ["--select", "analytics/fct_orders", "--from", DAYS[0], "--to", DAYS[0]]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--select", "analytics/nope", "--from", DAYS[0], "--to", DAYS[1]], "unknown asset"),
        (["--select", "app/orders", "--from", DAYS[0], "--to", DAYS[1]], "partitioned assets:"),
        (["--select", "analytics/fct_orders", "--from", "2024-5-1", "--to", DAYS[1]], "2024-5-1"),
        (["--select", "analytics/fct_orders", "--from", DAYS[1], "--to", DAYS[0]], "swap them"),
        (
            ["--select", "analytics/fct_orders", "--from", "2023-12-31", "--to", DAYS[0]],
            "from 2024-01-01 to 2024-12-31",
        ),
        (
            ["--select", "analytics/fct_orders", "--from", DAYS[0], "--to", DAYS[0], "--tags", "x"],
            "JSON",
        ),
        (
            ["--select", "analytics/fct_orders", "--from", "", "--to", ""],
            "unknown partition key ''",
        ),
        (
            [*ONE_DAY, "--reason", "x" * 501],
            "backfill_assets/reason is 501 characters long; keep it to 500",
        ),
    ],
    ids=[
        "unknown",
        "source",
        "malformed",
        "reversed",
        "out-of-range",
        "bad-tags",
        "empty",
        "long-reason",
    ],
)
def test_bad_input_to_launch_is_one_line_and_launches_nothing(dagster_env, capsys, args, message):
    assert cli.main(["launch", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    with DagsterInstance.get() as instance:
        assert instance.get_backfills() == []


def test_status_of_an_unknown_backfill_is_refused(dagster_env, capsys):
    assert cli.main(["status", "nosuchid"]) == 2
    assert "no backfill 'nosuchid'" in capsys.readouterr().err


def test_plan_writes_nothing_and_estimates_the_backfill_within_a_factor_of_two(
    dagster_env, tmp_path, capsys, conn
):
    with running_daemon(dagster_env, tmp_path / "daemon.log"):
        history = ["launch", "--select", "analytics/fct_orders", "--downstream", "--wait"]
        assert cli.main([*history, "--from", "2024-04-01", "--to", "2024-04-03"]) == 0
        capsys.readouterr()
        before = database_checksum(conn)
        with DagsterInstance.get() as instance:
            backfills = len(instance.get_backfills())

        selection = ["--select", "analytics/fct_orders", "--downstream"]
        span = ["--from", "2024-05-01", "--to", "2024-05-10"]
        assert cli.main(["plan", *selection, *span, "--json"]) == 0
        planned = json.loads(capsys.readouterr().out)

        assert database_checksum(conn) == before
        with DagsterInstance.get() as instance:
            assert len(instance.get_backfills()) == backfills
        started = time.monotonic()
        assert cli.main(["launch", *selection, *span, "--wait"]) == 0
        actual = time.monotonic() - started

    table = planned["tables"][0]
    assert planned["downstream"] == ["analytics/customer_daily_orders", "analytics/daily_revenue"]
    assert table["partitions"] == 10 and table["measured_writes"] >= 3
    assert planned["concurrency"] == 2  # dagster.yaml's concurrency.runs.max_concurrent_runs
    written = conn.execute(
        "SELECT partition_key, rows_inserted FROM backfill_audit.backfill_runs "
        "WHERE partition_key >= '2024-05-01' AND status = 'succeeded'"
    ).fetchall()
    assert dict(written) == table["source_rows_per_partition"]
    assert table["snapshot_rows"] == 0  # the days were never written before
    assert actual / 2 <= planned["estimated_s"] <= actual * 2, (planned["estimated_s"], actual)


def test_plan_names_the_assets_that_will_change_and_whom_to_tell(dagster_env, conn, capsys):
    span = ["--select", "analytics/fct_orders", "--from", "2024-05-01", "--to", "2024-05-03"]
    readers = ["analytics/customer_daily_orders", "analytics/daily_revenue"]
    assert cli.main(["plan", *span]) == 0
    out = capsys.readouterr().out
    assert f"not rebuilt, out of date until they are: {', '.join(readers)}" in out
    assert "tell first: finance@shop.example, team:analytics, team:crm" in out

    assert cli.main(["plan", *span, "--downstream", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["readers"] == planned["downstream"] == readers
    assert planned["owners"] == {  # tables/fct_orders.yaml, dbt_project/models/marts/_models.yml
        "analytics/fct_orders": ["team:analytics"],
        "analytics/customer_daily_orders": ["team:crm"],
        "analytics/daily_revenue": ["finance@shop.example"],
    }
    assert planned["tell"] == ["finance@shop.example", "team:analytics", "team:crm"]
    assert cli.main(["plan", *span, "--downstream"]) == 0
    assert "not rebuilt" not in capsys.readouterr().out


def test_cancel_stops_a_running_backfill(dagster_env, tmp_path, capsys, conn):
    # Measured writes of 60 s: a run per day, 366 of them, far more than the daemon's next tick
    # (when it acts on the cancel) lets the queue finish.
    record_past_writes(conn, "analytics.fct_orders", seconds=60)
    with running_daemon(dagster_env, tmp_path / "daemon.log"):
        span = ["--from", "2024-01-01", "--to", "2024-12-31"]
        assert cli.main(["launch", "--select", "analytics/fct_orders", *span, "--json"]) == 0
        backfill_id = json.loads(capsys.readouterr().out)["backfill_id"]
        with DagsterInstance.get() as instance:
            deadline = time.monotonic() + 120
            while not instance.get_runs(filters=RunsFilter(tags={BACKFILL_ID_TAG: backfill_id})):
                assert time.monotonic() < deadline, "the daemon never started the backfill"
                time.sleep(0.5)
        assert cli.main(["cancel", backfill_id]) == 0
        code = cli.main(["status", backfill_id, "--wait", "--json"])
        report = json.loads(capsys.readouterr().out.split("\n", 2)[-1])

    with DagsterInstance.get() as instance:
        assert instance.get_backfill(backfill_id).status.value == "CANCELED"
        runs = instance.get_runs(filters=RunsFilter(tags={BACKFILL_ID_TAG: backfill_id}))
    assert code == 1
    assert report["finished"] and not report["succeeded"]
    assert report["counts"]["materialized"] < 366
    assert all(run.status.value in ("CANCELED", "SUCCESS") for run in runs)
    assert any(run.status.value == "CANCELED" for run in runs)
    assert cli.main(["cancel", backfill_id]) == 2
    assert "already ended" in capsys.readouterr().err


def test_retry_reruns_exactly_the_partitions_a_failed_backfill_did_not_write(
    dagster_env, tmp_path, capsys, conn
):
    bad_day = DAYS[1]
    break_one_order(conn, bad_day)
    with running_daemon(dagster_env, tmp_path / "daemon.log"):
        span = ["--from", DAYS[0], "--to", DAYS[-1]]
        assert cli.main(["launch", "--select", "analytics/fct_orders", *span, "--wait"]) == 1
        out = capsys.readouterr().out
        failed_id = launched_id(out)
        assert f"not materialized: analytics/fct_orders {DAYS[1]}" in out
        # Why, as the run's failure says it in the UI too, with the command that re-runs it.
        assert f"- {bad_day} keeps its previous rows: " in out and "net_amount_check" in out
        assert f"Re-execute from failure, or `backfill-assets retry {failed_id}`" in out
        conn.execute("UPDATE app.orders SET net_amount = 1 WHERE net_amount = -1")

        assert cli.main(["retry", failed_id, "--wait"]) == 0
        retry_id = launched_id(capsys.readouterr().out)
        assert cli.main(["retry", retry_id]) == 2
        assert "nothing to retry" in capsys.readouterr().err

    with DagsterInstance.get() as instance:
        retried = instance.get_backfill(retry_id)
        target = retried.asset_backfill_data.target_subset
        targets = {k.partition_key for k in target.iterate_asset_partitions()}
        assert retried.tags["dagster/parent_backfill_id"] == failed_id
    assert targets == {bad_day}, "the run's other days were written despite the bad one"
    writes = conn.execute(
        "SELECT partition_key, backfill_id FROM backfill_audit.backfill_runs "
        "WHERE status = 'succeeded' ORDER BY partition_key"
    ).fetchall()
    assert writes == [(DAYS[0], failed_id), (DAYS[1], retry_id), (DAYS[2], failed_id)]


def test_a_refused_day_fails_alone_and_the_written_days_marts_are_built_in_the_same_backfill(
    dagster_env, tmp_path, capsys, conn
):
    """One run writes the table and builds its marts. A day the table refuses used to leave every
    day's marts unbuilt (Dagster skips the marts' step for the whole run); now the written days'
    marts are built by runs the failing step queues in the backfill, one per stretch of days."""
    bad_day = DAYS[1]
    break_one_order(conn, bad_day)
    with running_daemon(dagster_env, tmp_path / "daemon.log"):
        args = ["launch", "--select", "analytics/fct_orders", "--downstream", "--wait"]
        assert cli.main([*args, "--from", DAYS[0], "--to", DAYS[-1]]) == 1
        out = capsys.readouterr().out
        backfill_id = launched_id(out)

    written = {DAYS[0], DAYS[2]}
    with DagsterInstance.get() as instance:
        runs = instance.get_runs(filters=RunsFilter(tags={BACKFILL_ID_TAG: backfill_id}))
        report = failed_run_report(instance, [r.run_id for r in runs], tmp_path / "daemon.log")
        for key in (FCT_ORDERS, *MARTS):
            assert instance.get_materialized_partitions(key) == written, f"{key}\n{report}"
        follow_ups = [r for r in runs if r.tags.get(".backfill_assets/downstream_of_run")]
    assert sorted(r.tags.get("dagster/partition") for r in follow_ups) == sorted(written)
    assert all(set(r.asset_selection) == set(MARTS) for r in follow_ups)
    assert all(r.status.value == "SUCCESS" for r in follow_ups), report
    assert "6/9 partitions materialized, 3 failed" in out, out
    assert f"- {bad_day} keeps its previous rows: " in out
    built = conn.execute("SELECT order_day::text FROM analytics.daily_revenue ORDER BY 1")
    assert [day for (day,) in built] == sorted(written), "the refused day's marts are untouched"


def test_status_says_why_a_run_failed_before_any_check_could(dagster_env, tmp_path, capsys):
    """A run that fails before writing (here a tag the UI let through) has no check to say why:
    ``status`` prints the run's own error, without Dagster's wrapper or the stack."""
    with DagsterInstance.get() as instance:
        backfill_id = launch_asset_backfill(
            instance, [FCT_ORDERS], DAYS[0], DAYS[0], tags={"backfill_assets/max_shrink": "lots"}
        )
    with running_daemon(dagster_env, tmp_path / "daemon.log"):
        assert cli.main(["status", backfill_id, "--wait"]) == 1
    out = capsys.readouterr().out
    failure = next(line for line in out.splitlines() if line.startswith("  run "))
    assert "failed: " in failure and "max_shrink='lots' must be a fraction" in failure
    assert "Traceback" not in out and "DagsterExecutionStepExecutionError" not in out


BACKFILL_STATUS = """query ($id: String!) { partitionBackfillOrError(backfillId: $id) {
  ... on PartitionBackfill { isAssetBackfill assetBackfillData { assetBackfillStatuses {
    ... on AssetPartitionsStatusCounts { assetKey { path } numPartitionsTargeted
      numPartitionsMaterialized numPartitionsFailed } } } } } }"""


def test_launch_through_the_webserver_creates_a_backfill_the_ui_reports_per_partition(
    dagster_env, tmp_path, capsys
):
    with (
        running_webserver(dagster_env, tmp_path / "webserver.log") as url,
        running_daemon(dagster_env, tmp_path / "daemon.log"),
    ):
        args = ["launch", "--select", "analytics/fct_orders", "--from", DAYS[0], "--to", DAYS[-1]]
        assert cli.main([*args, "--webserver", url, "--json"]) == 0
        backfill_id = json.loads(capsys.readouterr().out)["backfill_id"]
        assert cli.main(["status", backfill_id, "--wait"]) == 0
        with DagsterInstance.get() as instance:
            closed(instance, backfill_id)  # the daemon's counts are final once it closed it
        answer = Webserver(url).execute(BACKFILL_STATUS, {"id": backfill_id})
        capsys.readouterr()
        assert cli.main(["launch", *args[1:], "--webserver", f"{url}/nowhere"]) == 2
        refused = capsys.readouterr().err

    backfill = answer["partitionBackfillOrError"]
    counts = backfill["assetBackfillData"]["assetBackfillStatuses"]
    assert backfill["isAssetBackfill"]
    assert counts == [
        {
            "assetKey": {"path": ["analytics", "fct_orders"]},
            "numPartitionsTargeted": 3,
            "numPartitionsMaterialized": 3,
            "numPartitionsFailed": 0,
        }
    ]
    assert f"{url}/nowhere" in refused and len(refused.strip().splitlines()) == 1
    with DagsterInstance.get() as instance:
        launched = instance.get_backfill(backfill_id)
        assert launched.user == launched.tags["backfill_assets/launched_by"], "'Launched by'"

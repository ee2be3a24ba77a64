"""`backfill-assets launch` and `status`: asset backfills from the command line, by the daemon."""

from __future__ import annotations

import pytest
from dagster import AssetKey, DagsterInstance
from support import failed_run_report

from backfill_assets.tooling import cli
from backfill_assets.tooling.launch import running_daemon

DAYS = ["2024-05-01", "2024-05-02", "2024-05-03"]
FCT_ORDERS = AssetKey(["analytics", "fct_orders"])
MARTS = [AssetKey(["analytics", "daily_revenue"]), AssetKey(["analytics", "customer_daily_orders"])]


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
        assert "status: COMPLETED_SUCCESS" in out and "0 failed" in out
        for key in (FCT_ORDERS, *MARTS):
            assert instance.get_materialized_partitions(key) == set(DAYS), key
        assert len(runs) == 1, "three days of the table and its marts fit one run"
    assert cli.main(["status", backfill_id]) == 0


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
    ],
    ids=["unknown", "source", "malformed", "reversed", "out-of-range", "bad-tags"],
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

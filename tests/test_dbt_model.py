"""The dbt models, built per partition through dagster-dbt against a real PostgreSQL."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from datetime import date, timedelta
from functools import cached_property

from dagster_dbt import DbtCliResource
from packaging import version
from support import (
    dbt_models,
    dbt_resource,
    fct_orders,
    materialize_days,
    plain_dbt_env,
    step_failure_message,
)

from backfill_assets.core.database import connect
from backfill_assets.core.registry import load_registry
from backfill_assets.core.settings import DEFAULT_DBT_PROJECT_DIR
from backfill_assets.defs.dbt import builds_dir
from backfill_assets.project import DBT_EXECUTABLE

DAYS = ["2024-04-01", "2024-04-02", "2024-04-03", "2024-04-04"]
MARTS = ("customer_daily_orders", "daily_revenue")

DBT_PAIRS = int(os.environ.get("BACKFILL_DBT_PAIRS", "4"))


def test_runs_know_the_dbt_version_without_asking_the_executable():
    """dagster-dbt runs ``dbt --version`` once per run unless its ``_cli_version`` is given, and
    loads an adapter the project does not use; the project overrides both. Fails when
    dagster-dbt renames either (the override would silently do nothing) or when the executable
    is another dbt than the one imported."""
    assert isinstance(vars(DbtCliResource).get("_cli_version"), cached_property), (
        "dagster-dbt no longer has DbtCliResource._cli_version: update defs/dbt.py InstalledDbt"
    )
    assert callable(vars(DbtCliResource).get("_initialize_dbt_core_adapter")), (
        "dagster-dbt no longer has DbtCliResource._initialize_dbt_core_adapter: update "
        "defs/dbt.py InstalledDbt"
    )
    asked = subprocess.run(
        [DBT_EXECUTABLE, "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert f"installed: {dbt_resource._cli_version}" in asked
    assert dbt_resource._cli_version > version.parse("1.0")


def daily_revenue(conn) -> dict:
    rows = conn.execute(
        "SELECT order_day::text, order_count, net_revenue, xmin::text FROM analytics.daily_revenue"
    ).fetchall()
    return {day: (count, revenue, xmin) for day, count, revenue, xmin in rows}


def mart_rows(conn, mart: str) -> list[tuple]:
    """Every row of a mart, in a stable order: what a rebuild must reproduce exactly."""
    return conn.execute(f"SELECT * FROM analytics.{mart} ORDER BY 1, 2").fetchall()


def build(assets, postgres, instance, first, last):
    """One run over first..last, as a backfill run of that range would be."""
    return materialize_days(postgres, instance, first, last, assets=assets)


def test_the_dbt_model_builds_the_partitions_of_a_run_downstream_of_fct_orders(
    postgres, instance, conn
):
    result = build([fct_orders, dbt_models], postgres, instance, DAYS[0], DAYS[-1])

    assert result.success
    built = sorted(
        (m.asset_key.path[-1], m.partition)
        for m in result.asset_materializations_for_node(dbt_models.node_def.name)
    )
    assert built == [(mart, day) for mart in MARTS for day in DAYS]
    expected = dict(
        conn.execute(
            "SELECT order_day::text, count(*) FROM analytics.fct_orders GROUP BY 1"
        ).fetchall()
    )
    assert {day: v[0] for day, v in daily_revenue(conn).items()} == expected


def test_customer_daily_orders_sums_each_customers_day_from_fct_orders(postgres, instance, conn):
    assert build([fct_orders, dbt_models], postgres, instance, DAYS[0], DAYS[-1]).success

    expected = conn.execute(
        "SELECT order_day, customer_id, count(*),"
        " count(*) FILTER (WHERE status = 'paid'),"
        " coalesce(sum(gross_amount) FILTER (WHERE status = 'paid'), 0)"
        " FROM analytics.fct_orders GROUP BY 1, 2 ORDER BY 1, 2"
    ).fetchall()
    assert expected, "the days hold orders"
    assert mart_rows(conn, "customer_daily_orders") == expected


def test_a_full_refresh_gives_the_same_rows_as_per_partition_builds(
    postgres, instance, conn, data_url, tmp_path
):
    assert build([fct_orders], postgres, instance, DAYS[0], DAYS[-1]).success
    # Per partition, in separate runs: one day, then the rest of the window.
    assert build([dbt_models], postgres, instance, DAYS[0], DAYS[0]).success
    assert build([dbt_models], postgres, instance, DAYS[1], DAYS[-1]).success
    per_partition = {m: mart_rows(conn, m) for m in MARTS}

    # dbt's own full refresh of the window: drops the tables and builds them in one go.
    end = (date.fromisoformat(DAYS[-1]) + timedelta(days=1)).isoformat()
    command = [DBT_EXECUTABLE, "run", "--full-refresh", "--target-path", str(tmp_path / "target")]
    completed = subprocess.run(
        [*command, "--event-time-start", DAYS[0], "--event-time-end", end],
        cwd=DEFAULT_DBT_PROJECT_DIR,
        env=plain_dbt_env(data_url),
        capture_output=True,
        text=True,
        check=False,
    )

    assert completed.returncode == 0, completed.stdout[-3000:]
    assert {m: mart_rows(conn, m) for m in per_partition} == per_partition
    assert all(per_partition.values())


def test_rebuilding_one_partition_changes_only_that_partitions_rows(postgres, instance, conn):
    assert build([fct_orders, dbt_models], postgres, instance, DAYS[0], DAYS[-1]).success
    before = daily_revenue(conn)
    # Every day's facts change, but only 2024-04-02 is rebuilt in the dbt model.
    conn.execute("UPDATE analytics.fct_orders SET net_amount = net_amount + 1")

    assert build([dbt_models], postgres, instance, "2024-04-02", "2024-04-02").success
    after = daily_revenue(conn)

    assert after["2024-04-02"][1] > before["2024-04-02"][1]
    assert after["2024-04-02"][2] != before["2024-04-02"][2]
    assert {d: v for d, v in after.items() if d != "2024-04-02"} == {
        d: v for d, v in before.items() if d != "2024-04-02"
    }


def test_the_second_build_on_a_database_starts_from_the_first_builds_parse(
    postgres, instance, conn
):
    """dbt reparses the whole project when its partial-parse file was written for another
    connection (the manifest is parsed without one): the first build on a database does, the
    next ones on it do not (``keep_partial_parse``)."""
    assert build([fct_orders, dbt_models], postgres, instance, DAYS[0], DAYS[1]).success
    assert build([dbt_models], postgres, instance, DAYS[1], DAYS[1]).success

    folder = builds_dir(load_registry(), postgres.resolved_url())
    logs = sorted(folder.glob("*/dbt.log"), key=lambda log: log.stat().st_mtime)
    assert len(logs) == 2
    reparsed = ["Unable to do partial parsing" in log.read_text() for log in logs]
    assert reparsed == [True, False]


def test_a_day_whose_facts_vanished_disappears_from_the_model(postgres, instance, conn):
    assert build([fct_orders, dbt_models], postgres, instance, DAYS[0], DAYS[-1]).success
    conn.execute("DELETE FROM analytics.fct_orders WHERE order_day = '2024-04-03'")

    assert build([dbt_models], postgres, instance, "2024-04-03", "2024-04-03").success

    assert sorted(daily_revenue(conn)) == ["2024-04-01", "2024-04-02", "2024-04-04"]


BUILD_IN_ITS_OWN_PROCESS = """
import sys
from dagster import materialize

from backfill_assets.core.registry import DEFAULT_TABLES_DIR, load_registry
from backfill_assets.defs.dbt import dbt_model_assets, installed_dbt
from backfill_assets.defs.resources import PostgresResource

url, first, last = sys.argv[1:]
(dbt_models,) = dbt_model_assets(load_registry([DEFAULT_TABLES_DIR]))
result = materialize(
    [dbt_models],
    resources={"postgres": PostgresResource(url=url), "dbt": installed_dbt()},
    tags={"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last},
    raise_on_error=False,
)
sys.exit(0 if result.success else 1)
"""


def test_two_runs_building_the_model_for_the_first_time_at_once_both_succeed(
    postgres, instance, conn, data_url
):
    """A backfill's runs reach the dbt step together; the table must be created by one of them.

    Without the first-build lock both find no table and one fails: relation already exists. The
    test makes the runs meet for sure: it locks the model's source, so each run stops at its
    first statement that reads it (or at the first-build lock) until both are waiting.
    Runs are separate processes, as the daemon launches them.
    """
    assert build([fct_orders], postgres, instance, "2024-06-01", "2024-06-10").success
    with connect(data_url) as blocker:
        blocker.execute("BEGIN")
        blocker.execute("LOCK TABLE analytics.fct_orders IN ACCESS EXCLUSIVE MODE")
        runs = [
            subprocess.Popen(
                [sys.executable, "-c", BUILD_IN_ITS_OWN_PROCESS, data_url, first, last],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for first, last in [("2024-06-01", "2024-06-07"), ("2024-06-08", "2024-06-10")]
        ]
        waiting = wait_for_lock_waiters(conn, len(runs), timeout_s=120)
        blocker.execute("COMMIT")
    outputs = [run.communicate(timeout=300)[0] for run in runs]

    assert waiting == len(runs), "the runs never met at the lock"
    assert [run.returncode for run in runs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert sorted(daily_revenue(conn)) == [f"2024-06-{day:02d}" for day in range(1, 11)]


def wait_for_lock_waiters(conn, count: int, *, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        waiting = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()[0]
        if waiting >= count or time.monotonic() > deadline:
            return waiting
        time.sleep(0.2)


def test_a_failing_dbt_build_names_model_window_and_error_and_keeps_the_old_rows(
    postgres, instance, conn
):
    assert build([fct_orders, dbt_models], postgres, instance, DAYS[0], DAYS[-1]).success
    before = {m: mart_rows(conn, m) for m in MARTS}
    # The models' SQL no longer matches their source: every batch fails in the database.
    conn.execute("ALTER TABLE analytics.fct_orders RENAME COLUMN gross_amount TO gross")

    result = build([dbt_models], postgres, instance, DAYS[1], DAYS[2])

    assert not result.success
    message = step_failure_message(result)
    assert "daily_revenue" in message and "customer_daily_orders" in message
    assert f"--event-time-start {DAYS[1]}" in message
    assert 'column "gross_amount" does not exist' in message
    assert {m: mart_rows(conn, m) for m in before} == before


def test_a_build_of_mart_days_another_build_holds_waits_for_it_then_matches_a_serial_build(
    postgres, instance, conn, data_url
):
    """Overlapping builds of existing marts: dbt's microbatch DELETE + INSERT of one day by two
    runs at once can duplicate (customer, day) keys. Each batch locks its model and day; here the
    test holds customer_daily_orders' 2024-06-03 as another build's batch would, and the build of
    2024-06-01..05 must wait for it rather than write beside it."""
    assert build([fct_orders], postgres, instance, "2024-06-01", "2024-06-07").success
    assert build([dbt_models], postgres, instance, "2024-06-01", "2024-06-07").success
    serial = {mart: mart_rows(conn, mart) for mart in MARTS}
    with connect(data_url) as other_build:
        other_build.execute(
            "SELECT pg_advisory_lock(hashtext('analytics.customer_daily_orders'), "
            "hashtext('2024-06-03'))"
        )
        run = subprocess.Popen(
            [sys.executable, "-c", BUILD_IN_ITS_OWN_PROCESS, data_url, "2024-06-01", "2024-06-05"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        waiting = wait_for_lock_waiters(conn, 1, timeout_s=120)
        time.sleep(2)
        still_running = run.poll() is None
    output = run.communicate(timeout=300)[0]

    assert waiting == 1 and still_running, output[-3000:]
    assert run.returncode == 0, output[-3000:]
    duplicated = conn.execute(
        "SELECT count(*) FROM (SELECT 1 FROM analytics.customer_daily_orders "
        "GROUP BY customer_id, order_day HAVING count(*) > 1) AS d"
    ).fetchone()[0]
    assert duplicated == 0
    assert {mart: mart_rows(conn, mart) for mart in MARTS} == serial


def test_every_asset_and_check_says_what_it_is_and_each_model_sits_in_its_schemas_group():
    from backfill_assets.core.registry import load_registry
    from backfill_assets.defs.definitions import build_definitions

    graph = build_definitions(load_registry(), check_sql=False).resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.description and not node.description.startswith("dbt model"), key
        assert node.group_name == key.path[0], (key, node.group_name)
    checks = graph.asset_check_keys
    assert [c.name for c in checks if not graph.get_check_spec(c).description] == []


def test_two_dbt_builds_of_the_same_days_outside_dagster_never_duplicate_a_row(
    postgres, instance, conn, data_url, tmp_path
):
    """`dbt build` by hand, in CI or beside a backfill: no Dagster step takes turns for it, so the
    marts' macro locks each batch's model and day itself. Seen before: duplicated rows in 6 of 10
    pairs, both builds reporting success. Each pair is made to meet: the source is locked until
    both builds wait on it, so their first batches of the same day run at the same moment.
    ``make test`` makes 4 pairs meet, ``make soak`` 20 (``BACKFILL_DBT_PAIRS``)."""
    first, last = "2024-06-01", "2024-06-03"
    assert build([fct_orders, dbt_models], postgres, instance, first, last).success
    serial = mart_rows(conn, "customer_daily_orders")
    command = [DBT_EXECUTABLE, "build", "--select", "customer_daily_orders"]
    command += ["--event-time-start", first, "--event-time-end", "2024-06-04"]
    # Parsed once: each build reads the same parse instead of parsing the project again.
    targets = [tmp_path / f"target{side}" for side in (1, 2)]
    subprocess.run(
        [DBT_EXECUTABLE, "parse", "--target-path", str(targets[0])],
        cwd=DEFAULT_DBT_PROJECT_DIR,
        env=plain_dbt_env(data_url),
        check=True,
        capture_output=True,
    )
    shutil.copytree(targets[0], targets[1])
    for pair in range(DBT_PAIRS):
        with connect(data_url) as blocker:
            blocker.execute("BEGIN")
            blocker.execute("LOCK TABLE analytics.fct_orders IN ACCESS EXCLUSIVE MODE")
            builds = [
                subprocess.Popen(
                    [*command, "--target-path", str(target)],
                    cwd=DEFAULT_DBT_PROJECT_DIR,
                    env=plain_dbt_env(data_url),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                for target in targets
            ]
            waiting = wait_for_lock_waiters(conn, len(builds), timeout_s=120)
            blocker.execute("COMMIT")
        outputs = [b.communicate(timeout=300)[0] for b in builds]
        assert waiting == len(builds), f"pair {pair}: the builds never met"
        assert [b.returncode for b in builds] == [0, 0], "\n".join(o[-3000:] for o in outputs)
        duplicated = conn.execute(
            "SELECT count(*) FROM (SELECT 1 FROM analytics.customer_daily_orders "
            "GROUP BY customer_id, order_day HAVING count(*) > 1) AS d"
        ).fetchone()[0]
        assert duplicated == 0, f"pair {pair}: {duplicated} duplicated (customer, day) keys"
        assert mart_rows(conn, "customer_daily_orders") == serial, f"pair {pair}"

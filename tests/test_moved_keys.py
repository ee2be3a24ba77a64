"""A key the source moved from one partition to another is never held twice.

The table is not the demo's: order lines shipped per day, keyed on (order_id, line_no), written
by each strategy that inserts rows. One line's ship date is corrected at the source, from one
day to another. Backfilling only the day it moved to would leave the key in both days with every
per-partition check green; it is refused instead, naming the key, how many there are and the
day holding them, and nothing is written. Backfilling both days passes: in one run (whichever
way the key moved) or in two runs, the day it left first.
"""

from __future__ import annotations

import pytest
from dagster import AssetKey
from support import (
    SHIPPED_LINES_SOURCE,
    declare_shipped_lines,
    latest_check,
    materialize_days,
    step_failure_message,
)

from backfill_assets.core import rollback, settings
from backfill_assets.core.audit import AuditTrail, RunInfo
from backfill_assets.core.params import params_for
from backfill_assets.core.registry import TABLES_PATH_ENV
from backfill_assets.core.run import RunHooks, RunResult, run_table
from backfill_assets.core.tables import TableSpec
from backfill_assets.defs.dagster_internals import AssetCheckExecutionRecordStatus
from backfill_assets.defs.table_assets import table_asset
from backfill_assets.tooling import cli

DAYS = ["2024-03-01", "2024-03-02", "2024-03-03"]
MOVED = (1003, 2)  # order 1003's second line, shipped on DAYS[0] at first
KEY = AssetKey(["sales", "shipped_lines"])


@pytest.fixture
def source(conn):
    conn.execute(SHIPPED_LINES_SOURCE)


def move(conn, to_day: str) -> None:
    conn.execute(
        "UPDATE shop.order_lines SET shipped_on = %s WHERE (order_id, line_no) = (%s, %s)",
        [to_day, *MOVED],
    )


def run(conn, data_url: str, table: TableSpec, days: list[str]) -> tuple[RunResult, list[str]]:
    """One run of ``days`` through the core's run entry (what the asset calls); its log lines."""
    lines: list[str] = []
    hooks = RunHooks(lines.append, lines.append, lines.append)
    info = RunInfo(None, None, "test", {})
    with AuditTrail(data_url) as audit:
        result = run_table(
            conn,
            audit,
            info,
            table,
            table.partitioning.windows(days),
            params_for(table, {}),
            hooks,
        )
    return result, lines


def holders(conn) -> list[str]:
    """The days holding the moved key."""
    rows = conn.execute(
        "SELECT shipped_on::text FROM sales.shipped_lines WHERE (order_id, line_no) = (%s, %s) "
        "ORDER BY 1",
        list(MOVED),
    ).fetchall()
    return [r[0] for r in rows]


def equals_source(conn) -> bool:
    return not conn.execute(
        "(SELECT * FROM sales.shipped_lines EXCEPT ALL SELECT * FROM shop.order_lines) UNION ALL "
        "(SELECT * FROM shop.order_lines EXCEPT ALL SELECT * FROM sales.shipped_lines)"
    ).fetchall()


STRATEGIES = ["delete_insert", "partition_swap", "merge"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_backfilling_only_the_day_a_key_moved_to_is_refused_naming_it_and_writes_nothing(
    strategy, source, conn, data_url, tmp_path
):
    table = declare_shipped_lines(tmp_path / "tables", strategy)
    run(conn, data_url, table, DAYS)
    before = conn.execute("SELECT count(*), sum(amount) FROM sales.shipped_lines").fetchone()
    move(conn, DAYS[1])

    result, lines = run(conn, data_url, table, [DAYS[1]])

    [outcome] = result.outcomes
    assert outcome.status == "failed" and outcome.held_by == (DAYS[0],)
    assert "1 value(s) of (order_id, line_no)" in outcome.error, outcome.error
    assert f"already held by {DAYS[0]}" in outcome.error and "(1003,2)" in outcome.error
    assert f"backfill {DAYS[0]} together with {DAYS[1]}" in outcome.error
    assert holders(conn) == [DAYS[0]], "the day it moved to was not written"
    assert conn.execute("SELECT count(*), sum(amount) FROM sales.shipped_lines").fetchone() == (
        before
    )
    assert not any("retried" in line for line in lines), "nothing in the run could free the key"


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("moved_to", [DAYS[1], DAYS[0]], ids=["to_a_later_day", "to_earlier"])
def test_one_run_over_both_days_moves_the_key_whichever_way_it_moved(
    strategy, moved_to, source, conn, data_url, tmp_path
):
    table = declare_shipped_lines(tmp_path / "tables", strategy)
    if moved_to == DAYS[0]:  # start from the key on the later day, then move it back
        move(conn, DAYS[1])
    run(conn, data_url, table, DAYS)
    left = DAYS[1] if moved_to == DAYS[0] else DAYS[0]
    assert holders(conn) == [left]
    move(conn, moved_to)

    result, lines = run(conn, data_url, table, DAYS[:2])

    assert result.complete, [o.error for o in result.failed]
    assert [o.window.key for o in result.outcomes] == (
        DAYS[:2] if moved_to == DAYS[1] else [DAYS[1], DAYS[0]]
    ), "a day whose key is still held by a later day of the run is written after it"
    assert holders(conn) == [moved_to] and equals_source(conn)
    retried = [line for line in lines if "retried after them" in line]
    assert len(retried) == (moved_to == DAYS[0]), lines


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_runs_the_day_the_key_left_first_then_the_day_it_moved_to(
    strategy, source, conn, data_url, tmp_path
):
    table = declare_shipped_lines(tmp_path / "tables", strategy)
    run(conn, data_url, table, DAYS)
    move(conn, DAYS[2])

    first, _ = run(conn, data_url, table, [DAYS[0]])
    assert first.complete and holders(conn) == []
    second, _ = run(conn, data_url, table, [DAYS[2]])
    assert second.complete and holders(conn) == [DAYS[2]] and equals_source(conn)


def test_the_refusal_reaches_dagster_as_a_failed_key_check_and_the_covering_backfill_passes(
    source, conn, postgres, instance, tmp_path
):
    table = declare_shipped_lines(tmp_path / "tables", "delete_insert")
    asset = [table_asset(table)]

    assert materialize_days(postgres, instance, DAYS[0], DAYS[2], assets=asset).success
    move(conn, DAYS[1])

    refused = materialize_days(postgres, instance, DAYS[1], assets=asset)
    assert not refused.success
    message = step_failure_message(refused)
    assert f"already held by {DAYS[0]}" in message and "(1003,2)" in message, message
    check = latest_check(instance, "unique_key_is_unique", DAYS[1], asset_key=KEY)
    assert check.status == AssetCheckExecutionRecordStatus.FAILED
    evaluation = check.event.asset_check_evaluation
    assert evaluation.metadata["keys_in_other_partitions"].value == 1
    assert evaluation.metadata["other_partitions"].value == DAYS[0]
    assert holders(conn) == [DAYS[0]]

    assert materialize_days(postgres, instance, DAYS[0], DAYS[1], assets=asset).success
    assert holders(conn) == [DAYS[1]] and equals_source(conn)


def test_tables_reports_keys_an_existing_table_holds_in_two_partitions(
    source, conn, data_url, tmp_path, monkeypatch, capsys
):
    folder = tmp_path / "tables"
    table = declare_shipped_lines(folder, "delete_insert")
    run(conn, data_url, table, DAYS)
    monkeypatch.setenv(TABLES_PATH_ENV, str(folder))
    monkeypatch.setenv(settings.DATA_URL_ENV, data_url)
    assert cli.main(["tables"]) == 0
    assert "keys: unique across partitions" in capsys.readouterr().out

    # Written before the lookup existed, or by hand: the key in two days.
    conn.execute(
        "INSERT INTO sales.shipped_lines SELECT order_id, line_no, %s, amount "
        "FROM sales.shipped_lines WHERE (order_id, line_no) = (%s, %s)",
        [DAYS[2], *MOVED],
    )
    assert cli.main(["tables"]) == 1
    out = capsys.readouterr().out
    assert "1 value(s) of (order_id, line_no) are held by more than one partition" in out, out
    assert "(1003,2)" in out and f"in {DAYS[0]}, {DAYS[2]}" in out


@pytest.mark.parametrize("strategy", ["delete_insert", "partition_swap"])
def test_a_rollback_that_would_put_a_moved_key_back_beside_its_new_day_is_refused(
    strategy, source, conn, data_url, tmp_path
):
    table = declare_shipped_lines(tmp_path / "tables", strategy)
    run(conn, data_url, table, DAYS)
    move(conn, DAYS[1])
    assert run(conn, data_url, table, DAYS[:2])[0].complete
    before = conn.execute("SELECT count(*), sum(amount) FROM sales.shipped_lines").fetchone()
    info = RunInfo(None, None, "test", {})

    with AuditTrail(data_url) as audit, pytest.raises(rollback.RollbackError) as refused:
        rollback.restore(conn, audit, info, [rollback.snapshot_of_partition(conn, table, DAYS[0])])
    assert f"{DAYS[1]} hold(s) now (e.g. (1003,2))" in str(refused.value), refused.value
    assert "Nothing was restored" in str(refused.value)
    assert holders(conn) == [DAYS[1]]
    assert conn.execute("SELECT count(*), sum(amount) FROM sales.shipped_lines").fetchone() == (
        before
    )

    # Both days' writes undone together: the key is back in the day it left, once.
    refs = [rollback.snapshot_of_partition(conn, table, day) for day in DAYS[:2]]
    with AuditTrail(data_url) as audit:
        rollback.restore(conn, audit, info, refs)
    assert holders(conn) == [DAYS[0]]

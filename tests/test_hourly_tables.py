"""``every: hour``: partitions of one UTC hour, the same in Dagster and in the writer.

An hourly table (order lines by the hour they shipped, a ``timestamptz`` column) is backfilled
through real Dagster runs in a database whose sessions run in Asia/Kolkata (UTC+05:30, an offset
that is no whole hour), by each strategy that replaces partitions: each hour is replaced whole
with exactly the rows of its UTC hour, its checks are recorded on the hour's key, and a rollback
restores the hour from its snapshot. A key not on the hour or outside the range, or a
declaration that does not start on an hour, is refused naming the value to use.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from dagster import AssetKey, HourlyPartitionsDefinition, materialize
from support import declare_shipped_lines, latest_check

from backfill_assets.core import rollback
from backfill_assets.core.audit import AuditTrail, RunInfo
from backfill_assets.core.erasure import SubjectRelation, subject_rows
from backfill_assets.core.guards import source_stats_all
from backfill_assets.core.params import params_for
from backfill_assets.core.partitioning import Partitioning, UnknownPartitionError
from backfill_assets.core.registry import DeclarationError, load_registry
from backfill_assets.core.run import RunHooks, run_table
from backfill_assets.core.staleness import staleness
from backfill_assets.defs.checks import CHECKS
from backfill_assets.defs.dagster_internals import AssetCheckExecutionRecordStatus
from backfill_assets.defs.partitions import partitions_def
from backfill_assets.defs.table_assets import table_asset

KEY = AssetKey(["sales", "shipped_lines"])
HOURS = ["2024-03-01-10:00", "2024-03-01-11:00", "2024-03-01-12:00"]
HOURLY = (
    "partitions: {column: shipped_at, every: hour, start: '2024-03-01 00:00', "
    "end: '2024-03-02 00:00'}\n"
)
# Lines shipped 10:00..12:59 UTC, one line just before and one just after those hours.
HOURLY_SOURCE = """
CREATE SCHEMA shop;
CREATE TABLE shop.order_lines (
    order_id bigint NOT NULL, line_no int NOT NULL, shipped_at timestamptz NOT NULL,
    amount numeric(12,2) NOT NULL, PRIMARY KEY (order_id, line_no));
INSERT INTO shop.order_lines
SELECT 1000 + o, l, TIMESTAMPTZ '2024-03-01 10:00:00+00' + (o % 3) * interval '1 hour'
       + (o * 59 % 60) * interval '1 minute', (o * 10 + l)::numeric
FROM generate_series(0, 59) AS o, generate_series(1, 3) AS l;
INSERT INTO shop.order_lines VALUES (1, 1, '2024-03-01 09:59:59.999+00', 1),
                                    (2, 1, '2024-03-01 13:00:00+00', 1);
"""
PER_HOUR = (
    "SELECT to_char(date_trunc('hour', shipped_at AT TIME ZONE 'UTC'), 'YYYY-MM-DD-HH24:MI'), "
    "count(*), sum(amount) FROM {} GROUP BY 1 ORDER BY 1"
)


def hourly(
    folder,
    column_type: str = "timestamptz not null",
    partitions: str = HOURLY,
    strategy: str = "delete_insert",
):
    table = declare_shipped_lines(folder, strategy=strategy)
    declaration = folder / "shipped_lines.yaml"
    lines = []
    for line in declaration.read_text().splitlines():
        if line.startswith("partitions:"):
            line = partitions.rstrip("\n")
        elif "shipped_on: date" in line:
            line = f"  shipped_at: {column_type}"
        lines.append(line + "\n")
    declaration.write_text("".join(lines))
    (folder / "shipped_lines.sql").write_text(
        "SELECT order_id, line_no, shipped_at, amount FROM shop.order_lines\n"
        "WHERE shipped_at >= %(start)s AND shipped_at < %(end)s\n"
    )
    table = load_registry([folder]).table(table.qualified_name)
    assert table.partitioning.granularity == "hour"
    return table


def per_hour(conn, relation: str) -> dict[str, tuple]:
    return {hour: tuple(rest) for hour, *rest in conn.execute(PER_HOUR.format(relation)).fetchall()}


@pytest.mark.parametrize("strategy", ["delete_insert", "partition_swap", "merge"])
def test_an_hourly_table_is_written_hour_by_hour_in_utc_with_its_checks_on_the_hours_key(
    conn, data_url, postgres, instance, tmp_path, strategy
):
    conn.execute(HOURLY_SOURCE)
    database = conn.execute("SELECT current_database()").fetchone()[0]
    conn.execute(f"ALTER DATABASE \"{database}\" SET timezone = 'Asia/Kolkata'")
    table = hourly(tmp_path / "tables", strategy=strategy)
    asset = table_asset(table)

    result = materialize(
        [asset],
        resources={"postgres": postgres},
        instance=instance,
        tags={
            "dagster/asset_partition_range_start": HOURS[0],
            "dagster/asset_partition_range_end": HOURS[-1],
        },
        raise_on_error=False,
    )

    assert result.success
    source = per_hour(conn, "shop.order_lines")
    written = per_hour(conn, "sales.shipped_lines")
    assert written == {hour: source[hour] for hour in HOURS}, "exactly the UTC hours' rows"
    for hour in HOURS:
        for check in CHECKS:
            record = latest_check(instance, check.name, hour, asset_key=KEY)
            assert record.status == AssetCheckExecutionRecordStatus.SUCCEEDED, (check, hour)

    # One hour rewritten after its source changed: that hour replaced whole, the others kept.
    conn.execute("DELETE FROM shop.order_lines WHERE order_id % 2 = 0")
    conn.execute("UPDATE shop.order_lines SET amount = amount + 1")
    rerun = materialize(
        [asset],
        resources={"postgres": postgres},
        instance=instance,
        partition_key=HOURS[1],
        tags={"backfill_assets/allow_shrink": "true"},
        raise_on_error=False,
    )
    assert rerun.success
    now = per_hour(conn, "sales.shipped_lines")
    assert now == {**written, HOURS[1]: per_hour(conn, "shop.order_lines")[HOURS[1]]}
    assert now[HOURS[1]] != written[HOURS[1]]

    # Rolled back from the hour's snapshot: the hour holds its first rows again.
    with AuditTrail(data_url) as audit:
        ref = rollback.snapshot_of_partition(conn, table, HOURS[1])
        rollback.restore(conn, audit, RunInfo(None, None, "test", {}), [ref])
    assert per_hour(conn, "sales.shipped_lines") == written


def test_an_hours_bounds_select_its_utc_hour_whatever_the_sessions_time_zone(conn, tmp_path):
    conn.execute(HOURLY_SOURCE)
    conn.execute("SET timezone = 'America/St_Johns'")  # UTC-03:30
    naive = hourly(tmp_path / "naive", column_type="timestamp not null").partitioning
    zoned = hourly(tmp_path / "zoned").partitioning
    assert naive.window(HOURS[1]).start == datetime(2024, 3, 1, 11)
    assert zoned.window(HOURS[1]).start == datetime(2024, 3, 1, 11, tzinfo=UTC)
    expected = per_hour(conn, "shop.order_lines")
    for partitioning, column in (
        (naive, "shipped_at AT TIME ZONE 'UTC'"),  # the column as a timestamp table holds it
        (zoned, "shipped_at"),
    ):
        for hour in [HOURS[0], "2024-03-01-09:00", "2024-03-01-13:00"]:
            rows = conn.execute(
                f"SELECT count(*), sum(amount) FROM shop.order_lines "
                f"WHERE {column} >= %(start)s AND {column} < %(end)s",
                partitioning.window(hour).as_params(),
            ).fetchone()
            assert rows == expected[hour], (partitioning.zoned, hour)


def test_the_writers_hours_are_dagsters_hours(tmp_path):
    table = hourly(tmp_path / "tables")
    dagster = partitions_def(table.partitioning)
    assert isinstance(dagster, HourlyPartitionsDefinition)
    assert table.partitioning.all_keys() == dagster.get_partition_keys()
    assert len(dagster.get_partition_keys()) == 24
    assert table.partitioning.keys_between(HOURS[0], HOURS[-1]) == HOURS
    for key in HOURS:
        window = dagster.time_window_for_partition_key(key)
        mine = table.partitioning.window(key)
        assert (mine.start, mine.end) == (window.start, window.end)
    open_ended = Partitioning("shipped_at", "hour", datetime(2024, 3, 1))
    last = open_ended.last_key()
    assert last == partitions_def(open_ended).get_last_partition_key()


def test_a_key_not_on_the_hour_or_outside_the_range_is_refused_naming_the_key(tmp_path):
    table = hourly(tmp_path / "tables")
    with pytest.raises(UnknownPartitionError, match="pick 2024-03-01-11:00"):
        table.partitioning.window("2024-03-01-11:30")
    with pytest.raises(UnknownPartitionError) as outside:
        table.partitioning.window("2024-03-02-00:00")
    assert "hourly partitions from 2024-03-01-00:00 to 2024-03-01-23:00" in str(outside.value)
    with pytest.raises(UnknownPartitionError, match="keys look like 2024-03-01-00:00"):
        table.partitioning.window("2024-03-01")


def test_an_hourly_declaration_off_the_hour_or_on_a_date_column_is_refused(tmp_path):
    off = HOURLY.replace("'2024-03-01 00:00'", "'2024-03-01 10:15'")
    with pytest.raises(DeclarationError) as refused:
        hourly(tmp_path / "off", partitions=off)
    assert "start 2024-03-01 10:15:00 is not the start of an hour" in str(refused.value)
    assert "e.g. 2024-03-01-10:00" in str(refused.value)

    with pytest.raises(DeclarationError) as on_date:
        hourly(tmp_path / "date", column_type="date not null")
    assert "shipped_at is date, but hourly partitions need a timestamp" in str(on_date.value)


def run_hours(conn, data_url: str, table, hours: list[str]):
    """One run of ``hours`` through the core's run entry (what the asset calls)."""
    hooks = RunHooks(print, print, print)
    with AuditTrail(data_url) as audit:
        return run_table(
            conn,
            audit,
            RunInfo(None, None, "test", {}),
            table,
            table.partitioning.windows(hours),
            params_for(table, {}),
            hooks,
        )


def test_a_key_moved_to_another_hour_is_refused_naming_the_hour_that_holds_it(
    conn, data_url, tmp_path
):
    conn.execute(HOURLY_SOURCE)
    conn.execute("SET timezone = 'Asia/Kolkata'")
    table = hourly(tmp_path / "tables")
    assert run_hours(conn, data_url, table, HOURS).complete
    conn.execute(
        "UPDATE shop.order_lines SET shipped_at = shipped_at + interval '1 hour' "
        "WHERE (order_id, line_no) = (1000, 1)"  # from 10:00 UTC to 11:00 UTC
    )

    [outcome] = run_hours(conn, data_url, table, [HOURS[1]]).outcomes

    assert outcome.status == "failed" and outcome.held_by == (HOURS[0],), outcome.error
    assert f"backfill {HOURS[0]} together with {HOURS[1]}" in outcome.error


def test_an_erasure_counts_a_persons_rows_per_utc_hour(conn, tmp_path):
    conn.execute(HOURLY_SOURCE)
    conn.execute("SET timezone = 'Asia/Kolkata'")
    table = hourly(tmp_path / "tables")
    relation = SubjectRelation("shop", "order_lines", "order_id", "shipped_at")

    rows = subject_rows(conn, relation, "1001", table.partitioning)

    assert rows == {HOURS[1]: 3}  # order 1001's three lines ship at 11:59 UTC
    assert all(table.partitioning.contains_key(key) for key in rows)

    # Each relation's hours by its own column's type: a table of UTC wall-clock times (a
    # timestamp) whose mart holds timestamptz values counts the mart's rows in UTC hours too.
    naive = hourly(tmp_path / "naive", column_type="timestamp not null").partitioning
    assert not naive.zoned
    assert subject_rows(conn, relation, "1031", naive) == {HOURS[1]: 3}  # 11:29 UTC


def test_three_years_of_hours_are_measured_though_a_statement_binds_at_most_65535_values(
    conn, tmp_path
):
    """26,304 hourly windows, three bound values each: more than one statement can carry. The
    guard's measure and ``stale``'s comparison of every hour answer, and agree with the rows."""
    conn.execute(HOURLY_SOURCE)
    years = "partitions: {column: shipped_at, every: hour, start: 2022-01-01, end: 2025-01-01}\n"
    table = hourly(tmp_path / "tables", partitions=years)
    windows = table.partitioning.windows(table.partitioning.all_keys())
    assert len(windows) * 3 > 65535

    measured = source_stats_all(conn, table, windows)
    stale = staleness(conn, table, windows)

    expected = dict(
        (key, rows) for key, rows, _ in conn.execute(PER_HOUR.format("shop.order_lines"))
    )
    assert {k: s.rows for k, s in measured.items() if s.rows} == expected
    assert len(stale) == len(windows)
    assert {s.partition_key: s.source_rows for s in stale if s.source_rows} == expected

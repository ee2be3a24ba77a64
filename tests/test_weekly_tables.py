"""``every: week``: partitions of seven days from a Monday, the same in Dagster and in the writer.

A weekly table (order lines by the week they shipped) is backfilled through a real Dagster run:
each week replaced whole, its checks recorded on the week's key; a key that is not a Monday, or a
declaration that does not start on one, is refused naming the Monday to use.
"""

from __future__ import annotations

from datetime import date

import pytest
from dagster import AssetKey, materialize
from support import SHIPPED_LINES_SOURCE, declare_shipped_lines, latest_check

from backfill_assets.core.partitioning import UnknownPartitionError
from backfill_assets.core.registry import DeclarationError, load_registry
from backfill_assets.defs.checks import CHECKS
from backfill_assets.defs.dagster_internals import AssetCheckExecutionRecordStatus
from backfill_assets.defs.partitions import partitions_def
from backfill_assets.defs.table_assets import table_asset

KEY = AssetKey(["sales", "shipped_lines"])
WEEKS = ["2024-02-26", "2024-03-04"]  # Mondays; the source ships on 2024-03-01..03 and 03-04
WEEKLY = "partitions: {column: shipped_on, every: week, start: 2024-01-01, end: 2025-01-06}\n"


def weekly(folder):
    table = declare_shipped_lines(folder)
    declaration = folder / "shipped_lines.yaml"
    lines = [
        WEEKLY if line.startswith("partitions:") else line + "\n"
        for line in declaration.read_text().splitlines()
    ]
    declaration.write_text("".join(lines))
    table = load_registry([folder]).table(table.qualified_name)
    assert table.partitioning.granularity == "week"
    return table


def test_a_weekly_table_is_written_week_by_week_with_its_checks_on_the_weeks_key(
    conn, postgres, instance, tmp_path
):
    conn.execute(SHIPPED_LINES_SOURCE)
    conn.execute("UPDATE shop.order_lines SET shipped_on = '2024-03-04' WHERE order_id % 5 = 0")
    table = weekly(tmp_path / "tables")
    keys = partitions_def(table.partitioning).get_partition_keys()
    assert keys[:2] == ["2024-01-01", "2024-01-08"] and keys[-1] == "2024-12-30"
    assert table.partitioning.all_keys() == keys, "the writer's weeks are Dagster's"

    result = materialize(
        [table_asset(table)],
        resources={"postgres": postgres},
        instance=instance,
        tags={
            "dagster/asset_partition_range_start": WEEKS[0],
            "dagster/asset_partition_range_end": WEEKS[1],
        },
        raise_on_error=False,
    )

    assert result.success
    per_week = dict(
        conn.execute(
            "SELECT date_trunc('week', shipped_on)::date, count(*) FROM sales.shipped_lines "
            "GROUP BY 1 ORDER BY 1"
        ).fetchall()
    )
    source = dict(
        conn.execute(
            "SELECT date_trunc('week', shipped_on)::date, count(*) FROM shop.order_lines "
            "GROUP BY 1 ORDER BY 1"
        ).fetchall()
    )
    assert per_week == source and set(per_week) == {date(2024, 2, 26), date(2024, 3, 4)}
    for week in WEEKS:
        for check in CHECKS:
            record = latest_check(instance, check.name, week, asset_key=KEY)
            assert record.status == AssetCheckExecutionRecordStatus.SUCCEEDED, (check, week)


def test_a_week_that_does_not_start_on_a_monday_is_refused_naming_the_monday(tmp_path):
    table = weekly(tmp_path / "tables")
    with pytest.raises(UnknownPartitionError, match="pick 2024-02-26"):
        table.partitioning.window("2024-02-28")

    declaration = tmp_path / "tables" / "shipped_lines.yaml"
    text = declaration.read_text()
    declaration.write_text(text.replace("start: 2024-01-01", "start: 2024-01-03"))
    with pytest.raises(DeclarationError) as refused:
        load_registry([tmp_path / "tables"])
    assert "start 2024-01-03 is not a Monday" in str(refused.value)
    assert "e.g. 2024-01-01" in str(refused.value)

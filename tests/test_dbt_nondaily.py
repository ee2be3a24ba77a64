"""dbt models on monthly and hourly tables, built per partition through real Dagster runs.

The models live in a small dbt project of their own (``tests/dbt_nondaily``: a microbatch model
per month of a monthly table, one per hour of an hourly table) so that the demo's dbt project and
every other test stay as they are. Each run is one dbt invocation over the run's window; a
failing dbt test fails only the partition holding the bad row.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from dagster import AssetKey, materialize
from support import declare_shipped_lines, latest_check

from backfill_assets.core.registry import DeclarationError, Registry, load_registry
from backfill_assets.core.settings import DBT_PROJECT_ENV
from backfill_assets.defs.dagster_internals import AssetCheckExecutionRecordStatus
from backfill_assets.defs.dbt import dbt_model_assets, installed_dbt
from backfill_assets.defs.dbt_windows import check_batch_sizes
from backfill_assets.defs.table_assets import table_asset
from backfill_assets.project import ensure_manifest

PROJECT = Path(__file__).parent / "dbt_nondaily"
MONTHS = ["2024-01-01", "2024-02-01", "2024-03-01"]
HOURS = ["2024-03-01-10:00", "2024-03-01-11:00", "2024-03-01-12:00"]
PASSED = AssetCheckExecutionRecordStatus.SUCCEEDED
FAILED = AssetCheckExecutionRecordStatus.FAILED

# Lines shipped 2024-01-10..2024-03-29; one negative amount on 2024-02-14 (a bad row).
MONTHLY_SOURCE = """
CREATE SCHEMA shop;
CREATE TABLE shop.order_lines (
    order_id bigint NOT NULL, line_no int NOT NULL, shipped_on date NOT NULL,
    amount numeric(12,2) NOT NULL, PRIMARY KEY (order_id, line_no));
INSERT INTO shop.order_lines
SELECT 1000 + o, l, DATE '2024-01-10' + (o * 7 % 80), (o * 10 + l)::numeric
FROM generate_series(0, 59) AS o, generate_series(1, 2) AS l;
INSERT INTO shop.order_lines VALUES (1, 1, '2024-02-14', -5);
"""
HOURLY_SOURCE = """
CREATE TABLE shop.hourly_lines (
    order_id bigint NOT NULL, line_no int NOT NULL, shipped_at timestamptz NOT NULL,
    amount numeric(12,2) NOT NULL, PRIMARY KEY (order_id, line_no));
INSERT INTO shop.hourly_lines
SELECT 1000 + o, l, TIMESTAMPTZ '2024-03-01 10:00+00' + (o * 7 % 180) * interval '1 minute',
       (o * 10 + l)::numeric
FROM generate_series(0, 59) AS o, generate_series(1, 2) AS l;
INSERT INTO shop.hourly_lines VALUES (1, 1, '2024-03-01 11:59:59+00', -5);
"""


def declare(folder: Path) -> Registry:
    """``sales.shipped_lines`` monthly, and ``sales.shipped_hourly`` (a timestamptz column)."""
    declare_shipped_lines(folder)
    path = folder / "shipped_lines.yaml"
    path.write_text(
        path.read_text().replace("every: day, start: 2024-01-01", "every: month, start: 2024-01-01")
    )
    (folder / "shipped_hourly.sql").write_text(
        "SELECT order_id, line_no, shipped_at, amount FROM shop.hourly_lines\n"
        "WHERE shipped_at >= %(start)s AND shipped_at < %(end)s\n"
    )
    (folder / "shipped_hourly.yaml").write_text(
        textwrap.dedent(
            """\
            table: sales.shipped_hourly
            upstream: [shop.hourly_lines]
            partitions: {column: shipped_at, every: hour, start: 2024-03-01, end: 2024-03-02}
            columns:
              order_id: bigint not null
              line_no: integer not null
              shipped_at: timestamptz not null
              amount: numeric(12,2) not null
            unique_key: [order_id, line_no]
            measures: [amount]
            """
        )
    )
    return load_registry([folder])


def model_assets(registry: Registry, granularity: str, monkeypatch):
    """The test project's models of one granularity, as the definitions build a user's project's
    (``BACKFILL_DBT_PROJECT``)."""
    monkeypatch.setenv(DBT_PROJECT_ENV, str(PROJECT))
    (models,) = [
        assets
        for assets in dbt_model_assets(registry)
        if assets.partitions_def is not None and granularity in assets.op.name
    ]
    return models


def build(postgres, instance, assets, first: str, last: str):
    return materialize(
        assets,
        resources={"postgres": postgres, "dbt": installed_dbt()},
        instance=instance,
        tags={
            "dagster/asset_partition_range_start": first,
            "dagster/asset_partition_range_end": last,
        },
        raise_on_error=False,
    )


def test_a_model_on_a_monthly_table_builds_each_month_and_fails_only_the_bad_rows_month(
    conn, postgres, instance, tmp_path, monkeypatch
):
    conn.execute(MONTHLY_SOURCE)
    registry = declare(tmp_path / "tables")
    table = registry.table("sales.shipped_lines")
    models = model_assets(registry, "month", monkeypatch)

    result = build(postgres, instance, [table_asset(table), models], MONTHS[0], MONTHS[-1])

    built = sorted(m.partition for m in result.asset_materializations_for_node(models.op.name))
    assert built == MONTHS, "one materialization per month, from one dbt invocation"
    recomputed = conn.execute(
        "SELECT shipped_on, count(*), sum(amount), min(amount) FROM shop.order_lines "
        "GROUP BY 1 ORDER BY 1"
    ).fetchall()
    mart = conn.execute("SELECT * FROM reports.lines_per_day ORDER BY 1").fetchall()
    assert mart == recomputed
    key = AssetKey(["reports", "lines_per_day"])
    statuses = {
        month: latest_check(instance, "day_amounts_positive", month, asset_key=key).status
        for month in MONTHS
    }
    assert statuses == {"2024-01-01": PASSED, "2024-02-01": FAILED, "2024-03-01": PASSED}


def test_a_model_on_an_hourly_table_builds_each_utc_hour_and_fails_only_the_bad_rows_hour(
    conn, postgres, instance, tmp_path, monkeypatch
):
    conn.execute(MONTHLY_SOURCE + HOURLY_SOURCE)
    database = conn.execute("SELECT current_database()").fetchone()[0]
    conn.execute(f"ALTER DATABASE \"{database}\" SET timezone = 'Asia/Kolkata'")
    registry = declare(tmp_path / "tables")
    table = registry.table("sales.shipped_hourly")
    models = model_assets(registry, "hour", monkeypatch)

    result = build(postgres, instance, [table_asset(table), models], HOURS[0], HOURS[-1])

    built = sorted(m.partition for m in result.asset_materializations_for_node(models.op.name))
    assert built == HOURS
    hour = "date_trunc('hour', shipped_at, 'UTC')"
    recomputed = conn.execute(
        f"SELECT {hour}, count(*), sum(amount), min(amount) FROM shop.hourly_lines "
        "GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert conn.execute("SELECT * FROM reports.lines_per_hour ORDER BY 1").fetchall() == recomputed
    key = AssetKey(["reports", "lines_per_hour"])
    statuses = {
        h: latest_check(instance, "hour_amounts_positive", h, asset_key=key).status for h in HOURS
    }
    assert statuses == {HOURS[0]: PASSED, HOURS[1]: FAILED, HOURS[2]: PASSED}


def test_a_model_whose_batches_are_coarser_than_its_tables_partitions_is_refused(
    tmp_path, monkeypatch
):
    registry = declare(tmp_path / "tables")
    monkeypatch.setenv(DBT_PROJECT_ENV, str(PROJECT))
    manifest = ensure_manifest(registry)
    weekly = registry.table("sales.shipped_lines").partitioning
    weekly = type(weekly)(weekly.column, "week", weekly.start.replace(day=1), None)
    with pytest.raises(DeclarationError) as refused:
        check_batch_sizes(manifest, ["lines_per_day"], weekly)
    assert "lines_per_day has batch_size='month'" in str(refused.value)
    assert "weeks are no dbt batch size" in str(refused.value)
    assert "set batch_size='day'" in str(refused.value)

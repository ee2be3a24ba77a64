"""Table declarations: read from YAML, every mistake named with its file and field, and
partitions that agree with Dagster's."""

from __future__ import annotations

import shutil
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from dagster import TimeWindowPartitionsDefinition

from backfill_assets.core.partitioning import Partitioning, UnknownPartitionError
from backfill_assets.core.registry import DEFAULT_TABLES_DIR, DeclarationError, load_registry
from backfill_assets.core.tables import Timeouts
from backfill_assets.defs.partitions import partitions_def

OWN_TABLES = Path(__file__).parent / "own_tables"
MONTH_AGO = datetime.now(UTC).date() - timedelta(days=40)


@pytest.mark.parametrize(
    "partitioning",
    [
        Partitioning("day", "day", date(2024, 1, 1), date(2025, 1, 1)),
        Partitioning("day", "month", date(1995, 1, 1), date(1997, 1, 1)),
        Partitioning("day", "day", MONTH_AGO),
        Partitioning("day", "month", date(2023, 11, 1)),
    ],
    ids=["daily-closed", "monthly-closed", "daily-open", "monthly-open"],
)
def test_a_tables_partition_keys_are_the_ones_dagster_offers(partitioning):
    definition: TimeWindowPartitionsDefinition = partitions_def(partitioning)
    keys = definition.get_partition_keys()

    assert partitioning.all_keys() == keys
    assert partitioning.last_key() == definition.get_last_partition_key()
    for key in keys[:3] + keys[-3:]:
        window = definition.time_window_for_partition_key(key)
        ours = partitioning.window(key)
        assert (ours.start, ours.end) == (window.start.date(), window.end.date())


def test_the_demo_table_keeps_its_2024_range():
    table = load_registry([DEFAULT_TABLES_DIR]).table("analytics.fct_orders")
    assert table.partitioning.describe() == "daily partitions from 2024-01-01 to 2024-12-31"
    assert len(table.partitioning.all_keys()) == 366


def _declaration(tmp_path: Path, replace: tuple[str, str] | None = None) -> Path:
    folder = tmp_path / "tables"
    folder.mkdir(exist_ok=True)
    shutil.copy(OWN_TABLES / "shipped_lines.sql", folder)
    text = (OWN_TABLES / "shipped_lines.yaml").read_text()
    if replace:
        assert replace[0] in text
        text = text.replace(*replace)
    (folder / "shipped_lines.yaml").write_text(text)
    return folder


def test_a_declaration_becomes_a_spec_with_its_own_partitions(tmp_path):
    table = load_registry([_declaration(tmp_path)]).table("reporting.shipped_lines")

    assert table.unique_key == ("order_no", "line_no")
    assert table.partitioning == Partitioning(
        "ship_date", "month", date(1995, 1, 1), date(1997, 1, 1)
    )
    assert table.required_columns == table.column_names
    assert [c.check for c in table.columns if c.check] == ["net_price >= 0"]
    assert table.upstream == ("legacy.order_lines",)
    assert table.timeouts == Timeouts(lock_ms=5_000, statement_ms=1_800_000, lock_retries=8)


def test_timeouts_are_read_in_any_unit_of_a_duration(tmp_path):
    declared = "timeouts: {lock: 250ms, statement: 2min, lock_retries: 3}\npartitions:"
    folder = _declaration(tmp_path, ("partitions:", declared))

    table = load_registry([folder]).table("reporting.shipped_lines")

    assert table.timeouts == Timeouts(lock_ms=250, statement_ms=120_000, lock_retries=3)


@pytest.mark.parametrize(
    ("replace", "message"),
    [
        (("unique_key:", "unique_kee:"), "unknown key(s) unique_kee in the file; allowed: table"),
        (("[order_no, line_no]", "[order_no, line]"), "unique_key: line not among the columns"),
        (("column: ship_date", "column: shipped_on"), "partitions.column: shipped_on not among"),
        (
            ("every: month", "every: minute"),
            "partitions.every: 'minute' is not one of hour, day, week, month",
        ),
        (("start: 1995-01-01", "start: 1995-01-15"), "start 1995-01-15 is not the first day"),
        (("end: 1997-01-01", "end: 1994-01-01"), "end 1994-01-01 must come after start"),
        (("table: reporting.shipped_lines", "table: shipped_lines"), "is not schema.table"),
        (("measures: [quantity, net_price]", "measures: [qty]"), "measures: qty not among"),
        (("  order_no: bigint not null\n", "  order_no: {typ: bigint}\n"), "columns.order_no"),
        (("upstream: [legacy.order_lines]\n", "sql: missing.sql\n"), "missing.sql does not exist"),
        (("partitions:", "thresholds: {max_shrink: 2}\npartitions:"), "max_shrink: 2"),
        (("start: 1995-01-01", "start: 1995-13-01"), "month must be in 1..12"),
        (("partitions:", "partitions_per_run: 0\npartitions:"), "partitions_per_run: 0 is not"),
        (("partitions:", "timeouts: {lock: 5 secs}\npartitions:"), "timeouts.lock: '5 secs' is"),
        (("partitions:", "timeouts: {lock: 0ms}\npartitions:"), "timeouts.lock: '0ms' is outside"),
        (("partitions:", "timeouts: {statement: 2d}\npartitions:"), "timeouts.statement: '2d'"),
        (("partitions:", "timeouts: {lock_retries: -1}\npartitions:"), "lock_retries: -1 is not"),
        (("partitions:", "timeouts: {locks: 1s}\npartitions:"), "unknown key(s) locks in timeouts"),
        (("partitions:", "owners: [bob]\npartitions:"), "owners: 'bob' is neither an email"),
    ],
)
def test_a_mistake_in_a_declaration_names_the_file_and_the_field(tmp_path, replace, message):
    folder = _declaration(tmp_path, replace)
    with pytest.raises(DeclarationError) as error:
        load_registry([folder])
    assert str(error.value).startswith(str(folder / "shipped_lines.yaml"))
    assert message in str(error.value)


def test_two_declarations_of_one_table_are_refused(tmp_path):
    folder = _declaration(tmp_path)
    text = (folder / "shipped_lines.yaml").read_text()
    (folder / "copy.yaml").write_text(text + "sql: shipped_lines.sql\n")
    with pytest.raises(DeclarationError, match="already declared in"):
        load_registry([folder])


def test_asking_for_an_undeclared_table_lists_the_declared_ones():
    with pytest.raises(ValueError, match=r"declared tables are: analytics\.fct_orders"):
        load_registry([DEFAULT_TABLES_DIR]).table("analytics.nope")


IN_PLACE = Path(__file__).parent / "in_place_tables" / "orders_total.yaml"


def _in_place(tmp_path: Path, replace: tuple[str, str]) -> Path:
    folder = tmp_path / "in_place"
    folder.mkdir()
    text = IN_PLACE.read_text()
    assert replace[0] in text
    (folder / "orders_total.yaml").write_text(text.replace(*replace))
    return folder


def test_an_in_place_declaration_reads_its_expressions_and_batch_limits():
    table = load_registry([IN_PLACE.parent]).table("app.orders")

    assert table.strategy == "batched_update" and table.sql_path is None
    spec = table.batched_update
    assert spec.set == (("total_price", "net_amount + tax_amount"),)
    assert (spec.batch_start, spec.batch_min, spec.batch_max, spec.target_ms) == (10, 5, 1000, 50)
    assert spec.triggers == "keep"
    assert '(net_amount + tax_amount) AS "total_price"' in table.query


@pytest.mark.parametrize(
    ("replace", "message"),
    [
        (("strategy: batched_update", "strategy: upsert"), "strategy: 'upsert' is not one of"),
        (("set: {total_price:", "set: {total:"), "batched_update.set: total not among the columns"),
        (("set: {total_price:", "set: {order_id:"), "order_id is the unique key or the partition"),
        (("batch: {start: 10,", "batch: {start: 1,"), "start 1 is not between min 5 and max 1000"),
        (("target: 50ms", "target: soon"), "batched_update.batch.target: 'soon' is not a duration"),
        (
            ("batch: {", "triggers: fire\n  batch: {"),
            "triggers: 'fire' is not one of keep, replica",
        ),
        (("batched_update:\n", "sql: orders.sql\nbatched_update:\n"), "has no SQL file"),
        (("strategy: batched_update\n", ""), "batched_update: only for strategy: batched_update"),
        (("tax_amount}", "coalesce(tax_amount, 0)}"), "quote an expression holding commas"),
    ],
)
def test_a_mistake_in_an_in_place_declaration_names_the_field(tmp_path, replace, message):
    with pytest.raises(DeclarationError) as error:
        load_registry([_in_place(tmp_path, replace)])
    assert message in str(error.value)


def test_partition_swap_needs_a_not_null_partition_column(tmp_path):
    swap = Path(__file__).parent / "swap_tables" / "fct_orders_swap.yaml"
    folder = tmp_path / "swap"
    folder.mkdir()
    text = swap.read_text().replace("order_day: date not null", "order_day: date")
    (folder / "fct_orders_swap.yaml").write_text(text)
    with pytest.raises(DeclarationError, match="order_day must be declared not null for partit"):
        load_registry([folder])


def test_a_day_inside_a_monthly_partition_is_answered_with_that_partitions_key():
    (table,) = load_registry([Path(__file__).parent / "own_tables"])
    with pytest.raises(UnknownPartitionError) as error:
        table.partitioning.window("1995-03-15")
    assert "1995-03-15 is inside a partition but not its key: pick 1995-03-01" in str(error.value)
    with pytest.raises(UnknownPartitionError) as error:
        table.partitioning.window("1999-01-01")
    assert "pick a key in that range" in str(error.value)

"""DELETE-INSERT of exactly one partition, through real Dagster runs on a real PostgreSQL."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from dagster import DagsterInstance, materialize
from support import FCT_ORDERS, fct_orders

from backfill_assets.core.database import connect
from backfill_assets.core.fingerprint import partition_fingerprint
from backfill_assets.core.partitioning import UnknownPartitionError
from backfill_assets.core.tables import ensure_table
from backfill_assets.core.writer import replace_partition
from backfill_assets.defs.resources import PostgresResource

RANGE = ("2024-04-01", "2024-04-05")


def materialize_range(postgres, instance, first, last, **kwargs):
    return materialize(
        [fct_orders],
        resources={"postgres": postgres},
        instance=instance,
        tags={
            "dagster/asset_partition_range_start": first,
            "dagster/asset_partition_range_end": last,
        },
        **kwargs,
    )


def fingerprints(conn: psycopg.Connection, keys) -> dict:
    return {
        key: partition_fingerprint(conn, FCT_ORDERS, FCT_ORDERS.partitioning.window(key))
        for key in keys
    }


def test_rerunning_a_partition_leaves_identical_rows(postgres, instance, conn):
    day = FCT_ORDERS.partitioning.window("2024-04-03")
    assert materialize(
        [fct_orders], partition_key=day.key, resources={"postgres": postgres}, instance=instance
    ).success
    first = partition_fingerprint(conn, FCT_ORDERS, day)

    assert materialize(
        [fct_orders], partition_key=day.key, resources={"postgres": postgres}, instance=instance
    ).success
    second = partition_fingerprint(conn, FCT_ORDERS, day)

    assert first.rows > 0
    assert second == first


def test_materializing_one_partition_leaves_every_other_partition_unchanged(
    postgres, instance, conn
):
    assert materialize_range(postgres, instance, *RANGE).success
    keys = FCT_ORDERS.partitioning.all_keys()[FCT_ORDERS.partitioning.all_keys().index(RANGE[0]) :][
        :5
    ]
    before = fingerprints(conn, keys)
    # Change the source of two days; only the one we rebuild may pick the change up.
    conn.execute(
        "UPDATE app.orders SET net_amount = net_amount + 1 WHERE ordered_at >= '2024-04-02' "
        "AND ordered_at < '2024-04-04'"
    )

    assert materialize(
        [fct_orders],
        partition_key="2024-04-03",
        resources={"postgres": postgres},
        instance=instance,
    ).success
    after = fingerprints(conn, keys)

    assert after["2024-04-03"].checksum != before["2024-04-03"].checksum
    assert after["2024-04-03"].rows == before["2024-04-03"].rows
    assert {k: v for k, v in after.items() if k != "2024-04-03"} == {
        k: v for k, v in before.items() if k != "2024-04-03"
    }


def test_a_malformed_source_row_fails_the_write_and_keeps_the_old_rows(postgres, instance, conn):
    assert materialize_range(postgres, instance, *RANGE).success
    before = fingerprints(conn, ["2024-04-02", "2024-04-03"])
    # The application let a negative amount through; fct_orders forbids it (CHECK constraint),
    # so the INSERT fails after the DELETE has already run inside the transaction.
    conn.execute(
        "UPDATE app.orders SET net_amount = -5 WHERE order_id = (SELECT min(order_id) "
        "FROM app.orders WHERE ordered_at >= '2024-04-03' AND ordered_at < '2024-04-04')"
    )

    result = materialize(
        [fct_orders],
        partition_key="2024-04-03",
        resources={"postgres": postgres},
        instance=instance,
        raise_on_error=False,
    )

    assert not result.success
    assert "fct_orders_net_amount_check" in str(result.all_events)
    assert fingerprints(conn, ["2024-04-02", "2024-04-03"]) == before


def test_a_connection_lost_between_delete_and_insert_keeps_the_old_rows(data_url, conn):
    ensure_table(conn, FCT_ORDERS)
    day = FCT_ORDERS.partitioning.window("2024-04-03")
    replace_partition(conn, FCT_ORDERS, day)
    before = partition_fingerprint(conn, FCT_ORDERS, day)

    def kill_the_writer(writer: psycopg.Connection) -> None:
        with connect(data_url) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", [writer.info.backend_pid])

    with connect(data_url) as writer, pytest.raises(psycopg.OperationalError):
        replace_partition(writer, FCT_ORDERS, day, after_delete=kill_the_writer)

    assert before.rows > 0
    assert partition_fingerprint(conn, FCT_ORDERS, day) == before


def test_a_partition_key_outside_the_definition_is_refused_and_writes_nothing(
    postgres, instance: DagsterInstance, conn
):
    assert materialize_range(postgres, instance, *RANGE).success
    total_before = conn.execute("SELECT count(*) FROM analytics.fct_orders").fetchone()[0]

    with pytest.raises(Exception, match="2023-12-31"):
        materialize(
            [fct_orders],
            partition_key="2023-12-31",
            resources={"postgres": postgres},
            instance=instance,
        )

    assert conn.execute("SELECT count(*) FROM analytics.fct_orders").fetchone()[0] == total_before


def test_an_unknown_partition_key_error_names_the_key_and_the_valid_range():
    with pytest.raises(UnknownPartitionError) as error:
        FCT_ORDERS.partitioning.window("2025-02-30")
    message = str(error.value)
    assert "'2025-02-30'" in message
    assert "2024-01-01" in message and "2024-12-31" in message


def test_each_partition_reports_rows_deleted_inserted_duration_and_speed(postgres, instance, conn):
    assert materialize_range(postgres, instance, "2024-04-01", "2024-04-02").success
    result = materialize_range(postgres, instance, "2024-04-01", "2024-04-03")

    by_partition = {
        m.partition: m.metadata
        for m in result.asset_materializations_for_node("analytics__fct_orders")
    }
    assert sorted(by_partition) == ["2024-04-01", "2024-04-02", "2024-04-03"]
    for key, metadata in by_partition.items():
        rows = partition_fingerprint(conn, FCT_ORDERS, FCT_ORDERS.partitioning.window(key)).rows
        assert metadata["rows_inserted"].value == rows
        assert metadata["rows_deleted"].value == (0 if key == "2024-04-03" else rows)
        assert metadata["duration_s"].value >= 0
        assert metadata["rows_per_second"].value > 0


def test_the_resource_names_the_server_when_the_database_is_down():
    down = PostgresResource(url="postgresql://nobody:secret@/nowhere?host=/nonexistent-socket-dir")
    with pytest.raises(Exception, match="cannot connect to PostgreSQL") as error:
        down.connect()
    assert "secret" not in str(error.value)


def create_tables_at_once(url: str, writers: int = 2) -> list[Exception]:
    """Let several connections create the table and its snapshot table at the same instant."""
    import threading

    from backfill_assets.core.snapshots import ensure_snapshot_table

    errors: list[Exception] = []
    start_together = threading.Barrier(writers)

    def create_tables() -> None:
        with connect(url) as own:
            start_together.wait()
            try:
                ensure_table(own, FCT_ORDERS)
                ensure_snapshot_table(own, FCT_ORDERS)
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=create_tables) for _ in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_runs_starting_together_create_the_tables_without_colliding(data_url, conn):
    # Without serialisation, two concurrent CREATE ... IF NOT EXISTS of one table make one of
    # them fail in the catalog (seen in every attempt here); backfills start runs in pairs.
    for _ in range(3):
        conn.execute("DROP SCHEMA IF EXISTS analytics, backfill_snapshots CASCADE")

        assert create_tables_at_once(data_url) == []
        assert conn.execute("SELECT to_regclass('analytics.fct_orders')").fetchone()[0]


def test_two_writers_of_one_partition_take_turns_and_never_duplicate_it(data_url, conn):
    """Overlapping backfills of one day: the second writer starts while the first is uncommitted.

    Without the partition lock the second DELETE waits for the first writer, then misses its new
    rows, and the partition ends up holding every row twice.
    """
    ensure_table(conn, FCT_ORDERS)
    day = FCT_ORDERS.partitioning.window("2024-04-03")
    replace_partition(conn, FCT_ORDERS, day)
    expected = partition_fingerprint(conn, FCT_ORDERS, day)
    first_inserted = threading.Event()
    release_first = threading.Event()

    def hold_open(*_: object) -> None:
        first_inserted.set()
        assert release_first.wait(timeout=60)

    def write(before_commit=None):
        with connect(data_url) as writer:
            return replace_partition(writer, FCT_ORDERS, day, before_commit=before_commit)

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(write, hold_open)
        assert first_inserted.wait(timeout=60)
        second = pool.submit(write)
        waiting = wait_until_blocked(conn, timeout_s=60)
        release_first.set()
        results = [first.result(timeout=60), second.result(timeout=60)]

    assert waiting, "the second writer never waited for the first"
    assert [r.rows_inserted for r in results] == [expected.rows, expected.rows]
    assert results[1].rows_deleted == expected.rows
    assert partition_fingerprint(conn, FCT_ORDERS, day) == expected


def wait_until_blocked(conn: psycopg.Connection, *, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        blocked = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()[0]
        if blocked:
            return True
        time.sleep(0.05)
    return False


def test_a_run_logs_its_progress_every_few_seconds_not_once_per_partition(postgres, instance, conn):
    result = materialize_range(postgres, instance, "2024-04-01", "2024-04-20")

    lines = [
        event.message
        for event in instance.all_logs(result.run_id)
        if event.user_message.startswith("[") and "analytics.fct_orders through" in event.message
    ]
    total = sum(
        partition_fingerprint(conn, FCT_ORDERS, window).rows
        for window in FCT_ORDERS.partitioning.windows(
            [f"2024-04-{day:02d}" for day in range(1, 21)]
        )
    )
    # 20 small partitions take well under the 5 s between lines: the first and the last.
    assert len(lines) == 2, lines
    assert "[1/20]" in lines[0] and "about" in lines[0]
    assert f"[20/20] analytics.fct_orders through 2024-04-20: {total:,} rows" in lines[1]
    assert "rows/s" in lines[1]

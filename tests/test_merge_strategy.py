"""``strategy: merge``: each partition brought to its query's rows by MERGE on ``unique_key``,
writing only the keys that are new, changed or gone.

The table is the demo's ``fct_orders`` again with the very same SQL
(``tests/merge_tables/fct_orders_merge.yaml``), so the merge can be compared row by row with
DELETE-INSERT.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
from dagster import AssetKey
from psycopg.rows import dict_row
from support import (
    audit_rows,
    fingerprints,
    latest_check,
    materialize_days,
    step_failure_message,
)

from backfill_assets.core.fingerprint import partition_fingerprint
from backfill_assets.core.registry import DEFAULT_TABLES_DIR, TABLES_PATH_ENV, load_registry
from backfill_assets.defs.checks import CHECKS
from backfill_assets.defs.table_assets import table_asset
from backfill_assets.tooling import cli

TABLES = Path(__file__).parent / "merge_tables"
MERGED = load_registry([TABLES]).table("analytics.fct_orders_merge")
MERGED_KEY = AssetKey(["analytics", "fct_orders_merge"])
merged = table_asset(MERGED)
DAYS = ["2024-04-01", "2024-04-02", "2024-04-03"]
DAY = DAYS[0]
WRITER = Path(__file__).with_name("merge_writer.py")
SNAPSHOT = "backfill_snapshots.analytics__fct_orders_merge"
ROWS = (
    "SELECT order_id, order_day, customer_id, country, sales_channel, status, net_amount, "
    "tax_amount, gross_amount FROM analytics.fct_orders_merge WHERE order_day = %s"
)


def merged_prints(conn, days):
    return {d: partition_fingerprint(conn, MERGED, MERGED.partitioning.window(d)) for d in days}


def rows_by_key(conn, query: str, *params) -> dict[int, tuple]:
    return {row[0]: row for row in conn.execute(query, params).fetchall()}


def change_the_source(conn, day: str) -> dict[str, set[int]]:
    """A late fix of the day's orders: some amounts corrected, some orders cancelled out of the
    shop's table, two new ones; returns the order ids of each kind."""
    day_orders = (
        "ordered_at >= %(day)s::timestamp AT TIME ZONE 'UTC' "
        "AND ordered_at < (%(day)s::date + 1)::timestamp AT TIME ZONE 'UTC'"
    )
    updated = conn.execute(
        f"UPDATE app.orders SET net_amount = net_amount + 1 WHERE {day_orders} "
        "AND order_id %% 10 = 3 RETURNING order_id",
        {"day": day},
    ).fetchall()
    deleted = conn.execute(
        f"DELETE FROM app.orders WHERE {day_orders} AND order_id %% 10 = 7 RETURNING order_id",
        {"day": day},
    ).fetchall()
    inserted = conn.execute(
        "INSERT INTO app.orders SELECT order_id + 100000000, customer_id, ordered_at, arrived_at, "
        "status, net_amount, tax_amount, sales_channel FROM app.orders "
        f"WHERE {day_orders} ORDER BY order_id LIMIT 2 RETURNING order_id",
        {"day": day},
    ).fetchall()
    changed = {
        "updated": {r[0] for r in updated},
        "deleted": {r[0] for r in deleted},
        "inserted": {r[0] for r in inserted},
    }
    assert all(changed.values()), changed
    return changed


def test_merge_and_delete_insert_give_identical_rows_and_check_outcomes(postgres, instance, conn):
    assert materialize_days(postgres, instance, DAYS[0], DAYS[-1]).success
    assert materialize_days(postgres, instance, DAYS[0], DAYS[-1], assets=[merged]).success
    change_the_source(conn, DAYS[1])
    assert materialize_days(postgres, instance, DAYS[0], DAYS[-1]).success
    assert materialize_days(postgres, instance, DAYS[0], DAYS[-1], assets=[merged]).success

    assert merged_prints(conn, DAYS) == fingerprints(conn, DAYS)
    for day in DAYS:
        for check in CHECKS:
            plain = latest_check(instance, check.name, day)
            merge = latest_check(instance, check.name, day, MERGED_KEY)
            assert merge.status == plain.status, (check.name, day)
    assert {r["strategy"] for r in audit_rows(conn, table_name=MERGED.qualified_name)} == {"merge"}


def test_a_changed_source_rewrites_only_the_changed_rows_and_keeps_exactly_their_old_values(
    postgres, instance, conn
):
    assert materialize_days(postgres, instance, DAY, assets=[merged]).success
    old = rows_by_key(conn, ROWS, DAY)
    old_xmin = dict(
        conn.execute(
            "SELECT order_id, xmin::text FROM analytics.fct_orders_merge WHERE order_day = %s",
            [DAY],
        ).fetchall()
    )
    changed = change_the_source(conn, DAY)

    assert materialize_days(postgres, instance, DAY, assets=[merged]).success

    (write,) = audit_rows(conn, table_name=MERGED.qualified_name, partition_key=DAY)[1:]
    assert (write["rows_updated"], write["rows_deleted"], write["rows_inserted"]) == (
        len(changed["updated"]),
        len(changed["deleted"]),
        len(changed["inserted"]),
    )
    kept = conn.execute(
        f"SELECT merge_action, order_id, order_day, customer_id, country, sales_channel, status, "
        f"net_amount, tax_amount, gross_amount FROM {SNAPSHOT} "
        "WHERE audit_id = %s AND write_id = %s",
        [write["id"], write["write_id"]],
    ).fetchall()
    assert write["snapshot_rows"] == len(kept)
    old_values = {row[1]: row[1:] for row in kept if row[0] in ("updated", "deleted")}
    assert old_values == {k: old[k] for k in changed["updated"] | changed["deleted"]}
    assert {row[1] for row in kept if row[0] == "updated"} == changed["updated"]
    assert {row[1] for row in kept if row[0] == "inserted"} == changed["inserted"]

    new_xmin = dict(
        conn.execute(
            "SELECT order_id, xmin::text FROM analytics.fct_orders_merge WHERE order_day = %s",
            [DAY],
        ).fetchall()
    )
    untouched = set(old) - changed["updated"] - changed["deleted"]
    assert {k: new_xmin[k] for k in untouched} == {k: old_xmin[k] for k in untouched}
    assert all(new_xmin[k] != old_xmin[k] for k in changed["updated"])
    assert set(new_xmin) == untouched | changed["updated"] | changed["inserted"]
    source = f"SELECT * FROM ({MERGED.query.strip()}) AS q"
    expected = {r[0]: r for r in conn.execute(source, {"start": DAY, "end": "2024-04-02"})}
    assert rows_by_key(conn, ROWS, DAY) == expected


def test_a_merge_rolled_back_restores_the_partition_exactly_and_can_be_undone(
    postgres, instance, conn, dagster_env, monkeypatch
):
    monkeypatch.setenv(TABLES_PATH_ENV, f"{DEFAULT_TABLES_DIR}:{TABLES}")
    assert materialize_days(postgres, instance, DAY, assets=[merged]).success
    before = merged_prints(conn, [DAY])
    change_the_source(conn, DAY)
    assert materialize_days(postgres, instance, DAY, assets=[merged]).success
    after = merged_prints(conn, [DAY])
    assert after != before

    table = ["--table", MERGED.qualified_name, "--partition", DAY]
    assert cli.main(["rollback", *table]) == 0
    assert merged_prints(conn, [DAY]) == before
    assert cli.main(["rollback", *table]) == 0
    assert merged_prints(conn, [DAY]) == after
    rollbacks = audit_rows(conn, strategy="rollback")
    assert [r["status"] for r in rollbacks] == ["succeeded", "succeeded"]
    assert [r["rows_inserted"] + r["rows_updated"] + r["rows_deleted"] for r in rollbacks] == [
        rollbacks[0]["snapshot_rows"],
        rollbacks[1]["snapshot_rows"],
    ], "a rollback of a merge rewrites only the keys the merge changed"


def test_rolling_back_a_partitions_first_merge_leaves_it_empty(
    postgres, instance, conn, dagster_env, monkeypatch
):
    monkeypatch.setenv(TABLES_PATH_ENV, f"{DEFAULT_TABLES_DIR}:{TABLES}")
    assert materialize_days(postgres, instance, DAY, assets=[merged]).success
    written = merged_prints(conn, [DAY])

    table = ["--table", MERGED.qualified_name, "--partition", DAY]
    assert cli.main(["rollback", *table]) == 0
    assert merged_prints(conn, [DAY])[DAY].rows == 0
    assert cli.main(["rollback", *table]) == 0
    assert merged_prints(conn, [DAY]) == written


def start_writer(data_url: str, days: list[str]) -> subprocess.Popen:
    writer = subprocess.Popen(
        [sys.executable, str(WRITER), data_url, *days],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout.readline().strip() == "ready", writer.stderr.read()
    return writer


def wait_until_its_sessions_end(conn) -> None:
    others = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
    )
    deadline = time.monotonic() + 30
    while conn.execute(others).fetchone()[0]:
        assert time.monotonic() < deadline, "the killed writer's sessions did not end"
        time.sleep(0.01)


def orphan_snapshot_rows(conn) -> int:
    """Snapshot rows with no succeeded audit row of the same audit id and write id."""
    return conn.execute(
        f"SELECT count(*) FROM {SNAPSHOT} AS s LEFT JOIN backfill_audit.backfill_runs AS a "
        "ON a.id = s.audit_id AND a.write_id = s.write_id "
        "WHERE a.status IS DISTINCT FROM 'succeeded'"
    ).fetchone()[0]


def test_a_writer_killed_inside_its_merge_leaves_the_old_rows(data_url, conn):
    writer = start_writer(data_url, [DAY])
    assert writer.stdout.readline().strip() == f"wrote {DAY}", writer.stderr.read()
    writer.wait(timeout=60)
    old = merged_prints(conn, [DAY])
    changed = change_the_source(conn, DAY)
    # Another session holds a row the MERGE must update: the writer stops inside its MERGE,
    # after it kept the old values, and is killed there.
    with psycopg.connect(data_url, autocommit=True) as blocker, blocker.transaction():
        blocker.execute(
            "SELECT 1 FROM analytics.fct_orders_merge WHERE order_id = %s FOR UPDATE",
            [min(changed["updated"])],
        )
        writer = start_writer(data_url, [DAY])
        deadline = time.monotonic() + 30
        while not conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE 'MERGE INTO%%'"
        ).fetchone()[0]:
            assert time.monotonic() < deadline, "the writer never reached its MERGE"
            time.sleep(0.01)
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
    wait_until_its_sessions_end(conn)

    assert merged_prints(conn, [DAY]) == old
    assert orphan_snapshot_rows(conn) == 0, "nothing kept by the killed write"


def test_writers_killed_at_random_moments_leave_every_day_old_or_new(data_url, conn):
    writer = start_writer(data_url, DAYS)
    for day in DAYS:
        assert writer.stdout.readline().strip() == f"wrote {day}", writer.stderr.read()
    writer.wait(timeout=60)
    for trial, delay in enumerate([0.0, 0.05, 0.1, 0.2, 0.4]):
        old = merged_prints(conn, DAYS)
        last_id = conn.execute("SELECT max(id) FROM backfill_audit.backfill_runs").fetchone()[0]
        conn.execute(
            "UPDATE app.orders SET net_amount = net_amount + 0.01 WHERE order_id %% 5 = %s "
            "AND ordered_at >= %s AND ordered_at < %s::date + 1",
            [trial, DAYS[0], DAYS[-1]],
        )
        writer = start_writer(data_url, DAYS)
        time.sleep(delay)
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
        wait_until_its_sessions_end(conn)

        now = merged_prints(conn, DAYS)
        with conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(
                "SELECT * FROM backfill_audit.backfill_runs WHERE id > %s", [last_id]
            ).fetchall()
        assert all(r["status"] != "running" for r in rows), trial
        for day in DAYS:
            succeeded = [
                r for r in rows if r["partition_key"] == day and r["status"] == "succeeded"
            ]
            if succeeded:
                (row,) = succeeded
                assert (row["checksum_before"], row["checksum_after"]) == (
                    old[day].checksum,
                    now[day].checksum,
                ), (trial, day, "the audit row is what committed")
                kept = conn.execute(
                    f"SELECT count(*) FROM {SNAPSHOT} WHERE audit_id = %s AND write_id = %s",
                    [row["id"], row["write_id"]],
                ).fetchone()[0]
                assert kept == row["snapshot_rows"], (trial, day)
            else:
                assert now[day] == old[day], (trial, day, "no audit row, so unchanged")
        assert orphan_snapshot_rows(conn) == 0, (trial, "every kept row is a committed write's")


def test_a_unique_key_repeated_in_the_source_is_refused_naming_the_keys_and_writes_nothing(
    postgres, instance, conn, tmp_path
):
    assert materialize_days(postgres, instance, DAY, assets=[merged]).success
    before = merged_prints(conn, [DAY])
    query = (DEFAULT_TABLES_DIR / "fct_orders.sql").read_text().strip()
    (tmp_path / "fct_orders_merge.sql").write_text(
        f"SELECT * FROM ({query}) AS q\nUNION ALL\n"
        f"SELECT * FROM ({query}) AS q WHERE order_id %% 10 = 1\n"
    )
    (tmp_path / "fct_orders_merge.yaml").write_text(
        (TABLES / "fct_orders_merge.yaml")
        .read_text()
        .replace("sql: ../../tables/fct_orders.sql\n", "")
    )
    doubled = table_asset(load_registry([tmp_path]).table(MERGED.qualified_name))
    repeated = [
        str(k)
        for (k,) in conn.execute(
            "SELECT order_id FROM analytics.fct_orders_merge WHERE order_day = %s "
            "AND order_id %% 10 = 1 ORDER BY order_id",
            [DAY],
        )
    ]
    assert repeated

    result = materialize_days(postgres, instance, DAY, assets=[doubled])

    assert not result.success
    message = step_failure_message(result)
    assert "unique_key (order_id) is not unique" in message, message
    assert f"({repeated[0]}) (2 rows)" in message, message
    assert "Nothing was written" in message
    assert merged_prints(conn, [DAY]) == before
    failed = audit_rows(conn, table_name=MERGED.qualified_name, status="failed")
    assert len(failed) == 1 and f"({repeated[0]})" in failed[0]["error"]
    assert (
        conn.execute(
            f"SELECT count(*) FROM {SNAPSHOT} WHERE audit_id = %s", [failed[0]["id"]]
        ).fetchone()[0]
        == 0
    )


def test_an_existing_table_without_a_unique_index_on_the_key_is_refused_with_the_index_to_create(
    postgres, instance, conn
):
    for statement in MERGED.create_statements():
        conn.execute(statement)

    result = materialize_days(postgres, instance, DAY, assets=[merged])

    assert not result.success
    message = step_failure_message(result)
    assert "CREATE UNIQUE INDEX CONCURRENTLY" in message and "(order_id)" in message, message
    assert "Nothing was written" in message

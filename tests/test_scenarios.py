"""The backfill scenarios of docs/scenarios.md, end to end on the demo shop through the daemon,
as a user follows them: the same commands, the same declarations."""

from __future__ import annotations

from dagster import DagsterInstance
from support import audit_rows, failed_run_report

from backfill_assets.core.registry import DEFAULT_TABLES_DIR, TABLES_PATH_ENV
from backfill_assets.core.settings import REPO_ROOT
from backfill_assets.tooling import cli
from backfill_assets.tooling.launch import running_daemon

NEW_COLUMN = REPO_ROOT / "scenarios" / "new_not_null_column"


def test_a_new_not_null_column_is_filled_for_all_history_then_made_not_null(
    conn, dagster_env, monkeypatch, tmp_path, capsys
):
    # Step 1 of the scenario: the schema change, a nullable column (instant).
    conn.execute("ALTER TABLE app.orders ADD COLUMN total_price numeric(12, 2)")
    # The application already writes the column for new orders: those values stay.
    conn.execute("UPDATE app.orders SET total_price = 0.01 WHERE order_id % 97 = 0")
    written = conn.execute("SELECT count(*) FROM app.orders WHERE total_price = 0.01").fetchone()
    tables = f"{DEFAULT_TABLES_DIR}:{NEW_COLUMN}"
    monkeypatch.setenv(TABLES_PATH_ENV, tables)
    why = "SHOP-42: total_price for history"

    with running_daemon({**dagster_env, TABLES_PATH_ENV: tables}, tmp_path / "daemon.log"):
        span = ["--from", "2024-01-01", "--to", "2024-12-01"]
        code = cli.main(["launch", "--select", "app/orders", *span, "--reason", why, "--wait"])
    out = capsys.readouterr().out
    if code != 0:
        with DagsterInstance.get() as instance:
            runs = [r.dagster_run.run_id for r in instance.get_run_records()]
            raise AssertionError(out + failed_run_report(instance, runs, tmp_path / "daemon.log"))

    missing, wrong = conn.execute(
        "SELECT count(*) FILTER (WHERE total_price IS NULL), count(*) FILTER (WHERE total_price "
        "<> net_amount + tax_amount AND total_price <> 0.01) FROM app.orders"
    ).fetchone()
    assert (missing, wrong) == (0, 0)
    assert (
        conn.execute("SELECT count(*) FROM app.orders WHERE total_price = 0.01").fetchone()
        == written
    ), "the application's values are kept"
    audits = audit_rows(conn, strategy="batched_update", status="succeeded")
    assert len(audits) == 12 and {a["reason"] for a in audits} == {why}

    # Step 4: NOT NULL without a long lock.
    assert cli.main(["finish-column", "app.orders", "total_price"]) == 0
    assert conn.execute(
        "SELECT attnotnull FROM pg_attribute WHERE attrelid = 'app.orders'::regclass "
        "AND attname = 'total_price'"
    ).fetchone()[0]

"""An existing target is compared with its declaration in full before anything is written.

A table the project creates is its declaration: a column of another type, a NOT NULL missing or
extra, a CHECK missing or undeclared stop the run with the ``ALTER TABLE`` statements that make
the table match, and running them lets the run through. An application's table filled in place
(``batched_update``) is compared by type only: its NOT NULL comes after the fill.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support import FCT_ORDERS

from backfill_assets.core.audit import AuditTrail, RunInfo
from backfill_assets.core.contract import ContractError, check_target
from backfill_assets.core.params import params_for
from backfill_assets.core.registry import load_registry
from backfill_assets.core.run import RunHooks, RunRefused, run_table
from backfill_assets.core.tables import ensure_table
from backfill_assets.core.writer import replace_partition

DAY = "2024-04-01"
IN_PLACE = load_registry([Path(__file__).parent / "in_place_tables"]).table("app.orders")


def statements(message: str) -> list[str]:
    """The ALTER TABLE statements a refusal prints."""
    found = re.search(r"Make the table match \((.*)\), or change the declaration", message)
    assert found, message
    return found.group(1).split("; ")


def test_a_target_that_differs_in_type_not_null_and_checks_is_refused_with_the_alters(
    conn, data_url
):
    ensure_table(conn, FCT_ORDERS)
    replace_partition(conn, FCT_ORDERS, FCT_ORDERS.partitioning.window(DAY))
    conn.execute("ALTER TABLE analytics.fct_orders ALTER COLUMN tax_amount TYPE numeric(14,4)")
    conn.execute("ALTER TABLE analytics.fct_orders ALTER COLUMN sales_channel DROP NOT NULL")
    conn.execute("ALTER TABLE analytics.fct_orders ALTER COLUMN country SET NOT NULL")
    declared_check = conn.execute(
        "SELECT conname FROM pg_constraint WHERE conrelid = 'analytics.fct_orders'::regclass "
        "AND contype = 'c'"
    ).fetchone()[0]
    conn.execute(f"ALTER TABLE analytics.fct_orders DROP CONSTRAINT {declared_check}")
    conn.execute("ALTER TABLE analytics.fct_orders ADD CONSTRAINT big CHECK (gross_amount < 1e9)")
    before = conn.execute("SELECT count(*), sum(net_amount) FROM analytics.fct_orders").fetchone()

    lines: list[str] = []
    with AuditTrail(data_url) as audit, pytest.raises(RunRefused) as refused:
        run_table(
            conn,
            audit,
            RunInfo(None, None, "test", {}),
            FCT_ORDERS,
            FCT_ORDERS.partitioning.windows([DAY]),
            params_for(FCT_ORDERS, {}),
            RunHooks(lines.append, lines.append, lines.append),
        )
    message = str(refused.value)
    for problem in (
        "tax_amount is numeric(14,4), declared numeric(12,2)",
        "sales_channel is nullable, declared not null",
        "country is NOT NULL, declared nullable",
        "no CHECK ((net_amount >= (0)::numeric))",
        "undeclared CHECK ((gross_amount < ",
    ):
        assert problem in message, message
    assert "Nothing was written" in message
    assert conn.execute(
        "SELECT count(*), sum(net_amount) FROM analytics.fct_orders"
    ).fetchone() == (before)

    alters = statements(message)
    assert len(alters) == 5, alters
    for alter in alters:
        conn.execute(alter)
    check_target(conn, FCT_ORDERS)  # the printed statements make the table match


def test_a_table_filled_in_place_is_compared_by_type_not_by_its_coming_not_null(conn):
    conn.execute("ALTER TABLE app.orders ADD COLUMN total_price numeric(12,2)")
    check_target(conn, IN_PLACE)  # declared not null, nullable until filled: fine

    conn.execute("ALTER TABLE app.orders ALTER COLUMN total_price TYPE numeric(14,2)")
    with pytest.raises(ContractError) as refused:
        check_target(conn, IN_PLACE)
    assert "total_price is numeric(14,2), declared numeric(12,2)" in str(refused.value)
    assert statements(str(refused.value)) == [
        "ALTER TABLE app.orders ALTER COLUMN total_price TYPE numeric(12,2)"
    ]

"""The demo domain: an online shop's operational tables in schema ``app``, generated in SQL.

The data is deterministic (every random choice is a hash of the row's id, not a random generator)
and is generated inside PostgreSQL, so a benchmark-sized seed of millions of rows takes seconds.
It carries the situations a backfill fixes:

* ``TAX_BUG``: for three months the application charged every country the German rate (19 %), so
  ``app.orders.tax_amount`` is wrong for non-German customers in that window.
* ``LATE_DAYS``: on a few days a share of the orders reached the database days after they were
  placed (``arrived_at``), after those days had already been loaded downstream.
* ``SALES_CHANNEL_SINCE``: ``app.orders.sales_channel`` was added then; older rows hold NULL while
  ``analytics.fct_orders.sales_channel`` is NOT NULL.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

import psycopg

from backfill_assets.core.registry import load_registry
from backfill_assets.core.tables import TableSpec

DEMO_TABLE = "analytics.fct_orders"

TAX_BUG = (date(2024, 4, 1), date(2024, 7, 1))
LATE_DAYS = (date(2024, 9, 10), date(2024, 9, 11), date(2024, 10, 2))
SALES_CHANNEL_SINCE = date(2024, 3, 1)
TAX_RATES = {"DE": "0.19", "FR": "0.20", "NL": "0.21", "AT": "0.20", "ES": "0.21", "IT": "0.22"}


@dataclass(frozen=True)
class SeedSummary:
    customers: int
    orders: int
    days: int


SCHEMA_DDL = """
CREATE SCHEMA IF NOT EXISTS app;

-- A uniform number in [0, 1) from an id and a salt: reproducible on every PostgreSQL version
-- (hashtextextended backs hash partitioning, so its values are stable across releases).
CREATE OR REPLACE FUNCTION app.hash01(id bigint, salt bigint) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN ((hashtextextended(id::text, salt) >> 11) & 9007199254740991)::double precision
       / 9007199254740992.0;

CREATE TABLE IF NOT EXISTS app.tax_rates (
    country text PRIMARY KEY,
    rate numeric(5, 4) NOT NULL
);

CREATE TABLE IF NOT EXISTS app.customers (
    customer_id bigint PRIMARY KEY,
    email text NOT NULL,
    full_name text NOT NULL,
    country text NOT NULL,
    created_at timestamptz NOT NULL
);

CREATE TABLE IF NOT EXISTS app.orders (
    order_id bigint PRIMARY KEY,
    customer_id bigint NOT NULL,
    ordered_at timestamptz NOT NULL,
    arrived_at timestamptz NOT NULL,
    status text NOT NULL,
    net_amount numeric(12, 2) NOT NULL,
    tax_amount numeric(12, 2) NOT NULL,
    sales_channel text
);
CREATE INDEX IF NOT EXISTS orders_ordered_at_idx ON app.orders (ordered_at);
"""

CUSTOMERS_SQL = """
INSERT INTO app.customers (customer_id, email, full_name, country, created_at)
SELECT i,
       'customer' || i || '@example.com',
       'Customer ' || i,
       (ARRAY['DE', 'DE', 'DE', 'FR', 'NL', 'AT', 'ES', 'IT'])
           [1 + floor(app.hash01(i, 1) * 8)::int],
       timestamptz '2023-01-01 00:00:00+00' + app.hash01(i, 2) * interval '365 days'
FROM generate_series(1, %(customers)s::bigint) AS i
"""

# Daily volume = base x growth over the year x weekday x season x noise.
ORDERS_SQL = """
WITH days AS (
    SELECT d::date AS day, row_number() OVER (ORDER BY d) AS day_no
    FROM generate_series(%(first)s::date, %(end)s::date - 1, interval '1 day') AS d
), volume AS (
    SELECT day,
           greatest(1, round(
               %(base)s
               * (0.8 + 0.4 * (extract(doy FROM day) / 366.0))
               * CASE extract(isodow FROM day) WHEN 6 THEN 1.25 WHEN 7 THEN 1.15
                                               WHEN 1 THEN 0.9 ELSE 1.0 END
               * CASE WHEN day BETWEEN date '2024-11-25' AND date '2024-12-02' THEN 2.5
                      WHEN extract(month FROM day) = 12 AND extract(day FROM day) < 24 THEN 1.5
                      WHEN extract(month FROM day) = 8 THEN 0.85 ELSE 1.0 END
               * (0.85 + 0.3 * app.hash01(day_no, 3))
           ))::bigint AS n
    FROM days
), numbered AS (
    SELECT day, n, (sum(n) OVER (ORDER BY day) - n)::bigint AS first_id FROM volume
), generated AS (
    SELECT first_id + i AS order_id, day FROM numbered, generate_series(1, n) AS i
), orders AS (
    SELECT g.order_id,
           g.day,
           1 + floor(app.hash01(g.order_id, 4) * %(customers)s)::bigint AS customer_id,
           (g.day::timestamp AT TIME ZONE 'UTC')
               + app.hash01(g.order_id, 5) * interval '86399 seconds' AS ordered_at,
           round((5 + 295 * app.hash01(g.order_id, 6) ^ 2)::numeric, 2) AS net_amount,
           app.hash01(g.order_id, 7) AS r_status,
           app.hash01(g.order_id, 8) AS r_channel,
           app.hash01(g.order_id, 9) AS r_late
    FROM generated AS g
)
INSERT INTO app.orders (order_id, customer_id, ordered_at, arrived_at, status, net_amount,
                        tax_amount, sales_channel)
SELECT o.order_id,
       o.customer_id,
       o.ordered_at,
       o.ordered_at + CASE WHEN o.day = ANY(%(late_days)s::date[]) AND o.r_late < 0.3
                           THEN interval '3 days' + o.r_late * interval '2 days'
                           ELSE o.r_late * interval '5 minutes' END,
       CASE WHEN o.r_status < 0.03 THEN 'refunded'
            WHEN o.r_status < 0.05 THEN 'cancelled' ELSE 'paid' END,
       o.net_amount,
       round(o.net_amount * CASE WHEN o.day >= %(bug_start)s AND o.day < %(bug_end)s
                                 THEN 0.19 ELSE t.rate END, 2),
       CASE WHEN o.day >= %(channel_since)s
            THEN (ARRAY['web', 'app', 'marketplace'])[1 + floor(o.r_channel * 3)::int] END
FROM orders AS o
JOIN app.customers AS c ON c.customer_id = o.customer_id
JOIN app.tax_rates AS t ON t.country = c.country
"""


def demo_table() -> TableSpec:
    """The table the demo backfills; its declared partitions are the days the shop is seeded for."""
    return load_registry().table(DEMO_TABLE)


def seed_range() -> tuple[date, date]:
    """``[first, end)`` of the demo table's partitions: the shop's orders cover exactly those."""
    partitioning = demo_table().partitioning
    last = partitioning.last_key()
    if last is None:
        raise ValueError(f"{DEMO_TABLE} has no complete partition yet: nothing to seed")
    return partitioning.start, partitioning.window(last).end


def customers_for(orders_per_day: int) -> int:
    return max(50, orders_per_day * 10)


def seed(conn: psycopg.Connection, *, orders_per_day: int = 200) -> SeedSummary:
    """Recreate the ``app`` tables with ``orders_per_day`` orders on an average day.

    Runs in one transaction: a seed that fails leaves the previous data in place.
    """
    if orders_per_day < 1:
        raise ValueError(f"orders_per_day must be at least 1, got {orders_per_day}")
    customers = customers_for(orders_per_day)
    first, end = seed_range()
    with conn.transaction():
        conn.execute("DROP TABLE IF EXISTS app.orders, app.customers, app.tax_rates")
        conn.execute(SCHEMA_DDL)
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO app.tax_rates (country, rate) VALUES (%s, %s::numeric)",
                list(TAX_RATES.items()),
            )
        conn.execute(CUSTOMERS_SQL, {"customers": customers})
        conn.execute(
            ORDERS_SQL,
            {
                "first": first,
                "end": end,
                "base": orders_per_day,
                "customers": customers,
                "late_days": list(LATE_DAYS),
                "bug_start": TAX_BUG[0],
                "bug_end": TAX_BUG[1],
                "channel_since": SALES_CHANNEL_SINCE,
            },
        )
    conn.execute("ANALYZE app.orders")
    conn.execute("ANALYZE app.customers")
    orders = conn.execute("SELECT count(*) FROM app.orders").fetchone()[0]
    days = conn.execute(
        "SELECT count(DISTINCT (ordered_at AT TIME ZONE 'UTC')::date) FROM app.orders"
    ).fetchone()[0]
    return SeedSummary(customers=customers, orders=orders, days=days)

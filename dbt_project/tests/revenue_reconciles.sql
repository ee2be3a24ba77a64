{{ config(meta={'dagster': {'ref': {'name': 'daily_revenue'}}, 'partition_column': 'order_day'}) }}
{#
  One row per day of the window whose daily_revenue does not match fct_orders (order count, paid
  orders, paid gross), or that exists on one side only. Rows carry partition_key, so Dagster fails
  exactly the days that do not reconcile.
#}
with source as (
    select order_day,
           count(*) as order_count,
           count(*) filter (where status = 'paid') as paid_orders,
           coalesce(sum(gross_amount) filter (where status = 'paid'), 0) as gross_revenue
    from {{ source('analytics', 'fct_orders') }}
    where {{ backfill_assets.partition_window_filter('order_day') }}
    group by order_day
),
mart as (
    select order_day, order_count, paid_orders, coalesce(gross_revenue, 0) as gross_revenue
    from {{ ref('daily_revenue') }}
    where {{ backfill_assets.partition_window_filter('order_day') }}
)
select coalesce(s.order_day, m.order_day) as partition_key,
       s.order_count as source_orders, m.order_count as mart_orders,
       s.gross_revenue as source_gross, m.gross_revenue as mart_gross
from source s
full join mart m on m.order_day = s.order_day
where m.order_day is null or s.order_day is null
   or m.order_count <> s.order_count or m.paid_orders <> s.paid_orders
   or m.gross_revenue <> s.gross_revenue

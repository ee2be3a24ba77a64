{#
  Orders and paid spend per customer and order day, from fct_orders. Built per partition like
  daily_revenue: each day of the run's window is replaced in its own transaction.
#}
{{
  config(
    materialized='incremental',
    incremental_strategy='microbatch',
    event_time='order_day',
    batch_size='day',
    begin=backfill_assets.partitions_begin('analytics.fct_orders'),
    unique_key=['order_day', 'customer_id'],
  )
}}

select
    order_day,
    customer_id,
    count(*) as order_count,
    count(*) filter (where status = 'paid') as paid_orders,
    coalesce(sum(gross_amount) filter (where status = 'paid'), 0) as paid_gross
from {{ source('analytics', 'fct_orders') }}
group by order_day, customer_id

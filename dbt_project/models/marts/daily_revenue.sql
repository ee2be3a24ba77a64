{#
  Revenue per order day. Built per partition: Dagster passes the partition window as
  --event-time-start/--event-time-end and every day of it is replaced in its own transaction
  (see backfill_assets/dbt_package/macros/microbatch_window_replace.sql).
#}
{{
  config(
    materialized='incremental',
    incremental_strategy='microbatch',
    event_time='order_day',
    batch_size='day',
    begin=backfill_assets.partitions_begin('analytics.fct_orders'),
    unique_key='order_day',
  )
}}

select
    order_day,
    count(*) as order_count,
    count(*) filter (where status = 'paid') as paid_orders,
    sum(net_amount) filter (where status = 'paid') as net_revenue,
    sum(tax_amount) filter (where status = 'paid') as tax,
    sum(gross_amount) filter (where status = 'paid') as gross_revenue
from {{ source('analytics', 'fct_orders') }}
group by order_day

{# Lines per UTC hour of an hourly table: one batch per hour. #}
{{
  config(
    materialized='incremental',
    incremental_strategy='microbatch',
    event_time='shipped_hour',
    batch_size='hour',
    begin=backfill_assets.partitions_begin('sales.shipped_hourly'),
  )
}}

select date_trunc('hour', shipped_at, 'UTC') as shipped_hour, count(*) as lines,
       sum(amount) as amount, min(amount) as smallest
from {{ source('sales', 'shipped_hourly') }}
group by 1

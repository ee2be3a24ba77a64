{# Lines per ship day of a monthly table: one batch per month replaces the month's days. #}
{{
  config(
    materialized='incremental',
    incremental_strategy='microbatch',
    event_time='shipped_on',
    batch_size='month',
    begin=backfill_assets.partitions_begin('sales.shipped_lines'),
  )
}}

select shipped_on, count(*) as lines, sum(amount) as amount, min(amount) as smallest
from {{ source('sales', 'shipped_lines') }}
group by shipped_on

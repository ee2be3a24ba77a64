{# Lines, quantity and net price shipped per month and ship mode; each month replaced on its own. #}
{{
  config(
    materialized='incremental',
    incremental_strategy='microbatch',
    event_time='ship_month',
    batch_size='month',
    begin=backfill_assets.partitions_begin('reporting.shipped_lines'),
  )
}}

select
    date_trunc('month', ship_date)::date as ship_month,
    ship_mode,
    count(*) as lines,
    sum(quantity) as quantity,
    sum(net_price) as net_price
from {{ source('reporting', 'shipped_lines') }}
group by 1, 2

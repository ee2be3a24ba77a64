{{ config(meta={'dagster': {'ref': {'name': 'shipped_by_mode'}}, 'partition_column': 'ship_month'}) }}
{# One row per month of the window whose lines or net price differ from shipped_lines'. #}
with source as (
    select date_trunc('month', ship_date)::date as ship_month, count(*) as lines,
           sum(net_price) as net_price
    from {{ source('reporting', 'shipped_lines') }}
    where {{ backfill_assets.partition_window_filter('ship_date') }}
    group by 1
),
model as (
    select ship_month, sum(lines) as lines, sum(net_price) as net_price
    from {{ ref('shipped_by_mode') }}
    where {{ backfill_assets.partition_window_filter('ship_month') }}
    group by 1
)
select coalesce(s.ship_month, m.ship_month) as partition_key,
       s.lines as source_lines, m.lines as model_lines
from source s
full join model m on m.ship_month = s.ship_month
where m.ship_month is null or s.ship_month is null
   or m.lines <> s.lines or m.net_price <> s.net_price

{#
  Scope data tests to the run's partition window without --vars (a change of --vars forces a
  full re-parse). The window is read at execution time from dbt build's
  --event-time-start/--event-time-end flags; without them (dbt test, parse) nothing is filtered.
#}
{% macro partition_window_filter(column) -%}
  {%- set args = invocation_args_dict -%}
  {%- set start = args.get('event_time_start') -%}
  {%- set end = args.get('event_time_end') -%}
  {%- if start and end -%}
    {{ column }} >= '{{ backfill_assets.utc_instant(start) }}' and {{ column }} < '{{ backfill_assets.utc_instant(end) }}'
  {%- else -%}
    true
  {%- endif -%}
{%- endmacro %}

{#
  A window bound as an untyped UTC literal, '2024-03-01 13:00:00+00': it takes the column's type,
  a date column reads its day, a timestamptz column the UTC instant whatever the session's time
  zone, a timestamp column the UTC wall-clock time (dbt's flags are UTC).
#}
{% macro utc_instant(value) -%}
  {%- set text = (value.strftime("%Y-%m-%d %H:%M:%S") if value is not string else value | replace("T", " ")) -%}
  {{- text[:10] ~ ' ' ~ (text[11:19] if text | length >= 19 else '00:00:00') ~ '+00' -}}
{%- endmacro %}

{#
  Generic tests whose config carries meta.partition_column are filtered to the window; an explicit
  `where` config still applies on top.
#}
{% macro postgres__get_where_subquery(relation) -%}
  {%- set where = config.get('where', '') -%}
  {%- set partition_column = (config.get('meta') or {}).get('partition_column') -%}
  {%- if partition_column -%}
    {%- set where = backfill_assets.partition_window_filter(partition_column) ~ (' and (' ~ where ~ ')' if where else '') -%}
  {%- endif -%}
  {%- if where -%}
    {%- do return('(select * from ' ~ relation ~ ' where ' ~ where ~ ') dbt_subquery') -%}
  {%- else -%}
    {%- do return(relation) -%}
  {%- endif -%}
{%- endmacro %}

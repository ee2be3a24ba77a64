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
    {{ column }} >= '{{ start.strftime("%Y-%m-%d") if start is not string else start[:10] }}'
    and {{ column }} < '{{ end.strftime("%Y-%m-%d") if end is not string else end[:10] }}'
  {%- else -%}
    true
  {%- endif -%}
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

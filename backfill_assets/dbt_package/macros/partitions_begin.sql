{#
  The first partition of a declared table (tables/<name>.yaml), as a microbatch model's `begin`:
  begin=backfill_assets.partitions_begin('schema.table').
  backfill_assets sets BACKFILL_BEGIN__<SCHEMA>__<TABLE> from the declaration for every dbt call,
  so the date is written once, in the table's declaration.
#}
{% macro partitions_begin(table) -%}
  {#- The default only lets dbt parse a model whose table is not declared; such a model is not
      loaded (backfill_assets/defs/dbt.py, models_by_partitioning), so it is never built. -#}
  {{ return(env_var('BACKFILL_BEGIN__' ~ (table | replace('.', '__') | upper), '1970-01-01')) }}
{%- endmacro %}

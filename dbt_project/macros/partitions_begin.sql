{#
  The first partition of a declared table (tables/<name>.yaml), as a microbatch model's `begin`.
  backfill_assets sets BACKFILL_BEGIN__<SCHEMA>__<TABLE> from the declaration for every dbt call,
  so the date is written once, in the table's declaration.
#}
{% macro partitions_begin(table) -%}
  {{ return(env_var('BACKFILL_BEGIN__' ~ (table | replace('.', '__') | upper))) }}
{%- endmacro %}

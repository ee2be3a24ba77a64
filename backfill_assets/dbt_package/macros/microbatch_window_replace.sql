{#
  Microbatch on PostgreSQL, as DELETE-INSERT of the batch's window.

  dbt-postgres implements microbatch as a MERGE on unique_key, so a day whose source rows vanished
  (an erased customer, a cancelled import) would keep its old row. This override deletes exactly
  the batch window [event_time_start, event_time_end) and inserts the batch, in the batch's own
  transaction: the same contract as backfill_assets.writer.replace_partition.
  The literals stay untyped, as in dbt's own event-time filter, so they take the column's type
  (a date; for an hour a timestamp, read as UTC, or a timestamptz, read with the literal's +00:00)
  and the batch's boundaries do not depend on the session time zone.

  The batch first locks (model, batch) for the rest of its transaction, with the key the tables'
  writer uses for (table, partition) (backfill_assets/core/writer.py lock_partition): two dbt
  invocations building the same day at once (by hand, in CI, beside a backfill) would otherwise
  both DELETE before either INSERT is visible, and the day would hold its rows twice. Whoever
  runs dbt, builds of one day take turns.

  A lock not granted within the session's lock_timeout (the declared tables', PGOPTIONS) rolls
  the attempt back to its savepoint and tries again after a back-off with jitter, as the tables'
  writes do (backfill_assets/core/writer.py with_lock_retries), up to BACKFILL_DBT_LOCK_RETRIES
  times (the declared tables' fewest); then the batch fails with PostgreSQL's lock timeout error.
#}
{% macro postgres__get_incremental_microbatch_sql(arg_dict) %}
  {%- set target = arg_dict["target_relation"] -%}
  {%- set source = arg_dict["temp_relation"] -%}
  {%- set columns = get_quoted_csv(arg_dict["dest_columns"] | map(attribute="name")) -%}
  {%- set event_time = adapter.quote(model.config.event_time) -%}
  {#- The batch's partition key as the tables' writer spells it: 2024-03-01 for a day, a month
      (its first day) or a year, 2024-03-01-13:00 for an hour; unique per batch of the model. -#}
  {%- set stamp = model.batch.event_time_start | string -%}
  {%- set partition_key = stamp[:10] ~ ('-' ~ stamp[11:16] if model.config.batch_size == 'hour' else '') -%}
  {%- set retries = env_var("BACKFILL_DBT_LOCK_RETRIES", "0") | int -%}
  do $backfill_batch$
  declare
    tries int := 0;
  begin
    loop
      begin
        perform pg_advisory_xact_lock(
          hashtext('{{ target.schema }}.{{ target.identifier }}'), hashtext('{{ partition_key }}')
        );
        delete from {{ target }}
        where {{ event_time }} >= '{{ model.batch.event_time_start }}'
          and {{ event_time }} < '{{ model.batch.event_time_end }}'
        {%- for predicate in (arg_dict.get("incremental_predicates") or []) %} and {{ predicate }}{% endfor %};
        insert into {{ target }} ({{ columns }})
        select {{ columns }} from {{ source }};
        exit;
      exception when lock_not_available then
        tries := tries + 1;
        if tries > {{ retries }} then
          raise;
        end if;
        raise warning 'backfill_assets: {{ target.identifier }} {{ partition_key }}: a lock was not granted within the lock timeout; retry % of {{ retries }}', tries;
        perform pg_sleep(least(15, 0.2 * 2 ^ (tries - 1)) * (0.5 + random() / 2));
      end;
    end loop;
  end
  $backfill_batch$
{% endmacro %}

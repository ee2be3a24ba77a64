"""Safe, fast backfills of date-partitioned PostgreSQL tables, orchestrated by Dagster."""

"""Every asset, check, job and resource, derived from the table registry in one place."""

import logging

import psycopg
from dagster import Definitions

from backfill_assets.core import settings
from backfill_assets.core.contract import check_contracts
from backfill_assets.core.database import DatabaseUnavailableError, connect
from backfill_assets.core.registry import Registry
from backfill_assets.core.run_sizing import (
    HISTORY_TABLE,
    UNMEASURED_PER_RUN,
    seconds_per_partition,
    sizes,
)
from backfill_assets.core.session_limits import TimedOut, definitions_load, timed
from backfill_assets.core.strategies import strategy_of
from backfill_assets.defs.dbt import dbt_model_assets, installed_dbt, model_groups
from backfill_assets.defs.executors import run_executor
from backfill_assets.defs.jobs import table_jobs
from backfill_assets.defs.late_data import late_data_sensor
from backfill_assets.defs.resources import PostgresResource
from backfill_assets.defs.rollback import rollback_job
from backfill_assets.defs.table_assets import source_specs, table_asset

log = logging.getLogger("backfill_assets")


def build_definitions(registry: Registry, *, check_sql: bool = True) -> Definitions:
    """The code location for ``registry``.

    With ``check_sql`` every table's SQL is described by the database first: a query that does
    not yield its declared columns fails loading with one message naming the table, the file and
    the columns (``ContractError``). An unreachable database only skips the check (the runs check
    again before writing), so the UI still loads to say what is wrong. The same load sizes each
    table's backfill runs from its measured cost, shared with the tables its dbt models link it
    to (``core/run_sizing.py``); without ``check_sql`` runs get the unmeasured default.
    """
    if check_sql:
        try:
            url = settings.data_url()
        except settings.SettingsError as exc:
            unchecked = [f"SQL contracts not checked at load: {exc}"]
        else:
            unchecked = check_contracts(registry, url)
        for message in unchecked:
            log.warning(message)
    groups = model_groups(registry)
    measured = measured_costs() if check_sql else {}
    run_sizes = sizes(registry, measured, [group.tables for group in groups.values()])
    tables = [table_asset(table, run_sizes[table.qualified_name]) for table in registry]
    assets = [*tables, *dbt_model_assets(registry, run_sizes, groups)]
    return Definitions(
        assets=[*source_specs(registry), *assets],
        jobs=[job for table in registry for job in table_jobs(table, assets)]
        + [rollback_job(registry)],
        sensors=[late_data_sensor(table) for table in registry if strategy_of(table).late_data],
        resources={"postgres": PostgresResource(), "dbt": installed_dbt()},
        # In each run's process, or on Celery workers (BACKFILL_EXECUTOR; defs/executors.py).
        executor=run_executor(),
    )


def measured_costs() -> dict[str, float]:
    """Seconds per partition of each table's recent writes; none when the database is away, or
    when the history cannot be read within the load's limits (a lock held on it): the load never
    waits on it longer, and says so."""
    limits = definitions_load()
    try:
        with (
            timed(HISTORY_TABLE, limits),
            connect(
                settings.data_url(), application_name="backfill_assets.load", limits=limits
            ) as conn,
        ):
            return seconds_per_partition(conn)
    except TimedOut as exc:
        log.warning(
            f"runs sized without measurements: {exc}. Until the next load, tables without "
            f"partitions_per_run get {UNMEASURED_PER_RUN} partitions per run"
        )
    except (settings.SettingsError, DatabaseUnavailableError, psycopg.Error) as exc:
        log.debug(f"runs sized without measurements ({exc})")
    return {}

"""What every command needs before Dagster or dbt runs: a reachable database, the databases
created, the dbt manifest parsed, and the environment variables for child processes."""

from __future__ import annotations

import os

from backfill_assets.core import settings
from backfill_assets.core.database import connect, ensure_database
from backfill_assets.core.privileges import require_dagster_grants, require_data_grants
from backfill_assets.project import ensure_manifest
from backfill_assets.tooling import embedded


def prepare(*, create_databases: bool | None = None) -> dict[str, str]:
    """Make the database reachable and return the environment for Dagster, the daemon and dbt.

    Missing databases are created on the embedded cluster, or when ``create_databases`` asks
    (``db start``, the demo); on your own server they are otherwise an error naming them.
    """
    settings.dbt_in_process()  # bad values are refused before anything starts
    settings.executor()
    embedded_server = settings.uses_embedded_postgres()
    if embedded_server:
        embedded.start(settings.embedded_pgdata())
    create = embedded_server if create_databases is None else create_databases
    data_url = settings.data_url()
    ensure_database(data_url, create=create, variable=settings.DATA_URL_ENV)
    env = settings.process_env()
    dagster_url = settings.to_libpq(env[settings.DAGSTER_URL_ENV])
    dagster_variable = (
        settings.DAGSTER_URL_ENV
        if os.environ.get(settings.DAGSTER_URL_ENV)
        else f"{settings.DAGSTER_URL_ENV} unset, so the data server's database dagster"
    )
    ensure_database(dagster_url, create=create, variable=dagster_variable)
    with connect(data_url) as conn:
        sources, updated = _declared_sources()
        require_data_grants(conn, sources, settings.DATA_URL_ENV, updated)
    with connect(dagster_url, variable=dagster_variable) as conn:
        require_dagster_grants(conn, dagster_variable)
    os.environ.update(env)
    ensure_manifest()
    return env


def _declared_sources() -> tuple[list[str], list[str]]:
    """The source tables the declarations read, and the tables they update in place (none when
    a declaration is broken: the commands that load them say what is wrong)."""
    from backfill_assets.core.registry import load_registry
    from backfill_assets.core.strategies import strategy_of

    try:
        registry = load_registry()
    except ValueError:
        return [], []
    sources = [source for table in registry for source in table.upstream]
    updated = [name for table in registry for name in strategy_of(table).updated_tables(table)]
    return sources, updated

"""What every command needs before Dagster or dbt runs: a reachable database, the databases
created, the dbt manifest parsed, and the environment variables for child processes."""

from __future__ import annotations

import os

from backfill_assets.core import settings
from backfill_assets.core.database import ensure_database
from backfill_assets.project import ensure_manifest
from backfill_assets.tooling import embedded


def prepare(*, create_databases: bool | None = None) -> dict[str, str]:
    """Make the database reachable and return the environment for Dagster, the daemon and dbt.

    Missing databases are created on the embedded cluster, or when ``create_databases`` asks
    (``db start``, the demo); on your own server they are otherwise an error naming them.
    """
    embedded_server = settings.uses_embedded_postgres()
    if embedded_server:
        embedded.start(settings.embedded_pgdata())
    create = embedded_server if create_databases is None else create_databases
    ensure_database(settings.data_url(), create=create, variable=settings.DATA_URL_ENV)
    env = settings.process_env()
    ensure_database(
        settings.to_libpq(env[settings.DAGSTER_URL_ENV]),
        create=create,
        variable=settings.DAGSTER_URL_ENV
        if os.environ.get(settings.DAGSTER_URL_ENV)
        else f"{settings.DAGSTER_URL_ENV} unset, so the data server's database dagster",
    )
    os.environ.update(env)
    ensure_manifest()
    return env

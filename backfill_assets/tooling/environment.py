"""What every command needs before Dagster or dbt runs: a reachable database, the databases
created, the dbt manifest parsed, and the environment variables for child processes."""

from __future__ import annotations

import os

from backfill_assets.core import settings
from backfill_assets.core.database import ensure_database
from backfill_assets.project import ensure_manifest
from backfill_assets.tooling import embedded


def prepare() -> dict[str, str]:
    """Make the database reachable and return the environment for Dagster, the daemon and dbt."""
    if settings.uses_embedded_postgres():
        embedded.start(settings.embedded_pgdata())
    ensure_database(settings.data_url())
    env = settings.process_env()
    ensure_database(settings.to_libpq(env[settings.DAGSTER_URL_ENV]))
    os.environ.update(env)
    ensure_manifest()
    return env

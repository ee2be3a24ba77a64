"""Dagster resources, built from the environment (see ``settings``)."""

from __future__ import annotations

import sys

import psycopg
from dagster import ConfigurableResource, InitResourceContext

from backfill_assets.core import settings
from backfill_assets.core.database import connect
from backfill_assets.core.session_limits import SessionLimits
from backfill_assets.defs.run_launcher import record_worker


def in_celery_task() -> bool:
    """Whether this code runs inside a Celery task (a step on a worker)."""
    celery = sys.modules.get("celery")
    return celery is not None and bool(celery.current_task)


class PostgresResource(ConfigurableResource):
    """The database that holds the source (``app``) and target (``analytics``) tables.

    ``url`` is normally left empty, so that ``BACKFILL_PG_URL`` (or the embedded cluster) decides
    where the data lives; tests set it to their own database.
    """

    url: str | None = None

    def setup_for_execution(self, context: InitResourceContext) -> None:
        """Record the run's worker (host, pid) as the run starts, so run monitoring can tell a
        dead one, whoever launched the run (``run_launcher.record_worker``). A step on a Celery
        worker is not the run's process (that one orchestrates elsewhere): it records nothing,
        and the worker's name is in the step's event "Executing steps ... in celery worker"."""
        if context.instance is not None and context.run is not None and not in_celery_task():
            record_worker(context.instance, context.run)

    def resolved_url(self) -> str:
        return self.url or settings.data_url()

    def connect(self, limits: SessionLimits | None = None) -> psycopg.Connection:
        """A connection under ``limits`` (a table's run passes its declared timeouts), else the
        bookkeeping ones (``core/session_limits.py``)."""
        return connect(
            self.resolved_url(), application_name="backfill_assets.dagster", limits=limits
        )

"""A run's process, forked from a server that has already imported Dagster, dbt and the drivers.

Dagster's default launcher starts every run as a new Python interpreter (the code server's
``multiprocessing`` spawn), which imports Dagster, dagster-dbt and dbt again before it writes a
row: ~2-3 s of CPU per run, most of a small run's cost (docs/measurements.md). The project's
launcher (``run_launcher.py``) instead forks each run from a ``multiprocessing`` fork server that
imported this module, and so those libraries, once. The project's own code is *not* imported
here: each run imports ``backfill_assets`` and builds the definitions itself, as a spawned run
does, so a run always executes the code as it is on disk when the run starts.

This module must therefore import nothing of the project but the fence of Dagster's private
names (``dagster_internals``, imports only).
"""

from __future__ import annotations

# The libraries a run imports, loaded once by the fork server (what makes a fork cheap).
import dagster  # noqa: F401
import dagster_dbt  # noqa: F401
import dagster_postgres  # noqa: F401
import dbt.adapters.postgres
import dbt.cli.main  # noqa: F401  (a run's dbt commands run in its process: dbt_in_process)
import psycopg  # noqa: F401
from dagster import DagsterInstance

from backfill_assets.defs.dagster_internals import (
    InstanceRef,
    capture_interrupts,
    execute_run_command_body,
)


def execute_run(run_id: str, instance_ref: InstanceRef) -> None:
    """Execute the run as ``dagster api execute_run`` does: load its job from the run's code
    origin, report "Started process for run (pid: N)", run it. SIGINT cancels it (the launcher's
    ``terminate``), as the code server's termination event does for a spawned run."""
    with capture_interrupts(), DagsterInstance.from_ref(instance_ref) as instance:
        execute_run_command_body(run_id, instance, lambda _event: None, False)

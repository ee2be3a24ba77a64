"""The dbt project's models as partitioned Dagster assets, rebuilt one partition window at a time.

Dagster passes the run's partition window to dbt as ``--event-time-start/--event-time-end``; the
microbatch models replace each day of it in its own transaction, and the models' dbt tests run
on the window afterwards, reported as one check result per test and day (``dbt_checks``). One
``dbt build`` covers the whole window of a run, because dbt's start-up (~3 s) costs far more than
a day's batch (~30 ms).
"""

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dagster import AssetExecutionContext
from dagster_dbt import DbtCliResource, DbtProject, dbt_assets

from backfill_assets.database import first_build_lock
from backfill_assets.dbt_checks import PartitionedChecksTranslator, per_partition_check_events
from backfill_assets.defs.partitioned_tables import BACKFILL_POLICY
from backfill_assets.partitions import daily_partitions
from backfill_assets.resources import PostgresResource
from backfill_assets.settings import DBT_PROJECT_DIR, connection_parts

DBT_EXECUTABLE = str(Path(sys.executable).parent / "dbt")

dbt_project = DbtProject(project_dir=DBT_PROJECT_DIR, profiles_dir=DBT_PROJECT_DIR)


def ensure_manifest() -> Path:
    """Parse the dbt project if its manifest is missing or older than a project file.

    Parsing needs no database; it costs a few seconds, so it only runs after an edit.
    """
    manifest = dbt_project.manifest_path
    sources = [
        path
        for pattern in ("*.yml", "models/**/*", "macros/**/*", "tests/**/*")
        for path in DBT_PROJECT_DIR.glob(pattern)
        if path.is_file()
    ]
    if not manifest.exists() or max(p.stat().st_mtime for p in sources) > manifest.stat().st_mtime:
        subprocess.run(
            [DBT_EXECUTABLE, "parse", "--quiet"],
            cwd=DBT_PROJECT_DIR,
            env={**os.environ, "DBT_PROFILES_DIR": str(DBT_PROJECT_DIR)},
            check=True,
        )
    return dbt_project.manifest_path


def incremental_relations(manifest_path: Path) -> list[tuple[str, str]]:
    """``(schema, table)`` of every incremental model: the tables dbt creates on first use."""
    nodes = json.loads(manifest_path.read_text())["nodes"].values()
    return [
        (node["schema"], node["alias"])
        for node in nodes
        if node["resource_type"] == "model" and node["config"]["materialized"] == "incremental"
    ]


@contextmanager
def dbt_connection_env(postgres: PostgresResource) -> Iterator[None]:
    """Point dbt's profile at the same database as the ``postgres`` resource for one call."""
    values = connection_parts(postgres.resolved_url()).as_dbt_env()
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


MANIFEST_PATH = ensure_manifest()
INCREMENTAL_RELATIONS = incremental_relations(MANIFEST_PATH)


@dbt_assets(
    manifest=MANIFEST_PATH,
    project=dbt_project,
    partitions_def=daily_partitions,
    backfill_policy=BACKFILL_POLICY,
    dagster_dbt_translator=PartitionedChecksTranslator(),
)
def dbt_models(context: AssetExecutionContext, dbt: DbtCliResource, postgres: PostgresResource):
    window = context.partition_time_window
    # build = the window's batches, then the models' tests scoped to the window (one start-up).
    args = [
        "build",
        "--event-time-start",
        window.start.strftime("%Y-%m-%d"),
        "--event-time-end",
        window.end.strftime("%Y-%m-%d"),
    ]
    # Two runs of one backfill (a week each) reach this step together; the first build of a table
    # must not race (see first_build_lock). Once the tables exist, runs go on side by side.
    with first_build_lock(
        postgres.resolved_url(), INCREMENTAL_RELATIONS, name="dbt"
    ) as first_build:
        if first_build:
            context.log.info(f"first build of {first_build}: other dbt runs wait until it is done")
        with dbt_connection_env(postgres):
            invocation = dbt.cli(args, context=context, raise_on_error=False)
        with postgres.connect() as conn:
            yield from per_partition_check_events(context, invocation, conn)


dbt_resource = DbtCliResource(
    project_dir=dbt_project, profiles_dir=str(DBT_PROJECT_DIR), dbt_executable=DBT_EXECUTABLE
)

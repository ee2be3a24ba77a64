"""The dbt project's models as partitioned Dagster assets, rebuilt one partition window at a time.

A model takes the partitions of the declared table it reads (found through its dbt sources), so
the marts of a 2024 daily table and of a 1990s monthly one each get their own range; one
``@dbt_assets`` definition is made per distinct partitioning. Dagster passes the run's partition
window to dbt as ``--event-time-start/--event-time-end``; the microbatch models replace each day of
it in its own transaction, and the models' dbt tests run on the window afterwards, reported as one
check result per test and day (``dbt_checks``). One ``dbt build`` covers the whole window of a
run, because dbt's start-up (~3 s) costs far more than a day's batch (~30 ms).
"""

import hashlib
import logging
import os
import shutil
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import dbt.version
from dagster import AssetExecutionContext, AssetsDefinition, Failure
from dagster_dbt import DbtCliInvocation, DbtCliResource, DbtProject, dbt_assets
from packaging import version

from backfill_assets.core.control import hold_back
from backfill_assets.core.database import first_build_lock
from backfill_assets.core.partitioning import Partitioning
from backfill_assets.core.registry import (
    DEFAULT_TABLES_DIR,
    TABLES_PATH_ENV,
    DeclarationError,
    Registry,
    load_registry,
)
from backfill_assets.core.run_sizing import UNMEASURED_PER_RUN
from backfill_assets.core.session_limits import of_tables
from backfill_assets.core.settings import (
    DBT_PACKAGE_DIR,
    DEFAULT_DBT_PROJECT_DIR,
    connection_parts,
    dbt_in_process,
    dbt_project_dir,
)
from backfill_assets.core.tables import Timeouts
from backfill_assets.core.throttle import ThrottleTimeout
from backfill_assets.defs.dagster_internals import BACKFILL_ID_TAG
from backfill_assets.defs.dbt_checks import (
    PartitionedChecksTranslator,
    checked_days,
    per_partition_check_events,
)
from backfill_assets.defs.dbt_in_process import in_process
from backfill_assets.defs.dbt_windows import check_batch_sizes, event_time_args
from backfill_assets.defs.partitions import WRITES_POOL, backfill_policy, partitions_def
from backfill_assets.defs.resources import PostgresResource
from backfill_assets.project import DBT_EXECUTABLE, dbt_env, ensure_manifest, parse_dir

log = logging.getLogger("backfill_assets")
PARTIAL_PARSE_FILE_NAME = "partial_parse.msgpack"
"""dbt's partial-parse file, in its target folder."""
_NAME_SAFE = str.maketrans("-:", "__")


def incremental_relations(manifest: Mapping) -> list[tuple[str, str]]:
    """``(schema, table)`` of every incremental model: the tables dbt creates on first use."""
    return [
        (node["schema"], node["alias"])
        for node in manifest["nodes"].values()
        if node["resource_type"] == "model" and node["config"]["materialized"] == "incremental"
    ]


@dataclass
class ModelGroup:
    """The models built by one ``@dbt_assets`` definition (one partitioning), and the declared
    tables they read (qualified names): those tables and these models share one backfill policy,
    so their runs are sized together (``core/run_sizing.py``)."""

    models: list[str] = field(default_factory=list)
    tables: set[str] = field(default_factory=set)


def model_groups(registry: Registry) -> dict[Partitioning | None, ModelGroup]:
    """The dbt project's models for ``registry``, grouped as ``dbt_model_assets`` builds them."""
    manifest = ensure_manifest(registry)
    left_out = demo_tables_left_out(registry, Path(dbt_project().project_dir))
    return models_by_partitioning(manifest, registry, left_out)


def models_by_partitioning(
    manifest: Mapping, registry: Registry, left_out: Collection[tuple[str, str]] = ()
) -> dict[Partitioning | None, ModelGroup]:
    """Models grouped by the partitioning of the declared table(s) they read.

    A model reads a declared table through a dbt source pointing at it, directly or through other
    models. Models that read none are unpartitioned; a model reading two tables partitioned
    differently cannot be built per partition and is refused with both names. A model reading a
    table no declaration builds is not loaded, with a warning, unless every such table is in
    ``left_out`` (``demo_tables_left_out``).
    """
    declared = registry.by_asset_path()
    nodes, sources = manifest["nodes"], manifest["sources"]

    def tables_read(unique_id: str, seen: set[str]) -> set[tuple[str, str]]:
        if unique_id in seen:
            return set()
        seen.add(unique_id)
        if unique_id in sources:
            source = sources[unique_id]
            relation = (source["schema"], source.get("identifier") or source["name"])
            marked = (source.get("config", {}).get("meta") or source.get("meta") or {}).get(
                "backfill_declared"
            )
            return {relation} if relation in declared or marked else set()
        found: set[tuple[str, str]] = set()
        for parent in nodes.get(unique_id, {}).get("depends_on", {}).get("nodes", []):
            found |= tables_read(parent, seen)
        return found

    groups: dict[Partitioning | None, ModelGroup] = {}
    for unique_id, node in nodes.items():
        if node["resource_type"] != "model":
            continue
        read = tables_read(unique_id, set())
        undeclared = sorted(".".join(relation) for relation in read if relation not in declared)
        if undeclared:
            message = (
                f"dbt model {node['name']} is not loaded: it reads {', '.join(undeclared)}, "
                f"which no declaration in {TABLES_PATH_ENV} builds"
            )
            quiet = read.difference(declared) <= set(left_out)
            log.log(logging.DEBUG if quiet else logging.WARNING, message)
            continue
        partitionings = {declared[relation].partitioning.calendar for relation in read}
        if len(partitionings) > 1:
            names = ", ".join(sorted(".".join(relation) for relation in read))
            raise DeclarationError(
                f"dbt model {node['name']} reads tables partitioned differently ({names}); "
                "a model is built per partition of one range: give those tables the same "
                "partitions, or split the model"
            )
        key = declared[next(iter(read))].partitioning if read else None
        group = groups.setdefault(key and key.calendar, ModelGroup())
        group.models.append(node["name"])
        group.tables.update(declared[relation].qualified_name for relation in read)
    return groups


def demo_tables_left_out(registry: Registry, project_dir: Path) -> set[tuple[str, str]]:
    """The demo's tables ``registry`` leaves out, when ``project_dir`` is the demo's dbt project:
    its marts are then left out as a matter of course (``BACKFILL_TABLES_PATH`` without
    ``tables/``), not a mistake to warn about on every command. A user's dbt project reading an
    undeclared table is still warned about."""
    if project_dir != DEFAULT_DBT_PROJECT_DIR:
        return set()
    demo = set(load_registry([DEFAULT_TABLES_DIR]).by_asset_path())
    return demo - set(registry.by_asset_path())


@contextmanager
def dbt_process_env(postgres: PostgresResource, registry: Registry) -> Iterator[Path]:
    """Point dbt's profile at the ``postgres`` resource's database, and give it the first
    partitions of the registry's tables (the ones the definitions were built from), for one call.

    Yields the folder dagster-dbt starts the build from (``DBT_TARGET_PATH``): one per database
    under the registry's ``parse_dir``. dbt reparses the whole project when the profile's
    connection differs from the one its partial-parse file was written with (~2 s of CPU), and the
    manifest is parsed without a connection; so the first build on a database starts from the
    registry's parse, and ``keep_partial_parse`` keeps what that build parsed for the next ones.
    """
    connection = connection_parts(postgres.resolved_url())
    target = builds_dir(registry, postgres.resolved_url())
    target.mkdir(parents=True, exist_ok=True)
    registry_parse = parse_dir(registry) / PARTIAL_PARSE_FILE_NAME
    if not (target / PARTIAL_PARSE_FILE_NAME).exists() and registry_parse.exists():
        _replace_atomically(registry_parse, target / PARTIAL_PARSE_FILE_NAME)
    values = {
        **connection.as_dbt_env(),
        **dbt_env(registry),
        "PGOPTIONS": _timeout_options(registry),
        # A batch retries a lock timeout as a table's write does (microbatch_window_replace.sql).
        "BACKFILL_DBT_LOCK_RETRIES": str(
            min((t.timeouts.lock_retries for t in registry), default=Timeouts().lock_retries)
        ),
        # dagster-dbt starts each build from this folder's partial parse.
        "DBT_TARGET_PATH": str(target),
    }
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield target
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def builds_dir(registry: Registry, url: str) -> Path:
    """Where the builds on the database at ``url`` start from and leave their folders: one per
    database (host, port, user, name) under the registry's ``parse_dir``."""
    connection = connection_parts(url)
    where = "\n".join([connection.host, connection.port, connection.user, connection.dbname])
    return parse_dir(registry) / f"on-{hashlib.sha1(where.encode()).hexdigest()[:12]}"


def keep_partial_parse(build_target: Path, target: Path) -> None:
    """The partial-parse file a build wrote in its own folder (``build_target``) becomes the one
    the next build on the same database starts from (``target``); dbt writes it only when it
    parsed something, and checks it against the project's files itself."""
    written = build_target / PARTIAL_PARSE_FILE_NAME
    if written.exists():
        _replace_atomically(written, target / PARTIAL_PARSE_FILE_NAME)


def _replace_atomically(source: Path, destination: Path) -> None:
    """Copy, then rename: a build starting beside it reads the old file or the new, whole."""
    partial = destination.with_name(f"{destination.name}.{os.getpid()}.partial")
    shutil.copyfile(source, partial)
    os.replace(partial, destination)


def _timeout_options(registry: Registry) -> str:
    """libpq's PGOPTIONS for dbt's sessions: its statements run under the declared tables'
    timeouts (the shortest lock timeout, the longest statement timeout), so a mart's DELETE or
    INSERT never queues behind a lock longer than a table's own write would; kept after any
    options already in the environment."""
    limits = of_tables(t.timeouts for t in registry) if len(registry) else Timeouts().session()
    ours = f"-c lock_timeout={limits.lock_ms}ms -c statement_timeout={limits.statement_ms}ms"
    return " ".join(filter(None, [os.environ.get("PGOPTIONS", ""), ours]))


def dbt_model_assets(
    registry: Registry,
    run_sizes: Mapping[str, int] | None = None,
    groups: Mapping[Partitioning | None, ModelGroup] | None = None,
) -> list[AssetsDefinition]:
    """One ``@dbt_assets`` per partitioning (``groups``, default ``model_groups``); its runs are
    sized like the tables its models read (``run_sizes``, per qualified name), so the daemon
    builds a table and its models in the same runs."""
    manifest = ensure_manifest(registry)
    incremental = incremental_relations(manifest)
    sizes = run_sizes or {}
    project = dbt_project()
    return [
        _dbt_assets(
            manifest,
            project,
            group.models,
            partitioning,
            incremental,
            registry,
            min((sizes[t] for t in group.tables if t in sizes), default=UNMEASURED_PER_RUN),
        )
        for partitioning, group in (groups or model_groups(registry)).items()
    ]


def _dbt_assets(
    manifest: Mapping,
    project: DbtProject,
    models: list[str],
    partitioning: Partitioning | None,
    incremental: list[tuple[str, str]],
    registry: Registry,
    partitions_per_run: int,
) -> AssetsDefinition:
    if partitioning:
        check_batch_sizes(manifest, models, partitioning)
    definition = partitions_def(partitioning) if partitioning else None
    throttled = [t for t in registry if partitioning and t.partitioning.calendar == partitioning]
    name = (
        f"dbt_{partitioning.granularity}_from_{partitioning.first_key().translate(_NAME_SAFE)}"
        if partitioning
        else "dbt_unpartitioned"
    )

    @dbt_assets(
        manifest=manifest,
        project=project,
        select=" ".join(sorted(models)),
        name=name,
        partitions_def=definition,
        backfill_policy=backfill_policy(partitions_per_run) if definition else None,
        pool=WRITES_POOL,
        dagster_dbt_translator=PartitionedChecksTranslator(definition),
    )
    def _models(context: AssetExecutionContext, dbt: DbtCliResource, postgres: PostgresResource):
        args = ["build"]
        checked = checked_days(context, definition) if definition is not None else None
        if checked is not None:
            # build = the window's batches, then the models' tests scoped to the window.
            first, last = checked.span[0], checked.span[-1]
            args += event_time_args(definition, first, last, partitioning.granularity)
        # Like a table's write: held back while the database is under stress (each table of
        # this calendar's throttle), then while the backfill is paused (core/control.py).
        with postgres.connect() as conn:
            backfill_id = context.run.tags.get(BACKFILL_ID_TAG)
            try:
                hold_back(conn, throttled, [backfill_id], context.log.warning)
            except ThrottleTimeout as exc:
                raise Failure(f"the dbt models were not built: {exc}; retry later") from None
        # Two runs of one backfill reach this step together; the first build of a
        # table must not race (see first_build_lock). Once the tables exist, runs go side by side.
        with first_build_lock(postgres.resolved_url(), incremental, name="dbt") as first_build:
            if first_build:
                context.log.info(f"first build of {first_build}: other dbt runs wait for it")
            # Builds of the same day take turns inside dbt itself: each batch locks its model and
            # day (backfill_assets/dbt_package/macros/microbatch_window_replace.sql), whoever
            # runs dbt.
            with dbt_process_env(postgres, registry) as target:
                invocation = dbt.cli(args, context=context, raise_on_error=checked is None)
                try:
                    if checked is None:
                        yield from invocation.stream()
                        return
                    with postgres.connect() as conn:
                        yield from per_partition_check_events(context, invocation, conn, checked)
                finally:
                    keep_partial_parse(invocation.target_path, target)

    return _models


class InstalledDbt(DbtCliResource):
    """dagster-dbt's resource for the dbt installed beside the project (``DBT_EXECUTABLE``).

    Before a run's first dbt call, dagster-dbt asks the executable its version (``dbt
    --version``: a process costing ~2 s of CPU, in every run, and a look at PyPI for the latest
    release). That executable is the dbt-core this process imports, so its version is read from
    the import instead. And before each call it loads dbt's adapter and macros in this process
    (~1 s) for ``fetch_row_counts``/``fetch_column_metadata``, which the project does not use:
    without an adapter dagster-dbt skips that metadata, and dbt itself is unchanged. And dbt runs
    in the run's own process rather than a child that imports it again (``dbt_in_process``).
    """

    def cli(self, args: Sequence[str], **options) -> DbtCliInvocation:
        with in_process():
            return super().cli(args, **options)

    @cached_property
    def _cli_version(self) -> version.Version:
        return version.parse(dbt.version.__version__)

    def _initialize_dbt_core_adapter(self, args: Sequence[str]) -> None:
        return None


def dbt_project() -> DbtProject:
    """The dbt project of ``BACKFILL_DBT_PROJECT`` (default: the demo's), run with the profile of
    backfill_assets' dbt package."""
    return DbtProject(project_dir=dbt_project_dir(), profiles_dir=DBT_PACKAGE_DIR)


def installed_dbt() -> InstalledDbt:
    """The ``dbt`` resource for ``dbt_project()``."""
    dbt_in_process()  # a bad BACKFILL_DBT_IN_PROCESS fails the definitions' load, naming it
    project = dbt_project()
    return InstalledDbt(
        project_dir=project, profiles_dir=str(DBT_PACKAGE_DIR), dbt_executable=DBT_EXECUTABLE
    )

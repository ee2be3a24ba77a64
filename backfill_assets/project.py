"""What both the CLI and the definitions need, without importing Dagster: the dbt project
prepared, and the names of each table's backfill jobs.

The dbt project is the demo's ``dbt_project/`` or a user's (``BACKFILL_DBT_PROJECT``). Either
installs backfill_assets' dbt package (``backfill_assets/dbt_package``: the macros that make a
per-partition build safe) and runs with its profile; ``check_dbt_project`` says what a user's
``dbt_project.yml`` must hold, and ``ensure_manifest`` installs the package when it is missing.

The dbt marts read the declared tables, and their microbatch ``begin`` is the first partition of
the table they read. dbt gets it as ``BACKFILL_BEGIN__<SCHEMA>__<TABLE>`` (macro
``partitions_begin``), set from the registry for every dbt call, so the date lives only in the
table's declaration.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import yaml

from backfill_assets.core.registry import Registry, load_registry
from backfill_assets.core.settings import (
    DBT_PACKAGE_DIR,
    DBT_PROJECT_ENV,
    DBT_TARGET_ENV,
    SettingsError,
    dbt_project_dir,
    dbt_target_dir,
)
from backfill_assets.core.tables import TableSpec

DBT_EXECUTABLE = str(Path(sys.executable).parent / "dbt")
PACKAGE = "backfill_assets"
"""The dbt package's name (its ``dbt_project.yml``), which is also its profile's name."""
PACKAGE_ENV = "BACKFILL_DBT_PACKAGE"
"""Where the package is, for a project's ``packages.yml``: ``local: "{{ env_var('...') }}"``."""
PACKAGES_YML = f"packages:\n  - local: \"{{{{ env_var('{PACKAGE_ENV}') }}}}\""


class DbtProjectError(SettingsError):
    """The dbt project cannot be used as it is; the message names the file and what to write."""


def job_name(table: TableSpec, *, with_downstream: bool = False) -> str:
    """``backfill__<schema>__<table>`` (the table) or ``...__with_downstream`` (and what is built
    from it): the jobs ``dagster job backfill -j`` takes."""
    base = f"backfill__{table.schema}__{table.name}"
    return f"{base}__with_downstream" if with_downstream else base


def begin_variable(qualified_name: str) -> str:
    """``analytics.fct_orders`` -> ``BACKFILL_BEGIN__ANALYTICS__FCT_ORDERS``."""
    return "BACKFILL_BEGIN__" + qualified_name.replace(".", "__").upper()


def dbt_env(registry: Registry | None = None) -> dict[str, str]:
    """Variables every dbt call needs besides the connection: the package's folder (the
    project's ``packages.yml`` reads it), the profile's folder, each table's first partition."""
    registry = registry or load_registry()
    return {
        PACKAGE_ENV: str(DBT_PACKAGE_DIR),
        "DBT_PROFILES_DIR": str(DBT_PACKAGE_DIR),
        # A user's project may leave dbt's usage statistics on: dbt would send them, and write
        # its .user.yml into the profiles dir, which is the package's folder.
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
        # dbt's log beside its other files (the project's logs/ unless a folder is named).
        **(
            {"DBT_LOG_PATH": str(dbt_target_dir() / "logs")}
            if os.environ.get(DBT_TARGET_ENV)
            else {}
        ),
        **{
            begin_variable(table.qualified_name): table.partitioning.start.isoformat()
            for table in registry
        },
    }


def parse_dir(registry: Registry | None = None) -> Path:
    """Where dbt's manifest for ``registry``'s first partitions is parsed: one folder per set of
    ``BACKFILL_BEGIN__*`` values (under the dbt project's ``target/``, or this process's
    ``BACKFILL_DBT_TARGET_DIR``). Runs of that registry
    point dagster-dbt here (``DBT_TARGET_PATH``), so each dbt build starts from its partial parse,
    and processes of two registries (the demo's tables, a user's) never undo each other's parse."""
    values = "\n".join(f"{k}={v}" for k, v in sorted(dbt_env(registry).items()))
    return dbt_target_dir() / f"parsed-{hashlib.sha1(values.encode()).hexdigest()[:12]}"


def ensure_manifest(registry: Registry | None = None) -> dict:
    """The dbt manifest for ``registry``, parsed first if it is missing or older than a project
    file (or a macro of the package).

    Parsing needs no database; it costs a few seconds, so it only runs after an edit or for a
    registry not parsed before (its folder is ``parse_dir``). Processes loading the definitions at
    once (the daemon's code server and a ``dagster job backfill``) take turns on a file lock, so
    none reads a half-written manifest. The parse is a full one: dbt's partial parse of an edited
    project has been seen to drop a singular test's description from the manifest; the builds
    still start from the partial-parse file this full parse leaves.
    """
    registry = registry or load_registry()
    project_dir = dbt_project_dir()
    settings = check_dbt_project(project_dir)
    env = {**os.environ, **dbt_env(registry)}
    ensure_package(project_dir, settings, env)
    target = parse_dir(registry)
    manifest = target / "manifest.json"
    with _turns(target / "parse.lock"):
        if not _fresh(manifest, project_dir):
            args = ["parse", "--quiet", "--no-partial-parse", "--target-path", str(target)]
            _dbt(project_dir, env, *args)
        return json.loads(manifest.read_text())


def check_dbt_project(project_dir: Path) -> dict:
    """``project_dir``'s ``dbt_project.yml``, refused unless it runs with the package's profile
    and lets the package's macros replace dbt's own (``dispatch``): without that, a microbatch
    model would be merged rather than replaced per partition, and its tests not scoped to the
    run's partitions."""
    path = project_dir / "dbt_project.yml"
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DbtProjectError(f"{path}: not readable as YAML ({exc})") from None
    if not isinstance(config, dict):
        raise DbtProjectError(f"{path}: not a dbt project (expected name:, profile:, ...)")
    name = config.get("name")
    if name == PACKAGE:
        raise DbtProjectError(
            f"{path}: name {PACKAGE!r} is the name of backfill_assets' dbt package; "
            "give your project another name"
        )
    if config.get("profile") != PACKAGE:
        raise DbtProjectError(
            f"{path}: profile is {config.get('profile')!r}; write `profile: {PACKAGE}` "
            f"(backfill_assets runs dbt with that profile, its connection from BACKFILL_PG_URL)"
        )
    dispatched = any(
        isinstance(entry, dict)
        and entry.get("macro_namespace") == "dbt"
        and PACKAGE in (order := list(entry.get("search_order") or []))
        and ("dbt" not in order or order.index(PACKAGE) < order.index("dbt"))
        for entry in config.get("dispatch") or []
    )
    if not dispatched:
        raise DbtProjectError(
            f"{path}: dbt's macros are not dispatched to backfill_assets' package; add\n"
            f"dispatch:\n  - macro_namespace: dbt\n    search_order: [{name}, {PACKAGE}, dbt]\n"
            "(so each microbatch is replaced per partition, and tests see the run's partitions)"
        )
    return config


def ensure_package(project_dir: Path, config: Mapping, env: Mapping[str, str]) -> None:
    """Install the package into ``project_dir`` (``dbt deps``: a link to a local folder, no
    network) unless this package is installed there already."""
    installed = project_dir / str(config.get("packages-install-path") or "dbt_packages") / PACKAGE

    def current() -> bool:
        if installed.is_symlink():
            return installed.resolve() == DBT_PACKAGE_DIR.resolve()
        # A copy (dbt copies where it cannot link) is current while its files are this
        # package's: one left by another version of backfill_assets is installed again.
        return installed.is_dir() and _files(installed) == _files(DBT_PACKAGE_DIR)

    if current():
        return
    # In the project (not this process's target folder): dbt installs into the project's folder,
    # shared by every process of this host.
    with _turns(project_dir / "target" / "deps.lock"):
        if current():
            return
        try:
            _dbt(project_dir, env, "deps", "--quiet")
        except DbtProjectError as exc:
            problem = f" ({exc})"
        else:
            problem = ""
        if problem or not current():
            raise DbtProjectError(
                f"the dbt project {project_dir} ({DBT_PROJECT_ENV}) does not install "
                f"backfill_assets' dbt package{problem}; its packages.yml must hold\n{PACKAGES_YML}"
            )


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for pattern in ("dbt_project.yml", "macros/**/*")
        for path in folder.glob(pattern)
        if path.is_file()
    }


@contextmanager
def _turns(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _dbt(project_dir: Path, env: Mapping[str, str], *args: str) -> None:
    """``dbt ARGS`` in ``project_dir``; a failure is a ``DbtProjectError`` with dbt's own words."""
    completed = subprocess.run(
        [DBT_EXECUTABLE, *args],
        cwd=project_dir,
        env=dict(env),
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        said = (completed.stdout + completed.stderr).strip()[-3000:]
        raise DbtProjectError(f"`dbt {args[0]}` failed in {project_dir}:\n{said}")


def _fresh(manifest: Path, project_dir: Path) -> bool:
    if not manifest.exists():
        return False
    sources = [
        path
        for folder, pattern in [
            *((project_dir, p) for p in ("*.yml", "models/**/*", "macros/**/*", "tests/**/*")),
            (DBT_PACKAGE_DIR, "macros/**/*"),
        ]
        for path in folder.glob(pattern)
        if path.is_file()
    ]
    return max(p.stat().st_mtime for p in sources) <= manifest.stat().st_mtime

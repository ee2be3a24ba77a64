"""What both the CLI and the definitions need, without importing Dagster: the dbt project
prepared, and the names of each table's backfill jobs.

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
from pathlib import Path

from backfill_assets.core.registry import Registry, load_registry
from backfill_assets.core.settings import DBT_PROJECT_DIR
from backfill_assets.core.tables import TableSpec

DBT_EXECUTABLE = str(Path(sys.executable).parent / "dbt")
TARGET_DIR = DBT_PROJECT_DIR / "target"


def job_name(table: TableSpec, *, with_downstream: bool = False) -> str:
    """``backfill__<schema>__<table>`` (the table) or ``...__with_downstream`` (and what is built
    from it): the jobs ``dagster job backfill -j`` takes."""
    base = f"backfill__{table.schema}__{table.name}"
    return f"{base}__with_downstream" if with_downstream else base


def begin_variable(qualified_name: str) -> str:
    """``analytics.fct_orders`` -> ``BACKFILL_BEGIN__ANALYTICS__FCT_ORDERS``."""
    return "BACKFILL_BEGIN__" + qualified_name.replace(".", "__").upper()


def dbt_env(registry: Registry | None = None) -> dict[str, str]:
    """Variables every dbt call needs besides the connection: each table's first partition."""
    registry = registry or load_registry()
    return {
        begin_variable(table.qualified_name): table.partitioning.start.isoformat()
        for table in registry
    }


def parse_dir(registry: Registry | None = None) -> Path:
    """Where dbt's manifest for ``registry``'s first partitions is parsed: one folder per set of
    ``BACKFILL_BEGIN__*`` values (under ``dbt_project/target/``). Runs of that registry point
    dagster-dbt here (``DBT_TARGET_PATH``), so each dbt build starts from its partial parse, and
    processes of two registries (the demo's tables, a user's) never undo each other's parse."""
    values = "\n".join(f"{k}={v}" for k, v in sorted(dbt_env(registry).items()))
    return TARGET_DIR / f"parsed-{hashlib.sha1(values.encode()).hexdigest()[:12]}"


def ensure_manifest(registry: Registry | None = None) -> dict:
    """The dbt manifest for ``registry``, parsed first if it is missing or older than a project
    file.

    Parsing needs no database; it costs a few seconds, so it only runs after an edit or for a
    registry not parsed before (its folder is ``parse_dir``). Processes loading the definitions at
    once (the daemon's code server and a ``dagster job backfill``) take turns on a file lock, so
    none reads a half-written manifest.
    """
    target = parse_dir(registry)
    manifest = target / "manifest.json"
    target.mkdir(parents=True, exist_ok=True)
    with (target / "parse.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _fresh(manifest):
            subprocess.run(
                [DBT_EXECUTABLE, "parse", "--quiet", "--target-path", str(target)],
                cwd=DBT_PROJECT_DIR,
                env={
                    **os.environ,
                    **dbt_env(registry),
                    "DBT_PROFILES_DIR": str(DBT_PROJECT_DIR),
                },
                check=True,
            )
        return json.loads(manifest.read_text())


def _fresh(manifest: Path) -> bool:
    if not manifest.exists():
        return False
    sources = [
        path
        for pattern in ("*.yml", "models/**/*", "macros/**/*", "tests/**/*")
        for path in DBT_PROJECT_DIR.glob(pattern)
        if path.is_file()
    ]
    return max(p.stat().st_mtime for p in sources) <= manifest.stat().st_mtime

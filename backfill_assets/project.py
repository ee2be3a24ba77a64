"""What both the CLI and the definitions need, without importing Dagster: the dbt project
prepared, and the names of each table's backfill jobs.

The dbt marts read the declared tables, and their microbatch ``begin`` is the first partition of
the table they read. dbt gets it as ``BACKFILL_BEGIN__<SCHEMA>__<TABLE>`` (macro
``partitions_begin``), set from the registry for every dbt call, so the date lives only in the
table's declaration.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

from backfill_assets.core.registry import Registry, load_registry
from backfill_assets.core.settings import DBT_PROJECT_DIR
from backfill_assets.core.tables import TableSpec

DBT_EXECUTABLE = str(Path(sys.executable).parent / "dbt")
MANIFEST_PATH = DBT_PROJECT_DIR / "target" / "manifest.json"


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


def ensure_manifest(registry: Registry | None = None) -> dict:
    """The dbt manifest, parsed first if it is missing or older than a project file.

    Parsing needs no database; it costs a few seconds, so it only runs after an edit or when a
    table's first partition changed (dbt's partial parsing notices a changed ``BACKFILL_BEGIN__*``
    value). Processes loading the definitions at once (the daemon's code server and a
    ``dagster job backfill``) take turns on a file lock, so none reads a half-written manifest.
    """
    env = dbt_env(registry)
    wanted = "\n".join(f"{k}={v}" for k, v in sorted(env.items()))
    stamp = MANIFEST_PATH.parent / "backfill_begin.env"
    MANIFEST_PATH.parent.mkdir(parents=True, exist_ok=True)
    with (MANIFEST_PATH.parent / "backfill_parse.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _fresh(stamp, wanted):
            subprocess.run(
                [DBT_EXECUTABLE, "parse", "--quiet"],
                cwd=DBT_PROJECT_DIR,
                env={**os.environ, **env, "DBT_PROFILES_DIR": str(DBT_PROJECT_DIR)},
                check=True,
            )
            stamp.write_text(wanted)
        return json.loads(MANIFEST_PATH.read_text())


def _fresh(stamp: Path, wanted: str) -> bool:
    if not MANIFEST_PATH.exists() or not stamp.exists() or stamp.read_text() != wanted:
        return False
    sources = [
        path
        for pattern in ("*.yml", "models/**/*", "macros/**/*", "tests/**/*")
        for path in DBT_PROJECT_DIR.glob(pattern)
        if path.is_file()
    ]
    return max(p.stat().st_mtime for p in sources) <= MANIFEST_PATH.stat().st_mtime

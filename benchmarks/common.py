"""What the benchmark scripts share."""

from __future__ import annotations

from psycopg import sql

from backfill_assets.core import settings
from backfill_assets.core.database import connect


def fresh_database(admin_url: str, name: str) -> str:
    """Drop and create database ``name`` on the server of ``admin_url``; returns its URL."""
    with connect(admin_url) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return settings.with_database(admin_url, name)

"""A least-privilege role: exactly the README's grants are enough, each missing one is named.

The role is an ordinary login role (no superuser, no CREATEDB); the data database is owned by
``postgres`` with the demo's sources in it, and Dagster's database is empty, as an administrator
would hand them over. PUBLIC's default CONNECT and TEMPORARY are revoked, so every privilege the
role uses is one granted below.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from support import database_checksum, materialize_days

from backfill_assets.core import settings
from backfill_assets.core.database import connect
from backfill_assets.core.registry import DEFAULT_TABLES_DIR, TABLES_PATH_ENV
from backfill_assets.defs.resources import PostgresResource
from backfill_assets.tooling import cli
from backfill_assets.tooling.launch import running_daemon

ROLE = "backfill_least"
# The README's grants ("Least privilege"), by what each lets the role do.
DATA_GRANTS = {
    "create": "GRANT CREATE ON DATABASE {db} TO backfill_least",
    "temporary": "GRANT TEMPORARY ON DATABASE {db} TO backfill_least",
    "usage": "GRANT USAGE ON SCHEMA app TO backfill_least",
    "select": "GRANT SELECT ON ALL TABLES IN SCHEMA app TO backfill_least",
}
DAGSTER_GRANTS = {"public": "GRANT USAGE, CREATE ON SCHEMA public TO backfill_least"}
# What the error asks for when one is missing.
EXPECTED = {
    "create": ('GRANT CREATE ON DATABASE "{db}" TO "backfill_least";', settings.DATA_URL_ENV),
    "temporary": ('GRANT TEMPORARY ON DATABASE "{db}" TO "backfill_least";', settings.DATA_URL_ENV),
    "usage": ('GRANT USAGE ON SCHEMA "app" TO "backfill_least";', settings.DATA_URL_ENV),
    "select": ('GRANT SELECT ON "app"."orders" TO "backfill_least";', settings.DATA_URL_ENV),
    "public": (
        'GRANT CREATE ON SCHEMA public TO "backfill_least";',
        settings.DAGSTER_URL_ENV,
    ),
}


def as_role(url: str) -> str:
    return url.replace("postgresql://postgres", f"postgresql://{ROLE}", 1)


@pytest.fixture
def least_privileged(cluster, data_url, dagster_env, monkeypatch):
    """Set up the role's databases with every grant but ``leave_out``; returns the setter."""

    def setup(leave_out: str | None = None, *, empty: bool = False) -> dict[str, str]:
        """``empty``: a new data database without the demo's sources (the demo seeds them)."""
        dagster_db = f"dagster_{uuid.uuid4().hex[:8]}_least"
        data_db = f"data_{uuid.uuid4().hex[:8]}_least" if empty else None
        with connect(cluster) as admin:
            admin.execute(
                f"DO $$BEGIN CREATE ROLE {ROLE} LOGIN; "
                "EXCEPTION WHEN duplicate_object THEN NULL; END$$"
            )
            for db in filter(None, (dagster_db, data_db)):
                admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
        data = settings.with_database(data_url, data_db) if empty else data_url
        data_db = conninfo_to_dict(data)["dbname"]
        dagster_url = settings.with_database(data_url, dagster_db)
        data_grants = {k: v for k, v in DATA_GRANTS.items() if not empty or "DATABASE" in v}
        for url, db, grants in (
            (data, data_db, data_grants),
            (dagster_url, dagster_db, DAGSTER_GRANTS),
        ):
            with connect(url) as conn:
                conn.execute(
                    sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(db))
                )
                conn.execute(
                    sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                        sql.Identifier(db), sql.Identifier(ROLE)
                    )
                )
                for name, grant in grants.items():
                    if name != leave_out:
                        conn.execute(grant.format(db=sql.Identifier(db).as_string(conn)))
        urls = {
            settings.DATA_URL_ENV: as_role(data),
            settings.DAGSTER_URL_ENV: settings.to_sqlalchemy(as_role(dagster_url)),
            "data_db": data_db,
        }
        monkeypatch.setenv(settings.DATA_URL_ENV, urls[settings.DATA_URL_ENV])
        monkeypatch.setenv(settings.DAGSTER_URL_ENV, urls[settings.DAGSTER_URL_ENV])
        return urls

    return setup


def test_a_role_with_exactly_the_documented_grants_runs_the_demo_backfill(
    least_privileged, dagster_env, tmp_path, capsys, conn
):
    urls = least_privileged()
    env = {**dagster_env, **{k: v for k, v in urls.items() if k != "data_db"}}
    with running_daemon(env, tmp_path / "daemon.log"):
        span = ["--from", "2024-04-01", "--to", "2024-04-02"]
        code = cli.main(
            ["launch", "--select", "analytics/fct_orders", "--downstream", *span, "--wait"]
        )
        out, err = capsys.readouterr()

    assert code == 0, out + err + (tmp_path / "daemon.log").read_text()[-3000:]
    assert "6/6 partitions materialized" in out
    owners = conn.execute(
        "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname IN "
        "('analytics', 'backfill_audit', 'backfill_snapshots')"
    ).fetchall()
    assert owners == [(ROLE,)], "everything the backfill built belongs to the role"
    assert cli.main(["audit", "--limit", "1"]) == 0
    assert "succeeded" in capsys.readouterr().out


def test_the_demo_runs_as_a_role_with_only_the_database_grants(
    least_privileged, tmp_path, capsys, monkeypatch
):
    urls = least_privileged(empty=True)
    monkeypatch.setattr(settings, "LOG_DIR", tmp_path / "logs")

    days = ["--from", "2024-04-01", "--to", "2024-04-02", "--orders-per-day", "20"]
    code = cli.main(["demo", *days])

    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "partitions materialized: 2 of 2" in out
    with connect(urls[settings.DATA_URL_ENV]) as conn:
        owner = conn.execute(
            "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'app'"
        )
        assert owner.fetchone()[0] == ROLE, "the demo created its sources as the role"


@pytest.mark.parametrize("leave_out", list(EXPECTED))
def test_each_missing_grant_is_named_with_its_grant_statement_and_changes_nothing(
    least_privileged, capsys, conn, leave_out
):
    urls = least_privileged(leave_out)
    before = database_checksum(conn)

    assert cli.main(["audit"]) == 2

    error = capsys.readouterr().err
    grant, variable = EXPECTED[leave_out]
    assert grant.format(db=urls["data_db"]) in error, error
    assert f"({variable})" in error and "Traceback" not in error
    assert database_checksum(conn) == before


def test_a_run_without_temporary_fails_before_writing_and_names_the_grant(
    least_privileged, instance, conn
):
    urls = least_privileged("temporary")
    before = database_checksum(conn)

    result = materialize_days(
        PostgresResource(url=urls[settings.DATA_URL_ENV]), instance, "2024-04-01"
    )

    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = failure.event_specific_data.error.message
    assert f'GRANT TEMPORARY ON DATABASE "{urls["data_db"]}" TO "backfill_least";' in message
    assert "Nothing was written" in message
    assert database_checksum(conn) == before
    assert json.dumps(urls)  # the URLs hold no password to leak


def test_a_table_updated_in_place_needs_update_on_it_and_the_error_gives_the_grant(
    least_privileged, conn, monkeypatch, capsys
):
    in_place = Path(__file__).parent / "in_place_tables"
    monkeypatch.setenv(TABLES_PATH_ENV, f"{DEFAULT_TABLES_DIR}:{in_place}")
    conn.execute("ALTER TABLE app.orders ADD COLUMN total_price numeric(12, 2)")
    least_privileged()

    assert cli.main(["pause", "--all"]) == 2
    err = capsys.readouterr().err
    assert 'GRANT UPDATE ON "app"."orders" TO "backfill_least";' in err
    assert "GRANT SELECT" not in err, "SELECT is granted already"

    conn.execute(f"GRANT UPDATE ON app.orders TO {ROLE}")
    assert cli.main(["pause", "--all"]) == 0

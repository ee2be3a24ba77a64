"""Nothing leaks: no password in any message, output, log, file or table, whatever characters it
holds, and nothing uploaded as telemetry."""

from __future__ import annotations

import contextlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import ClassVar
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from backfill_assets.core import settings
from backfill_assets.tooling import cli
from backfill_assets.tooling.launch import running_daemon

# Every character that has a meaning in a URL, around a marker that occurs nowhere else.
MARKER = "Qx7s3cr"
PASSWORD = f"{MARKER}%@:/#?&z"
RAW_PASSWORDS = [f"{MARKER}{c}z" for c in "%@:/#?&"] + [f"{MARKER}%zz", f"{MARKER}%4"]


def with_password(url: str, password: str, *, encode: bool = True) -> str:
    params = conninfo_to_dict(settings.to_libpq(url))
    secret = quote(password, safe="") if encode else password
    host = params["host"]
    return f"postgresql://{params['user']}:{secret}@/{params['dbname']}?host={host}"


@pytest.mark.parametrize("password", RAW_PASSWORDS)
def test_a_password_written_raw_into_the_url_never_appears_in_the_error_or_redacted_url(
    monkeypatch, capsys, password
):
    url = f"postgresql://alice:{password}@db.internal:5433/shop"
    monkeypatch.setenv(settings.DATA_URL_ENV, url)
    try:
        shown = settings.redact(settings.data_url())
    except settings.SettingsError as exc:
        shown = str(exc)
        assert settings.DATA_URL_ENV in shown and "percent-encode" in shown
    assert MARKER not in shown
    assert cli.main(["db", "url"]) in (0, 2)
    out, err = capsys.readouterr()
    assert MARKER not in out + err


def test_db_url_and_env_mask_the_password_unless_asked(monkeypatch, capsys, dagster_env):
    data = with_password(dagster_env[settings.DATA_URL_ENV], PASSWORD)
    storage = settings.to_sqlalchemy(
        with_password(settings.to_libpq(dagster_env[settings.DAGSTER_URL_ENV]), PASSWORD)
    )
    monkeypatch.setenv(settings.DATA_URL_ENV, data)
    monkeypatch.setenv(settings.DAGSTER_URL_ENV, storage)

    assert cli.main(["db", "url"]) == 0
    assert cli.main(["env"]) == 0
    masked = capsys.readouterr().out
    assert MARKER not in masked and masked.count(":***@") == 3, masked
    assert cli.main(["db", "url", "--show-password"]) == 0
    assert cli.main(["env", "--show-password"]) == 0
    shown = capsys.readouterr().out
    assert shown.count(quote(PASSWORD, safe="")) == 3
    parsed = conninfo_to_dict(shown.splitlines()[0])
    assert parsed["password"] == PASSWORD, "the printed URL gives back the exact password"


def scan_database(url: str, needle: str) -> list[str]:
    """Every table of the database whose rows' text holds ``needle``."""
    found = []
    with psycopg.connect(settings.to_libpq(url), autocommit=True) as conn:
        tables = conn.execute(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')"
        ).fetchall()
        for (table,) in tables:
            hits = conn.execute(
                f"SELECT count(*) FROM {table} AS t WHERE strpos(t::text, %s) > 0", [needle]
            ).fetchone()[0]
            if hits:
                found.append(f"{table}: {hits} rows")
    return found


def scan_files(folder: Path, needle: str) -> list[str]:
    return [
        str(path)
        for path in folder.rglob("*")
        if path.is_file() and needle.encode() in path.read_bytes()
    ]


def test_no_password_is_left_anywhere_after_a_demo_and_a_bad_url(
    monkeypatch, capsys, dagster_env, tmp_path
):
    data = with_password(dagster_env[settings.DATA_URL_ENV], PASSWORD)
    storage = settings.to_sqlalchemy(
        with_password(settings.to_libpq(dagster_env[settings.DAGSTER_URL_ENV]), PASSWORD)
    )
    monkeypatch.setenv(settings.DATA_URL_ENV, data)
    monkeypatch.setenv(settings.DAGSTER_URL_ENV, storage)
    monkeypatch.setattr(settings, "LOG_DIR", tmp_path / "logs")

    days = ["--from", "2024-04-01", "--to", "2024-04-02"]
    code = cli.main(["demo", *days, "--orders-per-day", "20"])
    demo_out, demo_err = capsys.readouterr()
    assert code == 0, demo_out + demo_err
    assert cli.main(["audit"]) == 0
    assert cli.main(["tables"]) == 0
    monkeypatch.setenv(settings.DATA_URL_ENV, with_password(data, PASSWORD, encode=False))
    assert cli.main(["audit"]) == 2
    out, err = capsys.readouterr()

    leaks = [f"output: {line}" for line in (demo_out + demo_err + out + err).splitlines()]
    leaks = [line for line in leaks if MARKER in line]
    leaks += scan_files(tmp_path, MARKER)
    leaks += scan_database(data, MARKER) + scan_database(storage, MARKER)
    assert "Backfill" in demo_out and "error:" in err
    assert leaks == []


class _Recorder(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        _Recorder.received.append(self.path)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


def test_the_daemon_the_project_starts_uploads_nothing_from_dagster_home_logs(
    dagster_env, monkeypatch, tmp_path
):
    """Dagster's daemon uploads $DAGSTER_HOME/logs at start-up unless the environment says not to;
    the project's environment (not the test's) must say it."""
    monkeypatch.delenv("DAGSTER_DISABLE_TELEMETRY", raising=False)
    server = http.server.HTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("DAGSTER_TELEMETRY_URL", f"http://127.0.0.1:{server.server_port}/actions")
    probe = Path(dagster_env["DAGSTER_HOME"]) / "logs" / "probe.log"
    probe.parent.mkdir()
    probe.write_text("a line Dagster would upload\n")
    log = tmp_path / "daemon.log"
    try:
        with running_daemon(dagster_env, log):
            deadline = time.monotonic() + 120
            while "Instance is configured with the following daemons" not in log.read_text():
                assert time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.5)
            time.sleep(5)  # the upload thread starts with the daemon and uploads at once
    finally:
        server.shutdown()

    assert _Recorder.received == []
    assert probe.exists(), "Dagster moves the folder away when it uploads it"


def command_lines() -> list[str]:
    """Every process's arguments, as ``ps -eo args`` shows them to any user of the machine."""
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):  # the process ended meanwhile
            lines.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    return lines


def test_psql_gets_the_password_through_its_environment_never_its_arguments(dagster_env):
    url = with_password(dagster_env[settings.DATA_URL_ENV], PASSWORD)
    env = {**os.environ, **dagster_env, settings.DATA_URL_ENV: url}
    command = [str(Path(sys.executable).parent / "backfill-assets"), "db", "psql"]
    psql = subprocess.Popen(
        [*command, "-c", "SELECT pg_sleep(4)"], env=env, stdout=subprocess.DEVNULL
    )
    seen: list[str] = []
    deadline = time.monotonic() + 60
    while psql.poll() is None and time.monotonic() < deadline:
        seen += [line for line in command_lines() if "pg_sleep" in line or MARKER in line]
        time.sleep(0.1)

    assert psql.wait(60) == 0
    assert any("psql" in line and "pg_sleep" in line for line in seen), "psql was sampled"
    assert [line for line in seen if MARKER in line] == []


def test_db_start_for_a_role_that_may_not_create_the_missing_database_says_so_in_one_line(
    cluster, dagster_env, monkeypatch, capsys
):
    role = f"no_createdb_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(cluster, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN NOCREATEDB").format(sql.Identifier(role)))
    try:
        params = conninfo_to_dict(cluster)
        missing = f"postgresql://{role}@/missing_{role}?host={params['host']}"
        monkeypatch.setenv(settings.DATA_URL_ENV, missing)
        monkeypatch.setenv(settings.DAGSTER_URL_ENV, missing)

        code = cli.main(["db", "start"])
    finally:
        with psycopg.connect(cluster, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))

    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"database 'missing_{role}' does not exist" in err and "CREATEDB" in err
    assert settings.DATA_URL_ENV in err


def test_tables_exits_non_zero_with_one_line_when_the_database_cannot_be_reached(
    monkeypatch, capsys
):
    with socket.socket() as probe:  # a port of 127.0.0.1 where nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql://alice:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/shop"
    monkeypatch.setenv(settings.DATA_URL_ENV, url)

    code = cli.main(["tables"])

    out, err = capsys.readouterr()
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: contracts not checked: cannot connect")
    assert f"127.0.0.1:{port}" in err and "Connection refused" in err
    assert MARKER not in out + err

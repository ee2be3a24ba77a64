"""The command line and settings: bad input gets a clear error and changes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from dagster import AssetRecordsFilter
from support import FCT_ORDERS_KEY, database_checksum, materialize_days, record_past_writes

from backfill_assets.core import settings
from backfill_assets.core.database import connect
from backfill_assets.tooling import cli


def test_the_demo_refuses_a_day_outside_the_partitions_before_starting_anything(capsys):
    assert cli.main(["demo", "--from", "2023-12-01", "--to", "2024-01-03"]) == 2
    error = capsys.readouterr().err
    assert "'2023-12-01'" in error and "2024-01-01 to 2024-12-31" in error


def test_a_reversed_range_is_refused_with_the_fix_in_the_message(capsys):
    assert cli.main(["demo", "--from", "2024-02-01", "--to", "2024-01-03"]) == 2
    assert "swap them" in capsys.readouterr().err


def test_a_malformed_database_url_names_the_variable(monkeypatch):
    monkeypatch.setenv(settings.DATA_URL_ENV, "postgresql://host:notaport/db")
    with pytest.raises(settings.SettingsError, match=settings.DATA_URL_ENV):
        settings.data_url()


def test_passwords_never_appear_in_redacted_urls():
    redacted = settings.redact("postgresql://alice:s3cret@db.internal:5433/shop")
    assert "s3cret" not in redacted
    assert "alice" in redacted and "db.internal" in redacted


def test_dagster_storage_defaults_to_a_dagster_database_on_the_same_server(monkeypatch):
    monkeypatch.setenv(settings.DATA_URL_ENV, "postgresql://bob:pw@127.0.0.1:6543/shop")
    monkeypatch.delenv(settings.DAGSTER_URL_ENV, raising=False)
    assert settings.dagster_storage_url() == "postgresql+psycopg2://bob:pw@127.0.0.1:6543/dagster"


def test_dbt_gets_the_socket_directory_as_its_host():
    parts = settings.connection_parts("postgresql://postgres:@/backfill?host=/tmp/sock")
    assert (parts.host, parts.port, parts.user, parts.password, parts.dbname) == (
        "/tmp/sock",
        "5432",
        "postgres",
        "",
        "backfill",
    )


def test_the_rollback_and_audit_commands_undo_a_backfill_and_show_it(
    postgres, instance, conn, data_url, dagster_storage_url, monkeypatch, capsys
):
    from support import fingerprints, materialize_days

    monkeypatch.setenv(settings.DATA_URL_ENV, data_url)
    monkeypatch.setenv(settings.DAGSTER_URL_ENV, dagster_storage_url)
    assert materialize_days(postgres, instance, "2024-04-01").success
    before = fingerprints(conn, ["2024-04-01"])
    conn.execute("UPDATE app.orders SET net_amount = net_amount + 1")
    tags = {"dagster/backfill": "clitest1"}
    assert materialize_days(postgres, instance, "2024-04-01", tags=tags).success

    assert cli.main(["rollback", "--backfill", "clitest1"]) == 0
    assert "restored analytics.fct_orders 2024-04-01" in capsys.readouterr().out
    assert fingerprints(conn, ["2024-04-01"]) == before
    latest = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=FCT_ORDERS_KEY, asset_partitions=["2024-04-01"]), limit=1
    ).records[0]
    metadata = latest.asset_materialization.metadata
    assert "rolled_back_write" in metadata, "the UI shows the rollback as what the day holds"
    assert metadata["checksum_after"].value == before["2024-04-01"].checksum

    assert cli.main(["audit", "--limit", "5"]) == 0
    report = capsys.readouterr().out
    assert "rollback" in report and "delete_insert" in report and "clitest1" in report


def test_rolling_back_with_both_a_backfill_and_a_partition_is_refused(capsys):
    assert cli.main(["rollback", "--backfill", "x", "--partition", "2024-04-01"]) == 2
    assert "either --backfill ID or --partition" in capsys.readouterr().err


def test_db_start_with_your_own_server_starts_nothing_and_hides_the_password(
    cluster, monkeypatch, tmp_path, capsys
):
    """``BACKFILL_PG_URL`` set: no embedded cluster, both databases created, no password shown."""
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict

    from backfill_assets.core.database import connect

    socket_dir = conninfo_to_dict(cluster)["host"]
    suffix = tmp_path.name[-8:].lower().replace("-", "_")
    data = f"postgresql://postgres:s3cret@/own_data_{suffix}?host={socket_dir}"
    storage = f"postgresql+psycopg2://postgres:s3cret@/own_dagster_{suffix}?host={socket_dir}"
    monkeypatch.setenv(settings.DATA_URL_ENV, data)
    monkeypatch.setenv(settings.DAGSTER_URL_ENV, storage)
    monkeypatch.setenv(settings.PGDATA_ENV, str(tmp_path / "pgdata"))

    assert cli.main(["db", "start"]) == 0

    out = capsys.readouterr().out
    assert "s3cret" not in out and "not starting an embedded one" in out
    assert not (tmp_path / "pgdata").exists()
    with connect(cluster) as admin:
        names = {
            name
            for (name,) in admin.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE %s", [f"own_%_{suffix}"]
            )
        }
        for name in names:
            admin.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
    assert names == {f"own_data_{suffix}", f"own_dagster_{suffix}"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["snapshots", "expire", "--days", "-5"], "-5 is outside 1..36500"),
        (["snapshots", "expire", "--days", "0"], "0 is outside 1..36500"),
        (["snapshots", "expire", "--days", "99999999999"], "99999999999 is outside 1..36500"),
        (["snapshots", "expire", "--days", "ten"], "'ten' is not a whole number"),
        (["audit", "--limit", "-1"], "-1 is outside 1..100000"),
    ],
)
def test_harmful_or_malformed_numbers_are_refused_in_one_line_and_change_nothing(
    postgres, instance, conn, data_url, monkeypatch, capsys, args, message
):
    for _ in range(2):  # the second write keeps the first's rows as a snapshot
        assert materialize_days(postgres, instance, "2024-04-02").success
    assert conn.execute("SELECT count(*) FROM backfill_snapshots.analytics__fct_orders").fetchone()[
        0
    ]
    monkeypatch.setenv(settings.DATA_URL_ENV, data_url)
    before = database_checksum(conn)

    with pytest.raises(SystemExit) as exited:
        cli.main(args)

    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert message in error[-1] and "Traceback" not in "\n".join(error)
    assert database_checksum(conn) == before


def test_a_database_name_typo_on_your_own_server_is_an_error_and_creates_nothing(
    cluster, monkeypatch, capsys
):
    typo = settings.with_database(cluster, "backfil_typo")
    monkeypatch.setenv(settings.DATA_URL_ENV, typo)

    assert cli.main(["audit"]) == 2

    error = capsys.readouterr().err
    assert "database 'backfil_typo' does not exist" in error and settings.DATA_URL_ENV in error
    with connect(cluster) as conn:
        assert not conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = 'backfil_typo'"
        ).fetchone()


def test_a_reader_that_stops_early_ends_the_output_without_a_traceback(dagster_env):
    command = f"{Path(sys.executable).parent / 'backfill-assets'} tables | true"
    done = subprocess.run(command, shell=True, capture_output=True, text=True, check=False)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


def test_the_audit_prints_missing_counts_as_blanks_not_nan(dagster_env, conn, capsys):
    record_past_writes(conn, "analytics.fct_orders", seconds=2, count=1)
    conn.execute("UPDATE backfill_audit.backfill_runs SET rows_inserted = 1309")

    assert cli.main(["audit"]) == 0

    out = capsys.readouterr().out
    assert " 1309 " in out and "1309.0" not in out
    assert "NaN" not in out and "<NA>" not in out and "None" not in out


def test_a_wrong_port_keeps_libpqs_reason_and_names_the_variable(dagster_env, monkeypatch, capsys):
    monkeypatch.setenv(settings.DATA_URL_ENV, "postgresql://postgres@127.0.0.1:1/backfill")

    assert cli.main(["audit"]) == 2

    error = capsys.readouterr().err
    assert "Connection refused" in error and f"({settings.DATA_URL_ENV})" in error, error


def test_a_refused_login_to_dagsters_storage_names_its_variable(dagster_env, monkeypatch, capsys):
    storage = dagster_env[settings.DAGSTER_URL_ENV].replace("://postgres@", "://nobody_here@")
    monkeypatch.setenv(settings.DAGSTER_URL_ENV, storage)

    assert cli.main(["audit"]) == 2

    error = capsys.readouterr().err
    assert 'role "nobody_here" does not exist' in error, error
    assert f"({settings.DAGSTER_URL_ENV})" in error and "Check the user, password" in error


def test_db_psql_runs_psql_on_the_data_database(dagster_env, conn, capfd):
    assert cli.main(["db", "psql", "-At", "-c", "SELECT count(*) > 0 FROM app.orders"]) == 0
    assert capfd.readouterr().out.strip() == "t"
    assert cli.main(["db", "psql", "-c", "SELECT * FROM app.nope"]) != 0


def test_select_given_twice_keeps_both_assets():
    args = cli.build_parser().parse_args(
        ["launch", "--select", "a/x", "--select", "a/y", "a/z", "--from", "d1", "--to", "d2"]
    )
    assert args.select == ["a/x", "a/y", "a/z"]

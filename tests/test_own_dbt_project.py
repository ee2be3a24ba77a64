"""A user's own dbt project (``BACKFILL_DBT_PROJECT``) on a user's own table, the demo's left out.

The project (``tests/own_dbt_project``) is a folder apart from the repository's dbt_project/: one
microbatch model reading the declared table ``tests/own_tables/shipped_lines.yaml`` (monthly), a
generic test of backfill_assets' dbt package and a singular test, both returning
``partition_key``. It gets the package's macros through its ``packages.yml``, nothing copied.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import AssetKey, materialize
from support import latest_check

from backfill_assets.core.registry import TABLES_PATH_ENV, load_registry
from backfill_assets.core.settings import (
    DBT_PACKAGE_DIR,
    DBT_PROJECT_ENV,
    DEFAULT_DBT_PROJECT_DIR,
    connection_parts,
)
from backfill_assets.defs.dagster_internals import AssetCheckExecutionRecordStatus
from backfill_assets.defs.dbt import dbt_model_assets, installed_dbt
from backfill_assets.defs.table_assets import table_asset
from backfill_assets.project import ensure_manifest
from backfill_assets.tooling import cli

TESTS = Path(__file__).parent
OWN_TABLES = TESTS / "own_tables"
OWN_DBT_PROJECT = TESTS / "own_dbt_project"
MODEL = AssetKey(["reporting", "shipped_by_mode"])
MONTHS = ["1995-03-01", "1995-04-01", "1995-05-01"]
CHECKS = ("one_row_per_mode_and_month", "shipped_by_mode_reconciles")
RECOMPUTE = """
SELECT date_trunc('month', ship_date)::date::text, upper(ship_mode), count(*), sum(quantity),
       sum(round(extended_price * (1 - discount), 2))
FROM legacy.order_lines WHERE ship_date >= '1995-03-01' AND ship_date < '1995-06-01'
GROUP BY 1, 2 ORDER BY 1, 2
"""


@pytest.fixture
def own_project(monkeypatch, conn):
    """Only the user's table and the user's dbt project; the table's source filled."""
    conn.execute((OWN_TABLES / "order_lines_source.sql").read_text())
    monkeypatch.setenv(TABLES_PATH_ENV, str(OWN_TABLES))
    monkeypatch.setenv(DBT_PROJECT_ENV, str(OWN_DBT_PROJECT))
    return load_registry()


def model_rows(conn) -> list[tuple]:
    return conn.execute(
        "SELECT ship_month::text, ship_mode, lines, quantity, net_price"
        " FROM reporting.shipped_by_mode ORDER BY 1, 2"
    ).fetchall()


def build(assets, postgres, instance):
    return materialize(
        assets,
        resources={"postgres": postgres, "dbt": installed_dbt()},
        instance=instance,
        tags={
            "dagster/asset_partition_range_start": MONTHS[0],
            "dagster/asset_partition_range_end": MONTHS[-1],
        },
        raise_on_error=False,
    )


def test_an_own_dbt_projects_model_is_built_per_month_from_the_declared_table_and_checked(
    own_project, postgres, instance, conn
):
    shipped_lines = table_asset(own_project.table("reporting.shipped_lines"))
    (models,) = dbt_model_assets(own_project)

    first = build([shipped_lines, models], postgres, instance)

    assert first.success
    materialized = first.asset_materializations_for_node(models.node_def.name)
    built = sorted((m.asset_key, m.partition) for m in materialized)
    assert built == [(MODEL, month) for month in MONTHS]
    rows = model_rows(conn)
    assert rows == [tuple(row) for row in conn.execute(RECOMPUTE).fetchall()]
    assert {row[0] for row in rows} == set(MONTHS)
    for month in MONTHS:
        for check in CHECKS:
            record = latest_check(instance, check, month, asset_key=MODEL)
            assert record.status == AssetCheckExecutionRecordStatus.SUCCEEDED, (check, month)
            assert record.partition == month and record.run_id == first.run_id

    # The same months again (dbt alone): each month replaced, none doubled.
    assert build([models], postgres, instance).success
    assert model_rows(conn) == rows


def test_a_model_reading_a_table_no_declaration_builds_is_named_in_a_warning(
    monkeypatch, tmp_path, caplog
):
    monkeypatch.setenv(DBT_PROJECT_ENV, str(OWN_DBT_PROJECT))
    empty = tmp_path / "tables"
    empty.mkdir()

    assert dbt_model_assets(load_registry([empty])) == []

    assert (
        "dbt model shipped_by_mode is not loaded: it reads reporting.shipped_lines, which no "
        f"declaration in {TABLES_PATH_ENV} builds"
    ) in [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


@pytest.mark.parametrize("dbt_project", [None, OWN_DBT_PROJECT], ids=["demo", "own"])
def test_with_the_demos_tables_left_out_a_command_says_nothing_about_the_demos_models(
    own_project, dagster_env, dbt_project
):
    """``plan`` loads every definition, dbt models included, as the daemon and the UI do."""
    env = {**os.environ, **dagster_env, TABLES_PATH_ENV: str(OWN_TABLES)}
    env.pop(DBT_PROJECT_ENV)
    if dbt_project:
        env[DBT_PROJECT_ENV] = str(dbt_project)
    args = ["plan", "--select", "reporting/shipped_lines", "--downstream"]
    args += ["--from", MONTHS[0], "--to", MONTHS[-1]]
    completed = subprocess.run(
        [str(Path(sys.executable).parent / "backfill-assets"), *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr[-3000:]
    said = completed.stdout + completed.stderr
    assert "daily_revenue" not in said and "customer_daily_orders" not in said
    assert "not loaded" not in said
    assert ("shipped_by_mode" in completed.stdout) == (dbt_project is not None)


IGNORED = shutil.ignore_patterns("target", "logs", "dbt_packages", "package-lock.yml")


def _project_without(tmp_path: Path, edit) -> Path:
    folder = tmp_path / "dbt"
    shutil.copytree(OWN_DBT_PROJECT, folder, ignore=IGNORED)
    edit(folder)
    return folder


def _other_profile(folder: Path) -> None:
    config = folder / "dbt_project.yml"
    config.write_text(config.read_text().replace("profile: backfill_assets", "profile: mine"))


def _no_dispatch(folder: Path) -> None:
    config = folder / "dbt_project.yml"
    config.write_text(config.read_text().split("dispatch:")[0])


def _dbt_first(folder: Path) -> None:
    config = folder / "dbt_project.yml"
    config.write_text(
        config.read_text().replace(
            "[own_reporting, backfill_assets, dbt]", "[own_reporting, dbt, backfill_assets]"
        )
    )


@pytest.mark.parametrize(
    ("value", "said"),
    [
        (lambda tmp: tmp / "nowhere", "does not exist; set it to the folder of your dbt project"),
        (lambda tmp: tmp, "holds no dbt_project.yml"),
        (
            lambda tmp: _project_without(tmp, _other_profile),
            "profile is 'mine'; write `profile: backfill_assets`",
        ),
        (
            lambda tmp: _project_without(tmp, _no_dispatch),
            "dbt's macros are not dispatched to backfill_assets' package",
        ),
        (
            lambda tmp: _project_without(tmp, _dbt_first),
            "dbt's macros are not dispatched to backfill_assets' package",
        ),
        (
            lambda tmp: _project_without(tmp, lambda f: (f / "packages.yml").unlink()),
            "does not install backfill_assets' dbt package",
        ),
    ],
    ids=[
        "missing",
        "not-a-dbt-project",
        "other-profile",
        "no-dispatch",
        "dbt-before-the-package",
        "no-package",
    ],
)
def test_an_unusable_dbt_project_is_refused_naming_it_and_the_fix(
    dagster_env, monkeypatch, tmp_path, capsys, value, said
):
    folder = value(tmp_path)
    monkeypatch.setenv(DBT_PROJECT_ENV, str(folder))

    assert cli.main(["env"]) == 2

    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(folder) in err and said in err
    assert "Traceback" not in err


def test_dbt_by_hand_through_exec_reaches_the_projects_database(dagster_env, data_url):
    """``backfill-assets exec -- dbt ...`` in the dbt project's folder: dbt finds the package's
    profile, the package and the connection the project gives its own dbt calls."""
    debug = subprocess.run(
        ["backfill-assets", "exec", "--", "dbt", "debug"],
        cwd=DEFAULT_DBT_PROJECT_DIR,
        env={**os.environ, **dagster_env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    said = debug.stdout + debug.stderr
    assert debug.returncode == 0, said
    assert "All checks passed!" in said
    assert connection_parts(data_url).dbname in said


def test_a_copy_of_another_version_of_the_package_is_installed_again(tmp_path, monkeypatch):
    """dbt copies a local package where it cannot link: a copy whose macros are not this
    package's (left by an older backfill_assets) is replaced before the project is parsed."""
    folder = _project_without(tmp_path, lambda f: None)
    stale = folder / "dbt_packages" / "backfill_assets"
    shutil.copytree(DBT_PACKAGE_DIR, stale)
    macro = stale / "macros" / "microbatch_window_replace.sql"
    macro.write_text("{# an older version #}\n" + macro.read_text())
    monkeypatch.setenv(DBT_PROJECT_ENV, str(folder))

    ensure_manifest(load_registry([TESTS / "own_tables"]))

    installed = folder / "dbt_packages" / "backfill_assets" / "macros"
    replaced = installed / "microbatch_window_replace.sql"
    assert replaced.read_text() == (DBT_PACKAGE_DIR / "macros" / replaced.name).read_text()

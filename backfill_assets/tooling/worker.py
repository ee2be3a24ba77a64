"""``backfill-assets worker``: a Celery worker that executes the steps of runs on this host, for a
code location with ``BACKFILL_EXECUTOR=celery`` (``defs/executors.py``).

The worker is Celery's own (``celery -A backfill_assets.defs.celery_worker worker``, prefork pool)
with the project's environment: the databases' URLs, ``DAGSTER_HOME``, and a folder for dbt's
files (``--scratch``; by default one per working folder), so workers never write into the
launching host's files. Before it starts it checks what it can: the settings, the broker, the
databases, the dbt manifest (parsed into its folder); and it says at start what does not reach
across hosts.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from backfill_assets.core import settings
from backfill_assets.core.settings import Executor
from backfill_assets.tooling.environment import prepare

CELERY_EXECUTABLE = str(Path(sys.executable).parent / "celery")
APP_MODULE = "backfill_assets.defs.celery_worker"
NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")


def check_broker(choice: Executor, timeout_s: float = 5.0) -> None:
    """Connect to the broker once; a ``SettingsError`` naming it (without its password) and what
    to do when it cannot be reached."""
    from kombu import Connection

    try:
        with Connection(choice.broker, connect_timeout=timeout_s) as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout_s)
    except Exception as exc:
        raise settings.SettingsError(
            f"the Celery broker {settings.redact_broker(choice.broker)} "
            f"({settings.CELERY_BROKER_ENV}) is not reachable ({type(exc).__name__}: {exc}); "
            "start it (RabbitMQ: `rabbitmq-server -detached`) or point the variable at yours"
        ) from None


def listening_workers(choice: Executor) -> int:
    """How many Celery workers consume the queue now (0 when no worker has created it yet)."""
    from kombu import Connection

    with Connection(choice.broker, connect_timeout=5) as connection:
        try:
            _, _, consumers = connection.default_channel.queue_declare(
                queue=choice.queue, passive=True
            )
        except connection.channel_errors:
            return 0  # the queue does not exist: no worker ever listened on it
    return consumers


def delete_queue(choice: Executor) -> None:
    """Delete the queue (a test's or a benchmark's own, once its workers stopped)."""
    from kombu import Connection, Queue

    with Connection(choice.broker, connect_timeout=5) as connection:
        Queue(choice.queue).bind(connection.default_channel).delete()


def announce(choice: Executor) -> None:
    """For the daemon and ``launch``: on stderr, where the steps go, and a warning when no worker
    listens (the runs would wait, STARTED, until one does)."""
    if not choice.distributed:
        return
    check_broker(choice)
    print(choice.describe(), file=sys.stderr)
    if not listening_workers(choice):
        print(
            f"warning: no Celery worker listens on queue {choice.queue!r} now; runs wait for one "
            "(start it with `backfill-assets worker`, on any host with this environment)",
            file=sys.stderr,
        )


def cross_host_notes(env: dict[str, str], embedded: bool) -> list[str]:
    """What this worker's environment ties to this host, in the words it prints at start
    (``embedded``: the databases are the embedded cluster's)."""
    notes = []
    if embedded:
        notes.append(
            "the data or Dagster's storage is on the embedded PostgreSQL (a unix socket of this "
            f"host, {settings.embedded_pgdata()}): workers on other hosts cannot reach it; set "
            f"{settings.DATA_URL_ENV} and {settings.DAGSTER_URL_ENV} to a server every host reaches"
        )
    from dagster import DagsterInstance

    try:
        with DagsterInstance.get() as instance:
            manager = type(instance.compute_log_manager).__name__
    except Exception:  # no dagster.yaml here: each step loads its run's instance, sent with it
        return notes
    if manager == "LocalComputeLogManager":
        notes.append(
            "a step's captured stdout/stderr are files on the host that ran it "
            f"(compute_logs: {manager} in {env['DAGSTER_HOME']}/dagster.yaml); its events and "
            "logs are in Dagster's storage either way. For the UI to show them from every host, "
            "use a shared compute log manager (S3, GCS, Azure) or NoOpComputeLogManager"
        )
    return notes


def worker_command(choice: Executor, name: str, concurrency: int, loglevel: str):
    """Celery's worker, prefork: the main process keeps the broker's heartbeats while a child
    executes a step, and children die with it (their parent-death signal)."""
    return [
        CELERY_EXECUTABLE,
        "-A",
        APP_MODULE,
        "worker",
        "--hostname",
        f"{name}@%h",
        "--queues",
        choice.queue,
        "--concurrency",
        str(concurrency),
        "--pool",
        "prefork",
        "--loglevel",
        loglevel,
        # No chatter between workers: each takes steps from the queue on its own.
        "--without-gossip",
        "--without-mingle",
    ]


def start_worker(name: str, concurrency: int, scratch: Path | None, loglevel: str) -> int:
    """Check, say what holds across hosts, then become the Celery worker (``exec``: signals sent
    to this process reach the worker itself)."""
    if not NAME.fullmatch(name):
        raise ValueError(f"worker name {name!r}: use letters, digits, _ . - (at most 100)")
    choice = settings.require_celery()
    check_broker(choice)
    folder = (scratch or Path.cwd() / ".backfill-worker").expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[settings.DBT_TARGET_ENV] = str(folder / "dbt")
    embedded = settings.uses_embedded_postgres()
    env = {**prepare(create_databases=False), settings.DBT_TARGET_ENV: str(folder / "dbt")}
    print(f"worker {name}: {choice.describe()}, {concurrency} at a time; dbt's files in {folder}")
    for note in cross_host_notes(env, embedded):
        print(f"note: {note}")
    sys.stdout.flush()
    command = worker_command(choice, name, concurrency, loglevel)
    os.execve(command[0], command, {**os.environ, **env})
    return 0  # not reached


@dataclass
class RunningWorker:
    """A worker started by ``running_workers``: its name, process (the Celery main process; its
    group is its own), folder and log."""

    name: str
    process: subprocess.Popen
    folder: Path
    log: Path

    def ready(self) -> bool:
        """Celery has said "NAME@host ready." (connected, consuming its queue)."""
        pattern = rf"\s{re.escape(self.name)}@\S+ ready\."
        return self.log.exists() and re.search(pattern, self.log.read_text()) is not None


@contextmanager
def running_workers(
    env: Mapping[str, str], folder: Path, names: Sequence[str], *, timeout_s: float = 180
) -> Iterator[list[RunningWorker]]:
    """``backfill-assets worker`` for each name, each in its own working directory and scratch
    folder under ``folder`` (no file shared between them), until every one says it is ready;
    stopped (warm shutdown, then killed) after the block. For the tests and the benchmark."""
    from backfill_assets.tooling.launch import _stop_process_group

    workers = []
    try:
        for name in names:
            home = folder / name
            home.mkdir(parents=True, exist_ok=True)
            log = home / "worker.log"
            with log.open("ab") as out:
                process = subprocess.Popen(
                    ["backfill-assets", "worker", "--name", name, "--scratch", "scratch"],
                    cwd=home,
                    env={**os.environ, **env},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            workers.append(RunningWorker(name, process, home, log))
        deadline = time.monotonic() + timeout_s
        for worker in workers:
            while not worker.ready():
                if worker.process.poll() is not None or time.monotonic() > deadline:
                    said = worker.log.read_text()[-3000:] if worker.log.exists() else ""
                    raise RuntimeError(f"worker {worker.name} did not start:\n{said}")
                time.sleep(0.2)
        yield workers
    finally:
        for worker in workers:
            _stop_process_group(worker.process, linger_s=5)

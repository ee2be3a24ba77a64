"""The environment's verbs: the embedded database (``db``), the demo data (``seed``), the
environment variables (``env``, ``exec``), the daemon and the UI (``daemon``, ``dev``), the demo,
and the declared tables."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from backfill_assets.core import settings
from backfill_assets.core.database import DatabaseUnavailableError, connect, ensure_database
from backfill_assets.core.registry import load_registry
from backfill_assets.core.tables import Timeouts
from backfill_assets.project import dbt_env, job_name
from backfill_assets.tooling import embedded
from backfill_assets.tooling.commands.arguments import bounded, seconds_between
from backfill_assets.tooling.environment import prepare


def _db(args: argparse.Namespace) -> int:
    pgdata = settings.embedded_pgdata()
    if args.action != "psql":
        # Everything after the action is psql's (REMAINDER), so --show-password lands there too.
        extra = [a for a in args.psql_args if a != "--show-password"]
        if extra:
            raise ValueError(f"db {args.action} takes no arguments, got {' '.join(extra)}")
        args.show_password = args.show_password or "--show-password" in args.psql_args
    if args.action == "start":
        embedded_server = settings.uses_embedded_postgres()
        if embedded_server:
            embedded.start(pgdata)
        else:
            print(
                f"{settings.DATA_URL_ENV} is set: using that server, not starting an embedded one"
            )
        for url, variable in (
            (settings.data_url(), settings.DATA_URL_ENV),
            (settings.to_libpq(settings.dagster_storage_url()), settings.DAGSTER_URL_ENV),
        ):
            ensure_database(url, variable=variable)
        if embedded_server:
            print(f"embedded PostgreSQL running in {pgdata}")
        print(settings.redact(settings.data_url()))
    elif args.action == "stop":
        print("stopped" if embedded.stop(pgdata) else f"not running ({pgdata})")
    elif args.action == "psql":
        prepare()
        url, env = settings.password_to_env(settings.data_url())
        return subprocess.run(
            [embedded.psql_path(), url, *args.psql_args], env={**os.environ, **env}
        ).returncode
    elif args.action == "status":
        running = embedded.is_running(pgdata)
        print(f"embedded PostgreSQL in {pgdata}: {'running' if running else 'stopped'}")
        return 0 if running else 3
    else:
        url = settings.data_url()
        print(url if args.show_password else settings.redact(url))
    return 0


def _seed(args: argparse.Namespace) -> int:
    from backfill_assets.tooling.demo_data import seed

    prepare()
    with connect(settings.data_url(), limits=Timeouts().session()) as conn:
        summary = seed(conn, orders_per_day=args.orders_per_day)
    print(f"seeded {summary.orders} orders over {summary.days} days, {summary.customers} customers")
    return 0


def _env(args: argparse.Namespace) -> int:
    for name, value in prepare().items():
        if name in (settings.DATA_URL_ENV, settings.DAGSTER_URL_ENV) and not args.show_password:
            value = settings.redact(value)
        print(f"export {name}={shlex.quote(value)}")
    return 0


def _exec(args: argparse.Namespace) -> int:
    command = [part for part in args.command if part != "--"]
    if not command:
        print("nothing to run: backfill-assets exec -- dagster ...", file=sys.stderr)
        return 2
    prepare()
    # dbt by hand (`exec -- dbt build` in the dbt project's folder) gets what the project gives
    # dbt itself: the connection, the package, the profile and the tables' first partitions.
    os.environ.update({**dbt_env(), **settings.connection_parts(settings.data_url()).as_dbt_env()})
    os.execvp(command[0], command)


def _daemon(args: argparse.Namespace) -> int:
    from backfill_assets.defs.daemon import run_daemon
    from backfill_assets.tooling.worker import announce

    interval_s = settings.daemon_interval_s() if args.interval is None else args.interval
    prepare()
    announce(settings.executor())
    print(f"dagster daemons running, a backfill pass every {interval_s:g}s (Ctrl-C stops)")
    run_daemon(settings.WORKSPACE_FILE, interval_s)
    return 0


def _worker(args: argparse.Namespace) -> int:
    from backfill_assets.tooling.worker import start_worker

    return start_worker(args.worker_name, args.concurrency, args.scratch, args.loglevel)


def _dev(args: argparse.Namespace) -> int:
    """The UI and the project's daemon (``dagster dev`` would start Dagster's, 30 s a pass)."""
    from backfill_assets.tooling.launch import running_daemon

    env = prepare()
    command = ["dagster-webserver", "-w", str(settings.WORKSPACE_FILE), "-h", "127.0.0.1"]
    with running_daemon(env, settings.LOG_DIR / "daemon.log"):
        print(f"daemon log: {settings.LOG_DIR / 'daemon.log'}")
        try:
            return subprocess.call([*command, "-p", str(args.port)], env={**os.environ, **env})
        except KeyboardInterrupt:
            return 0


def _demo(args: argparse.Namespace) -> int:
    from backfill_assets.tooling.demo import run_demo

    return run_demo(first=args.first, last=args.last, orders_per_day=args.orders_per_day)


def _tables(_: argparse.Namespace) -> int:
    """The declared tables, their partitions, jobs, whether their SQL keeps its contract and
    whether each key is in one partition only (a pass over each existing table)."""
    from backfill_assets.core.contract import check_table
    from backfill_assets.core.strategies import strategy_of
    from backfill_assets.core.table_keys import key_report

    registry = load_registry()
    if not len(registry):
        print("no tables declared; add a YAML file and its SQL to tables/ (see README.md)")
        return 0
    unreachable = ""
    try:
        conn = connect(settings.data_url())
    except (settings.SettingsError, DatabaseUnavailableError) as exc:
        conn, unreachable = None, str(exc)
    failed = 0
    for table in registry:
        print(f"{table.qualified_name}  ({table.declared_in})")
        print(f"  partitions: {table.partitioning.describe()} on {table.partition_column}")
        for line in strategy_of(table).describe(table):
            print(f"  {line}")
        print(f"  reads: {', '.join(table.upstream) or '-'}")
        print(f"  jobs: {job_name(table)}, {job_name(table, with_downstream=True)}")
        status = check_table(conn, table) if conn else "not checked: no database (see below)"
        failed += status.startswith("error")
        print(f"  contract: {status}")
        if conn:
            fine, keys = key_report(conn, table)
            failed += not fine
            print(f"  keys: {keys}")
    if conn:
        conn.close()
    if unreachable:
        print(f"error: contracts not checked: {unreachable}", file=sys.stderr)
        return 2
    return 1 if failed else 0


def register(commands: argparse._SubParsersAction) -> None:
    db = commands.add_parser("db", help="manage the embedded PostgreSQL cluster")
    db.add_argument("action", choices=["start", "stop", "status", "url", "psql"])
    db.add_argument(
        "psql_args", nargs=argparse.REMAINDER, help="psql: its arguments, e.g. -c 'SELECT 1'"
    )
    db.add_argument("--show-password", action="store_true", help="print `url` with its password")
    db.set_defaults(func=_db)

    seed = commands.add_parser("seed", help="(re)generate the demo shop data in schema app")
    seed.add_argument("--orders-per-day", type=bounded(1, 100_000), default=200)
    seed.set_defaults(func=_seed)

    env = commands.add_parser("env", help="print the environment as shell exports")
    env.add_argument(
        "--show-password",
        action="store_true",
        help="print the URLs with their passwords (for `eval`); masked as *** otherwise",
    )
    env.set_defaults(func=_env)

    run = commands.add_parser("exec", help="run a command (e.g. dagster ...) with the environment")
    run.add_argument("command", nargs=argparse.REMAINDER)
    run.set_defaults(func=_exec)

    daemon = commands.add_parser(
        "daemon",
        help="run Dagster's daemons with a backfill pass every second (dagster-daemon: 30 s)",
    )
    daemon.add_argument(
        "--interval",
        type=seconds_between(0.1, 300),
        default=None,
        help="seconds between backfill passes (default: BACKFILL_DAEMON_INTERVAL_S, else 1)",
    )
    daemon.set_defaults(func=_daemon)

    worker = commands.add_parser(
        "worker",
        help="run a Celery worker executing runs' steps on this host (BACKFILL_EXECUTOR=celery)",
    )
    worker.add_argument(
        "--name",
        dest="worker_name",
        default=f"w{os.getpid()}",
        help="this worker's name, one per worker of a host (Celery's hostname: NAME@host; "
        "default w<pid>)",
    )
    worker.add_argument(
        "--concurrency", type=bounded(1, 64), default=1, help="steps at a time (default 1)"
    )
    worker.add_argument(
        "--scratch",
        type=Path,
        default=None,
        help="this worker's folder for dbt's files (default ./.backfill-worker, which workers "
        "started in one folder share)",
    )
    worker.add_argument("--loglevel", choices=["debug", "info", "warning", "error"], default="info")
    worker.set_defaults(func=_worker)

    dev = commands.add_parser("dev", help="open the Dagster UI on 127.0.0.1, with the daemon")
    dev.add_argument("--port", type=bounded(1, 65_535), default=3000)
    dev.set_defaults(func=_dev)

    commands.add_parser("tables", help="list the declared tables and their jobs").set_defaults(
        func=_tables
    )

    demo = commands.add_parser("demo", help="seed, backfill a week through the daemon, summarize")
    demo.add_argument("--from", dest="first", default="2024-04-01")
    demo.add_argument("--to", dest="last", default="2024-04-07")
    demo.add_argument("--orders-per-day", type=bounded(1, 100_000), default=200)
    demo.set_defaults(func=_demo)

"""``backfill-assets``: start the embedded database, seed the demo, run Dagster with the right env.

Dagster's own CLI does the orchestration; this command only prepares what it needs (a running
PostgreSQL, the databases, the dbt manifest, the environment variables) so that a fresh machine
goes from clone to backfill in one command.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence

from backfill_assets.core import settings
from backfill_assets.core.database import DatabaseUnavailableError, connect, ensure_database
from backfill_assets.core.registry import load_registry
from backfill_assets.project import job_name
from backfill_assets.tooling import embedded
from backfill_assets.tooling.environment import prepare


def _db(args: argparse.Namespace) -> int:
    pgdata = settings.embedded_pgdata()
    if args.action == "start":
        embedded_server = settings.uses_embedded_postgres()
        if embedded_server:
            embedded.start(pgdata)
        else:
            print(
                f"{settings.DATA_URL_ENV} is set: using that server, not starting an embedded one"
            )
        for url in (settings.data_url(), settings.to_libpq(settings.dagster_storage_url())):
            ensure_database(url)
        if embedded_server:
            print(f"embedded PostgreSQL running in {pgdata}")
        print(settings.redact(settings.data_url()))
    elif args.action == "stop":
        print("stopped" if embedded.stop(pgdata) else f"not running ({pgdata})")
    elif args.action == "status":
        running = embedded.is_running(pgdata)
        print(f"embedded PostgreSQL in {pgdata}: {'running' if running else 'stopped'}")
        return 0 if running else 3
    else:
        print(settings.data_url())
    return 0


def _seed(args: argparse.Namespace) -> int:
    from backfill_assets.tooling.demo_data import seed

    prepare()
    with connect(settings.data_url()) as conn:
        summary = seed(conn, orders_per_day=args.orders_per_day)
    print(f"seeded {summary.orders} orders over {summary.days} days, {summary.customers} customers")
    return 0


def _env(_: argparse.Namespace) -> int:
    for name, value in prepare().items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


def _exec(args: argparse.Namespace) -> int:
    command = [part for part in args.command if part != "--"]
    if not command:
        print("nothing to run: backfill-assets exec -- dagster ...", file=sys.stderr)
        return 2
    prepare()
    os.execvp(command[0], command)


def _dev(args: argparse.Namespace) -> int:
    prepare()
    command = ["dagster", "dev", "-w", str(settings.WORKSPACE_FILE), "-h", "127.0.0.1"]
    os.execvp("dagster", [*command, "-p", str(args.port)])


def _rollback(args: argparse.Namespace) -> int:
    import getpass

    from backfill_assets.core import rollback
    from backfill_assets.core.audit import AuditTrail, RunInfo

    if bool(args.backfill) == bool(args.partition):
        print("give either --backfill ID or --partition YYYY-MM-DD", file=sys.stderr)
        return 2
    registry = load_registry()
    if args.partition:
        registry.table(args.table).partitioning.window(args.partition)
    prepare()
    url = settings.data_url()
    run = RunInfo(None, args.backfill, getpass.getuser(), {"command": "backfill-assets rollback"})
    with connect(url) as conn, AuditTrail(url) as audit:
        refs = rollback.snapshots_to_restore(
            conn,
            registry,
            backfill_id=args.backfill,
            table_name=args.table,
            partition=args.partition,
        )
        results = rollback.restore(conn, audit, run, refs)
    for result in results:
        ref = result.snapshot
        print(
            f"restored {ref.table.qualified_name} {ref.partition_key}: {result.rows_restored} rows "
            f"from the snapshot of write {ref.audit_id} (audit row {result.audit_id})"
        )
    print("Rebuild what reads these partitions (the tables and dbt models downstream of them).")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from backfill_assets.core.audit import recent_rows

    prepare()
    with connect(settings.data_url()) as conn:
        frame = recent_rows(conn, backfill_id=args.backfill, limit=args.limit)
    print(frame.to_string(index=False) if not frame.empty else "no audit rows yet")
    return 0


def _snapshots(args: argparse.Namespace) -> int:
    from backfill_assets.core import snapshots

    tables = list(load_registry())
    prepare()
    with connect(settings.data_url()) as conn:
        if args.action == "expire":
            for table in tables:
                expired = snapshots.expire(conn, table, args.days)
                print(f"{table.qualified_name}: expired {expired} snapshot rows")
        else:
            if args.customer_id is None:
                print("erase-customer needs --customer-id", file=sys.stderr)
                return 2
            erased = snapshots.erase_subject(conn, tables, args.customer_id)
            for name, count in erased.items():
                print(f"{name}: erased {count} snapshot rows of customer {args.customer_id}")
    return 0


def _tables(_: argparse.Namespace) -> int:
    """The declared tables, their partitions, jobs and whether their SQL keeps its contract."""
    from backfill_assets.core.contract import check_table

    registry = load_registry()
    if not len(registry):
        print("no tables declared; add a YAML file and its SQL to tables/ (see README.md)")
        return 0
    try:
        conn = connect(settings.data_url())
    except (settings.SettingsError, DatabaseUnavailableError) as exc:
        conn, unreachable = None, str(exc)
    failed = 0
    for table in registry:
        print(f"{table.qualified_name}  ({table.declared_in})")
        print(f"  partitions: {table.partitioning.describe()} on {table.partition_column}")
        print(f"  sql: {table.sql_path}")
        print(f"  reads: {', '.join(table.upstream) or '-'}")
        print(f"  jobs: {job_name(table)}, {job_name(table, with_downstream=True)}")
        status = check_table(conn, table) if conn else f"not checked: {unreachable}"
        failed += status.startswith("error")
        print(f"  contract: {status}")
    if conn:
        conn.close()
    return 1 if failed else 0


def _launch(args: argparse.Namespace) -> int:
    """Record an asset backfill, as the UI's "Materialize selected" does; the daemon runs it."""
    import json

    from backfill_assets.core.params import LAUNCHED_BY, launched_by
    from backfill_assets.tooling.launch import asset_selection, launch_asset_backfill

    try:
        tags = json.loads(args.tags) if args.tags else {}
    except json.JSONDecodeError as exc:
        example = '{"backfill_assets/diff_warn": "0.3"}'
        raise ValueError(f"--tags is not JSON ({exc}); e.g. '{example}'") from None
    if not isinstance(tags, dict):
        raise ValueError(f"--tags must be a JSON object of strings, got {args.tags!r}")
    prepare()
    from dagster import DagsterInstance

    from backfill_assets.defs.definitions import build_definitions

    definitions = build_definitions(load_registry(), check_sql=False)
    keys = asset_selection(definitions, args.select, downstream=args.downstream)
    tags = {k: str(v) for k, v in tags.items()}
    tags[LAUNCHED_BY] = launched_by(tags)  # the explicit tag, else the OS user
    with DagsterInstance.get() as instance:
        backfill_id = launch_asset_backfill(
            instance, keys, args.first, args.last, tags=tags, definitions=definitions
        )
        print(
            f"launched asset backfill {backfill_id}: {', '.join(k.to_user_string() for k in keys)}"
        )
        print(f"  partitions {args.first}..{args.last}")
        print(f"  follow it: backfill-assets status {backfill_id} --wait")
        if args.wait:
            return _follow(instance, backfill_id, wait=True)
    return 0


def _status(args: argparse.Namespace) -> int:
    prepare()
    from dagster import DagsterInstance

    with DagsterInstance.get() as instance:
        return _follow(instance, args.backfill_id, wait=args.wait)


def _follow(instance, backfill_id: str, *, wait: bool) -> int:
    """Print the backfill's progress; exit 0 when it succeeded, 1 when a run failed, 3 while it
    is still going (without ``--wait``)."""
    from backfill_assets.tooling.launch import backfill_progress, daemon_is_alive, wait_for_backfill

    if wait:
        if not daemon_is_alive(instance):
            print(
                "warning: no dagster-daemon heartbeat in the last minute; start one (`make ui`, or "
                "`backfill-assets exec -- dagster-daemon run -w workspace.yaml`)",
                file=sys.stderr,
            )
        progress = wait_for_backfill(
            instance, backfill_id, timeout_s=24 * 3600, on_progress=lambda p: print(p.line())
        )
    else:
        progress = backfill_progress(instance, backfill_id)
        print(progress.line())
    print(f"status: {progress.backfill_status.value}")
    if progress.failed:
        return 1
    return 0 if progress.done else 3


def _demo(args: argparse.Namespace) -> int:
    from backfill_assets.tooling.demo import run_demo

    return run_demo(first=args.first, last=args.last, orders_per_day=args.orders_per_day)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="backfill-assets", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="name", required=True)

    db = commands.add_parser("db", help="manage the embedded PostgreSQL cluster")
    db.add_argument("action", choices=["start", "stop", "status", "url"])
    db.set_defaults(func=_db)

    seed = commands.add_parser("seed", help="(re)generate the demo shop data in schema app")
    seed.add_argument("--orders-per-day", type=int, default=200)
    seed.set_defaults(func=_seed)

    commands.add_parser("env", help="print the environment as shell exports").set_defaults(
        func=_env
    )

    run = commands.add_parser("exec", help="run a command (e.g. dagster ...) with the environment")
    run.add_argument("command", nargs=argparse.REMAINDER)
    run.set_defaults(func=_exec)

    dev = commands.add_parser("dev", help="open the Dagster UI on 127.0.0.1")
    dev.add_argument("--port", type=int, default=3000)
    dev.set_defaults(func=_dev)

    undo = commands.add_parser("rollback", help="restore partitions from their snapshots")
    undo.add_argument("--backfill", help="undo every partition this backfill wrote")
    undo.add_argument("--partition", help="undo the latest write of one partition (YYYY-MM-DD)")
    undo.add_argument(
        "--table", help="schema.table of --partition (needed when several tables are declared)"
    )
    undo.set_defaults(func=_rollback)

    audit = commands.add_parser("audit", help="show recent rows of backfill_audit.backfill_runs")
    audit.add_argument("--backfill", help="only this backfill's rows")
    audit.add_argument("--limit", type=int, default=20)
    audit.set_defaults(func=_audit)

    snap = commands.add_parser("snapshots", help="expire old snapshots, erase a customer's rows")
    snap.add_argument("action", choices=["expire", "erase-customer"])
    snap.add_argument("--days", type=int, help="expire: retention in days (default: per table)")
    snap.add_argument("--customer-id", type=int, help="erase-customer: the customer to erase")
    snap.set_defaults(func=_snapshots)

    commands.add_parser("tables", help="list the declared tables and their jobs").set_defaults(
        func=_tables
    )

    launch = commands.add_parser(
        "launch", help="launch an asset backfill (as the UI does); the daemon executes it"
    )
    launch.add_argument(
        "--select",
        required=True,
        nargs="+",
        help="assets, e.g. analytics/fct_orders (or schema.table)",
    )
    launch.add_argument("--from", dest="first", required=True, help="first partition key")
    launch.add_argument("--to", dest="last", required=True, help="last partition key (included)")
    launch.add_argument(
        "--downstream", action="store_true", help="also the assets built from the selection"
    )
    launch.add_argument("--tags", help="JSON object of run tags, e.g. backfill_assets/* parameters")
    launch.add_argument("--wait", action="store_true", help="follow it until it ends")
    launch.set_defaults(func=_launch)

    status = commands.add_parser("status", help="progress of a backfill; exit 1 if a run failed")
    status.add_argument("backfill_id")
    status.add_argument("--wait", action="store_true", help="follow it until it ends")
    status.set_defaults(func=_status)

    demo = commands.add_parser("demo", help="seed, backfill a week through the daemon, summarize")
    demo.add_argument("--from", dest="first", default="2024-04-01")
    demo.add_argument("--to", dest="last", default="2024-04-07")
    demo.add_argument("--orders-per-day", type=int, default=200)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (settings.SettingsError, DatabaseUnavailableError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

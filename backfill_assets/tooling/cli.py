"""``backfill-assets``: start the embedded database, seed the demo, run Dagster with the right env.

Dagster's own CLI does the orchestration; this command only prepares what it needs (a running
PostgreSQL, the databases, the dbt manifest, the environment variables) so that a fresh machine
goes from clone to backfill in one command.
"""

from __future__ import annotations

import argparse
import getpass
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence

from backfill_assets.core import session_limits, settings
from backfill_assets.core.database import DatabaseUnavailableError, connect, ensure_database
from backfill_assets.core.registry import load_registry
from backfill_assets.core.session_limits import timed
from backfill_assets.core.tables import Timeouts
from backfill_assets.project import job_name
from backfill_assets.tooling import embedded
from backfill_assets.tooling.environment import prepare

AUDIT_TABLE = "backfill_audit.backfill_runs"


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
    os.execvp(command[0], command)


def _dev(args: argparse.Namespace) -> int:
    prepare()
    command = ["dagster", "dev", "-w", str(settings.WORKSPACE_FILE), "-h", "127.0.0.1"]
    os.execvp("dagster", [*command, "-p", str(args.port)])


def _rollback(args: argparse.Namespace) -> int:
    import getpass

    from backfill_assets.core import rollback
    from backfill_assets.core.audit import AuditTrail, RunInfo
    from backfill_assets.core.params import REASON, reason

    if bool(args.backfill) == bool(args.partition):
        print("give either --backfill ID or --partition YYYY-MM-DD", file=sys.stderr)
        return 2
    registry = load_registry()
    if args.partition:
        registry.table(args.table).partitioning.window(args.partition)
    why = reason({REASON: args.reason or ""})  # refused before anything is touched
    prepare()
    url = settings.data_url()
    run = RunInfo(
        None,
        args.backfill,
        getpass.getuser(),
        {"command": "backfill-assets rollback"},
        reason=why,
    )
    with connect(url) as conn, AuditTrail(url) as audit:
        refs = rollback.snapshots_to_restore(
            conn,
            registry,
            backfill_id=args.backfill,
            table_name=args.table,
            partition=args.partition,
        )
        results = rollback.restore(
            conn, audit, run, refs, lambda line: print(line, file=sys.stderr, flush=True)
        )
    for result in results:
        ref = result.snapshot
        print(
            f"restored {ref.table.qualified_name} {ref.partition_key}: {result.rows_restored} rows "
            f"from the snapshot of write {ref.audit_id} (audit row {result.audit_id})"
        )
    _record_in_dagster(results)
    print("Rebuild what reads these partitions (the tables and dbt models downstream of them).")
    return 0


def _record_in_dagster(results) -> None:
    """Each restored partition as its asset's newest materialization, as the rollback job
    records it: otherwise the UI would go on showing the undone write as what the day holds.
    The rows are restored already; a Dagster storage that cannot be reached is said, not fatal."""
    from dagster import DagsterInstance

    from backfill_assets.defs.rollback import restored_materialization

    try:
        with DagsterInstance.get() as instance:
            for result in results:
                instance.report_runless_asset_event(restored_materialization(result))
    except Exception as exc:  # the data is restored; only the UI's record is missing
        print(
            f"warning: the rollback is done, but Dagster's storage did not record it ({exc}); "
            "the UI shows the undone write until these partitions are written again",
            file=sys.stderr,
        )


MAX_RETENTION_DAYS = 36_500
"""A century: longer retentions are refused rather than overflowing PostgreSQL's intervals."""


def bounded(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high``, else one line naming the value
    (argparse exits 2 with it, before anything runs)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}")
        return value

    return parse


def _audit(args: argparse.Namespace) -> int:
    from backfill_assets.core.audit import close_abandoned, recent_rows

    prepare()
    limits = session_limits.bookkeeping()
    with timed(AUDIT_TABLE, limits), connect(settings.data_url(), limits=limits) as conn:
        if args.close_abandoned:
            closed = close_abandoned(conn)
            print(f"closed {len(closed)} abandoned audit row(s) as failed: {closed or '-'}")
            return 0
        if args.erasures:
            from backfill_assets.core.erasure import recent_erasures

            erasures = recent_erasures(conn, args.limit)
            print(erasures.to_string(index=False) if not erasures.empty else "no erasures yet")
            return 0
        frame = recent_rows(conn, backfill_id=args.backfill, limit=args.limit)
    # Counts absent from a row (a refusal deletes nothing) print empty, not as NaN floats.
    shown = frame.astype(object).where(frame.notna(), "")
    print(shown.to_string(index=False) if not frame.empty else "no audit rows yet")
    return 0


def _snapshots(args: argparse.Namespace) -> int:
    from backfill_assets.core import snapshots

    tables = list(load_registry())
    prepare()
    limits = session_limits.snapshots_of(t.timeouts for t in tables)
    with (
        timed("the snapshot tables", limits),
        connect(settings.data_url(), limits=limits) as conn,
    ):
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


def _erase(args: argparse.Namespace) -> int:
    """One person's rows out of every table, mart and snapshot, through the daemon."""
    from backfill_assets.core.params import LAUNCHED_BY, REASON, launched_by, reason

    if not reason({REASON: args.reason}):
        raise ValueError("--reason is empty; give the request or ticket (not the person's name)")
    prepare()
    from dagster import DagsterInstance

    from backfill_assets.defs.definitions import build_definitions
    from backfill_assets.tooling.erasure import erase

    registry = load_registry()
    definitions = build_definitions(registry, check_sql=False)
    with DagsterInstance.get() as instance:
        erase(
            instance,
            definitions,
            registry,
            settings.data_url(),
            args.subject,
            args.reason,
            launched_by({LAUNCHED_BY: ""}),
        )
    return 0


def _tables(_: argparse.Namespace) -> int:
    """The declared tables, their partitions, jobs and whether their SQL keeps its contract."""
    from backfill_assets.core.contract import check_table
    from backfill_assets.core.strategies import strategy_of

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
        conn.close()
    if unreachable:
        print(f"error: contracts not checked: {unreachable}", file=sys.stderr)
        return 2
    return 1 if failed else 0


def _launch(args: argparse.Namespace) -> int:
    """Record an asset backfill, as the UI's "Materialize selected" does; the daemon runs it."""
    import json

    from backfill_assets.core.params import LAUNCHED_BY, REASON, launched_by, reason
    from backfill_assets.tooling.launch import (
        asset_selection,
        launch_asset_backfill,
        partition_keys,
    )

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
    if args.reason is not None:
        tags[REASON] = args.reason
    reason(tags)  # refused here, before anything is launched
    with DagsterInstance.get() as instance:
        server = _webserver(args)
        if server:
            partitions = partition_keys(definitions, keys[0], args.first, args.last)
            backfill_id = server.launch_asset_backfill(
                keys, partitions, tags=tags, title=f"{args.first}..{args.last}"
            )
        else:
            backfill_id = launch_asset_backfill(
                instance, keys, args.first, args.last, tags=tags, definitions=definitions
            )
        if args.json and not args.wait:
            launched = {"backfill_id": backfill_id, "first": args.first, "last": args.last}
            print(json.dumps(launched | {"assets": [k.to_user_string() for k in keys]}))
            return 0
        if not args.json:
            names = ", ".join(k.to_user_string() for k in keys)
            print(f"launched asset backfill {backfill_id}: {names}")
            print(f"  partitions {args.first}..{args.last}")
            print(f"  follow it: backfill-assets status {backfill_id} --wait")
        if args.wait:
            return _follow(instance, backfill_id, wait=True, as_json=args.json)
    return 0


def _stale(args: argparse.Namespace) -> int:
    """Written partitions whose source or code changed since (or whose upstream was rewritten);
    with ``--launch``, a backfill of exactly those."""
    from backfill_assets.core.params import LAUNCHED_BY, REASON, launched_by, reason

    tags = {LAUNCHED_BY: launched_by({})}
    if args.reason:
        tags[REASON] = args.reason
    reason(tags)
    prepare()
    from dagster import DagsterInstance

    from backfill_assets.defs.definitions import build_definitions
    from backfill_assets.tooling.launch import asset_selection, launch_asset_backfill
    from backfill_assets.tooling.stale import find_stale

    registry = load_registry()
    definitions = build_definitions(registry, check_sql=False)
    # With --downstream, what reads the asset is looked at too: a mart whose own code changed is
    # stale on days its table is not, and the launch covers every day stale in any of them.
    keys = asset_selection(definitions, [args.select], downstream=args.downstream)
    with DagsterInstance.get() as instance:
        stale: set[str] = set()
        for asset in keys:
            report = find_stale(
                instance, definitions, registry, asset, args.first, args.last, settings.data_url()
            )
            print("\n".join(report.lines()))
            stale.update(s.key for s in report.stale)
        if not stale or not args.launch:
            return 1 if stale else 0
        stale = sorted(stale)
        backfill_id = launch_asset_backfill(
            instance, keys, stale[0], stale[-1], tags=tags, definitions=definitions, only=stale
        )
        names = ", ".join(k.to_user_string() for k in keys)
        print(f"launched asset backfill {backfill_id} of those {len(stale)} partition(s): {names}")
        if args.wait:
            return _follow(instance, backfill_id, wait=True, as_json=False)
    return 0


def _plan(args: argparse.Namespace) -> int:
    """What ``launch`` with the same arguments would do, and how long it would take; writes
    nothing."""
    import json

    prepare()
    from dagster import DagsterInstance

    from backfill_assets.defs.definitions import build_definitions
    from backfill_assets.tooling.launch import asset_selection, partition_keys
    from backfill_assets.tooling.plan import plan

    registry = load_registry()
    definitions = build_definitions(registry)
    selected = asset_selection(definitions, args.select)
    keys = asset_selection(definitions, args.select, downstream=args.downstream)
    partitions = partition_keys(definitions, keys[0], args.first, args.last)
    with connect(settings.data_url()) as conn, DagsterInstance.get() as instance:
        result = plan(conn, instance, definitions, registry, keys, partitions, selected=selected)
    if args.json:
        print(json.dumps(result.as_json(), indent=2))
    else:
        print("\n".join(result.lines()))
    return 0


def _status(args: argparse.Namespace) -> int:
    prepare()
    from dagster import DagsterInstance

    with DagsterInstance.get() as instance:
        return _follow(instance, args.backfill_id, wait=args.wait, as_json=args.json)


def _follow(instance, backfill_id: str, *, wait: bool, as_json: bool = False) -> int:
    """Report the backfill partition by partition; exit 0 when every partition materialized, 1
    when one failed or the backfill ended without it (canceled), 3 while it is still going
    (without ``--wait``)."""
    import json

    from backfill_assets.tooling.launch import daemon_is_alive
    from backfill_assets.tooling.report import BackfillWatcher, watch

    watcher = BackfillWatcher(instance, backfill_id)
    if wait:
        if not daemon_is_alive(instance):
            print(
                "warning: no dagster-daemon heartbeat in the last minute; start one (`make ui`, "
                "or `backfill-assets exec -- dagster-daemon run -w workspace.yaml`)",
                file=sys.stderr,
            )
        show = None if as_json else (lambda r: print(r.line(), flush=True))
        report = watch(watcher, timeout_s=24 * 3600, on_change=show)
    else:
        report = watcher.report()
        if not as_json:
            print(report.line())
    if as_json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        for partition, checks in sorted(report.failed_checks.items()):
            for name, verdict in sorted(checks.items()):
                print(f"  {partition}: {name} {verdict}")
        for run_id, failure in sorted(report.failures.items()):
            print(f"  run {run_id} failed: {failure}")
        if report.error:
            ended = "was stopped" if report.daemon_status == "CANCELED" else "failed"
            print(f"  the backfill {ended}: {report.error}")
            if "no longer does" in report.error:
                print(
                    "  the running daemon's definitions lack an asset of this backfill: check "
                    "that they load (`backfill-assets tables`), then restart `make ui` (or the "
                    "UI's Lineage > Reload definitions) and `retry` it"
                )
        failed = sorted(
            f"{p.asset} {p.partition}"
            for p in report.partitions.values()
            if p.status == "failed" or (report.finished and p.status == "pending")
        )
        if failed:
            print(f"  not materialized: {', '.join(failed)}")
            print(f"  retry them: backfill-assets retry {backfill_id}")
        print(f"status: {report.state_line()}")
    if report.count("failed") or (report.finished and not report.succeeded):
        return 1
    return 0 if report.finished else 3


def _report(args: argparse.Namespace) -> int:
    """What a backfill changed per partition: Markdown here, an HTML page with charts in a file."""
    import json
    from pathlib import Path

    from backfill_assets.core.change_report import backfill_changes, html_page, markdown

    out = Path(args.out or f"backfill-{args.backfill_id}.html")
    if out.is_dir() or not out.parent.is_dir():
        raise ValueError(
            f"--out {out}: {'is a folder' if out.is_dir() else 'its folder does not exist'}; "
            "give the path of an HTML (or .json) file in an existing folder"
        )
    numbers_file = out.suffix.lower() == ".json"  # the JSON there, not the page
    prepare()
    with timed(AUDIT_TABLE), connect(settings.data_url()) as conn:
        changes = backfill_changes(conn, args.backfill_id)
    if not changes:
        from dagster import DagsterInstance

        from backfill_assets.tooling.report import existing_backfill

        with DagsterInstance.get() as instance:
            existing_backfill(instance, args.backfill_id)  # refuses an unknown id
    numbers = json.dumps([c.as_json() for c in changes], indent=2)
    if args.json:
        print(numbers)
    else:
        print(markdown(changes, heading=f"Backfill {args.backfill_id}"), end="")
    try:
        out.write_text(numbers + "\n" if numbers_file else html_page(args.backfill_id, changes))
    except OSError as exc:
        raise ValueError(f"--out {out}: {exc.strerror}; nothing written") from None
    what = "numbers" if numbers_file else "charts"
    print(f"{what}: {out.resolve()}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _cancel(args: argparse.Namespace) -> int:
    prepare()
    from dagster import DagsterInstance

    from backfill_assets.tooling.cancel import cancel_backfill

    with DagsterInstance.get() as instance:
        server = _webserver(args)
        request = server.cancel if server else None
        canceled = cancel_backfill(instance, args.backfill_id, request=request)
    print("\n".join(canceled.lines()))
    return 0


def _pause(args: argparse.Namespace) -> int:
    from backfill_assets.core import control

    scope = _pause_scope(args)
    with connect(settings.data_url()) as conn:
        if args.name == "resume":
            lifted = control.resume(conn, scope)
            what = "every backfill" if scope == control.ALL else f"backfill {scope}"
            print(f"{what}: {'resumed' if lifted else 'was not paused'}")
            return 0
        paused = control.pause(conn, scope, by=getpass.getuser(), reason=args.reason)
    print(f"{paused.describe()}; its writers stop before their next partition")
    print(f"  go on with: backfill-assets resume {'--all' if scope == control.ALL else scope}")
    return 0


def _finish_column(args: argparse.Namespace) -> int:
    from backfill_assets.core.not_null import finish_column

    table = load_registry().table(args.table)
    prepare()
    with connect(settings.data_url()) as conn:
        done = finish_column(
            conn, table, args.column, lambda line: print(line, file=sys.stderr, flush=True)
        )
    print(done)
    return 0


def _pause_scope(args: argparse.Namespace) -> str:
    from backfill_assets.core import control

    if args.all == bool(args.backfill_id):
        raise ValueError("name one backfill id, or --all for every backfill")
    prepare()
    if args.all:
        return control.ALL
    from dagster import DagsterInstance

    from backfill_assets.tooling.report import existing_backfill

    with DagsterInstance.get() as instance:
        existing_backfill(instance, args.backfill_id)
    return args.backfill_id


def _retry(args: argparse.Namespace) -> int:
    prepare()
    from dagster import DagsterInstance

    from backfill_assets.defs.definitions import build_definitions
    from backfill_assets.tooling.launch import closed, retry_backfill

    definitions = build_definitions(load_registry(), check_sql=False)
    with DagsterInstance.get() as instance:
        server = _webserver(args)
        if server:
            closed(instance, args.backfill_id)  # what it materialized is final once closed
            new_id = server.retry(args.backfill_id)
        else:
            new_id = retry_backfill(instance, args.backfill_id, definitions)
        print(f"launched asset backfill {new_id}: the partitions {args.backfill_id} did not write")
        print(f"  follow it: backfill-assets status {new_id} --wait")
        if args.wait:
            return _follow(instance, new_id, wait=True)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from backfill_assets.tooling.demo import run_demo

    return run_demo(first=args.first, last=args.last, orders_per_day=args.orders_per_day)


def _webserver(args: argparse.Namespace):
    """The webserver to send the request to, if one is named; else None (the instance)."""
    from backfill_assets.tooling.webserver import WEBSERVER_ENV, Webserver

    url = args.webserver or os.environ.get(WEBSERVER_ENV)
    return Webserver(url) if url else None


def _webserver_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--webserver",
        metavar="URL",
        help="send it through this Dagster webserver's GraphQL API, e.g. http://127.0.0.1:3000 "
        "(default: $BACKFILL_WEBSERVER_URL, else the instance directly)",
    )


def _selection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--select",
        required=True,
        nargs="+",
        action="extend",
        help="assets, e.g. analytics/fct_orders (or schema.table); repeat or list several",
    )
    parser.add_argument("--from", dest="first", required=True, help="first partition key")
    parser.add_argument("--to", dest="last", required=True, help="last partition key (included)")
    parser.add_argument(
        "--downstream", action="store_true", help="also the assets built from the selection"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="backfill-assets", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="name", required=True)

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

    dev = commands.add_parser("dev", help="open the Dagster UI on 127.0.0.1")
    dev.add_argument("--port", type=bounded(1, 65_535), default=3000)
    dev.set_defaults(func=_dev)

    undo = commands.add_parser("rollback", help="restore partitions from their snapshots")
    undo.add_argument("--backfill", help="undo every partition this backfill wrote")
    undo.add_argument("--reason", help="why: kept in the rollback's audit rows")
    undo.add_argument("--partition", help="undo the latest write of one partition (YYYY-MM-DD)")
    undo.add_argument(
        "--table", help="schema.table of --partition (needed when several tables are declared)"
    )
    undo.set_defaults(func=_rollback)

    audit = commands.add_parser("audit", help="show recent rows of backfill_audit.backfill_runs")
    audit.add_argument("--backfill", help="only this backfill's rows")
    audit.add_argument("--erasures", action="store_true", help="the erasure records instead")
    audit.add_argument("--limit", type=bounded(1, 100_000), default=20)
    audit.add_argument(
        "--close-abandoned",
        action="store_true",
        help="mark rows left 'running' by a killed process (earlier versions) as failed",
    )
    audit.set_defaults(func=_audit)

    snap = commands.add_parser("snapshots", help="expire old snapshots, erase a customer's rows")
    snap.add_argument("action", choices=["expire", "erase-customer"])
    snap.add_argument(
        "--days",
        type=bounded(1, MAX_RETENTION_DAYS),
        help="expire: retention in days (default: per table)",
    )
    snap.add_argument("--customer-id", type=int, help="erase-customer: the customer to erase")
    snap.set_defaults(func=_snapshots)

    commands.add_parser("tables", help="list the declared tables and their jobs").set_defaults(
        func=_tables
    )

    erasure = commands.add_parser(
        "erase",
        help="erase one person from every table, mart and snapshot (a backfill, after the source)",
    )
    erasure.add_argument(
        "--subject", required=True, help="the person's value in each subject_column (a customer id)"
    )
    erasure.add_argument(
        "--reason", required=True, help="the request or ticket id, kept in the audit (not a name)"
    )
    erasure.set_defaults(func=_erase)

    launch = commands.add_parser(
        "launch", help="launch an asset backfill (as the UI does); the daemon executes it"
    )
    _selection_arguments(launch)
    launch.add_argument("--tags", help="JSON object of run tags, e.g. backfill_assets/* parameters")
    launch.add_argument("--wait", action="store_true", help="follow it until it ends")
    launch.add_argument(
        "--reason", help="why (a sentence, a ticket id): kept in every audit row it leaves"
    )
    launch.add_argument(
        "--json", action="store_true", help="print its id (with --wait: its report) as JSON"
    )
    _webserver_argument(launch)
    launch.set_defaults(func=_launch)

    dry = commands.add_parser(
        "plan", help="what a launch would write and how long it would take; writes nothing"
    )
    _selection_arguments(dry)
    dry.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    dry.set_defaults(func=_plan)

    status = commands.add_parser(
        "status", help="a backfill partition by partition; exit 1 if a partition failed"
    )
    status.add_argument("backfill_id")
    status.add_argument("--wait", action="store_true", help="follow it until it ends")
    status.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    status.set_defaults(func=_status)

    report = commands.add_parser(
        "report", help="what a backfill changed per partition (Markdown; HTML page with charts)"
    )
    report.add_argument("backfill_id")
    report.add_argument(
        "--out",
        help="the HTML page with charts (default: ./backfill-BACKFILL_ID.html); a .json path "
        "gets the numbers as JSON instead",
    )
    report.add_argument("--json", action="store_true", help="the numbers as JSON, for scripts")
    report.set_defaults(func=_report)

    cancel = commands.add_parser(
        "cancel", help="cancel a backfill: its queued runs, and stop its running ones"
    )
    cancel.add_argument("backfill_id")
    _webserver_argument(cancel)
    cancel.set_defaults(func=_cancel)

    for name, text in (
        ("pause", "stop a backfill's writers before their next partition (runs wait)"),
        ("resume", "let a paused backfill's writers go on"),
    ):
        switch = commands.add_parser(name, help=text)
        switch.add_argument("backfill_id", nargs="?")
        switch.add_argument("--all", action="store_true", help="every backfill on this database")
        if name == "pause":
            switch.add_argument("--reason", help="why, shown to whoever looks at the runs")
        switch.set_defaults(func=_pause)

    stale = commands.add_parser(
        "stale",
        help="written partitions whose source or code changed since (late data, new logic); "
        "--launch backfills exactly those",
    )
    stale.add_argument(
        "--select", required=True, help="a partitioned asset, e.g. analytics/fct_orders"
    )
    stale.add_argument("--from", dest="first", help="first partition (default: the first)")
    stale.add_argument("--to", dest="last", help="last partition (default: the last)")
    stale.add_argument("--launch", action="store_true", help="backfill the changed partitions")
    stale.add_argument(
        "--downstream", action="store_true", help="and what reads the asset (checked and launched)"
    )
    stale.add_argument("--reason", help="--launch: why, kept in every audit row")
    stale.add_argument("--wait", action="store_true", help="--launch: follow it until it ends")
    stale.set_defaults(func=_stale)

    finish = commands.add_parser(
        "finish-column",
        help="make a column filled by batched_update NOT NULL without a long lock",
    )
    finish.add_argument("table", help="schema.table, as declared")
    finish.add_argument("column")
    finish.set_defaults(func=_finish_column)

    retry = commands.add_parser(
        "retry", help="launch what an ended backfill did not materialize (failed or never run)"
    )
    retry.add_argument("backfill_id")
    retry.add_argument("--wait", action="store_true", help="follow it until it ends")
    _webserver_argument(retry)
    retry.set_defaults(func=_retry)

    demo = commands.add_parser("demo", help="seed, backfill a week through the daemon, summarize")
    demo.add_argument("--from", dest="first", default="2024-04-01")
    demo.add_argument("--to", dest="last", default="2024-04-07")
    demo.add_argument("--orders-per-day", type=bounded(1, 100_000), default=200)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with timed("a table this command reads or writes"):
            return args.func(args)
    except (settings.SettingsError, DatabaseUnavailableError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`backfill-assets tables | head`): stop quietly, as Unix tools do.
        # Point stdout at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())

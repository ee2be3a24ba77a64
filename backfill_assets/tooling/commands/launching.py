"""Launching and following backfills: ``launch``, ``plan`` (what a launch would do), ``status``
and ``retry``."""

from __future__ import annotations

import argparse
import sys
import time

from backfill_assets.core import settings
from backfill_assets.core.database import connect
from backfill_assets.core.registry import load_registry
from backfill_assets.tooling.commands.arguments import webserver, webserver_argument
from backfill_assets.tooling.environment import prepare


def _launch(args: argparse.Namespace) -> int:
    """Record an asset backfill, as the UI's "Materialize selected" does; the daemon runs it."""
    import json

    from backfill_assets.core.params import LAUNCHED_BY, REASON, launched_by, reason
    from backfill_assets.tooling.launch import (
        asset_selection,
        launch_asset_backfill,
        partition_keys,
    )
    from backfill_assets.tooling.worker import announce

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
    announce(settings.executor())
    with DagsterInstance.get() as instance:
        server = webserver(args)
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
            return follow(instance, backfill_id, wait=True, as_json=args.json)
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
        return follow(instance, args.backfill_id, wait=args.wait, as_json=args.json)


DAEMON_GRACE_S = 10.0
"""How long ``--wait`` gives a daemon that is starting (its code server loading) to report
before warning that none runs."""


def _daemon_reports(instance, *, within_s: float) -> bool:
    from backfill_assets.tooling.launch import daemon_is_alive

    deadline = time.monotonic() + within_s
    while not daemon_is_alive(instance):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def follow(instance, backfill_id: str, *, wait: bool, as_json: bool = False) -> int:
    """Report the backfill partition by partition; exit 0 when every partition materialized, 1
    when one failed or the backfill ended without it (canceled), 3 while it is still going
    (without ``--wait``)."""
    import json

    from backfill_assets.tooling.report import BackfillWatcher, watch

    watcher = BackfillWatcher(instance, backfill_id)
    if wait:
        if not _daemon_reports(instance, within_s=DAEMON_GRACE_S):
            print(
                "warning: no daemon heartbeat in the last minute; start one (`make ui`, or "
                "`backfill-assets daemon`)",
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
        lacking = report.finished and _assets_the_daemon_lacks(instance, report)
        if lacking:
            print(
                f"  the running daemon's code lacks {', '.join(lacking)} of this backfill: check "
                "that the definitions load (`backfill-assets tables`), then restart `make ui` "
                "(or the UI's Lineage > Reload definitions) and `retry` it"
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


def _assets_the_daemon_lacks(instance, report) -> list[str]:
    """The backfill's assets that the code the project's daemon runs does not define (none
    known when no project daemon published its assets)."""
    from backfill_assets.defs.daemon import daemon_assets
    from backfill_assets.tooling.report import ANY_ASSET

    loaded = daemon_assets(instance)
    if loaded is None:
        return []
    wanted = {p.asset for p in report.partitions.values() if p.asset != ANY_ASSET}
    return sorted(wanted - loaded)


def _retry(args: argparse.Namespace) -> int:
    prepare()
    from dagster import DagsterInstance

    from backfill_assets.defs.definitions import build_definitions
    from backfill_assets.tooling.launch import closed, retry_backfill

    definitions = build_definitions(load_registry(), check_sql=False)
    with DagsterInstance.get() as instance:
        server = webserver(args)
        if server:
            closed(instance, args.backfill_id)  # what it materialized is final once closed
            new_id = server.retry(args.backfill_id)
        else:
            new_id = retry_backfill(instance, args.backfill_id, definitions)
        print(f"launched asset backfill {new_id}: the partitions {args.backfill_id} did not write")
        print(f"  follow it: backfill-assets status {new_id} --wait")
        if args.wait:
            return follow(instance, new_id, wait=True)
    return 0


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


def register(commands: argparse._SubParsersAction) -> None:
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
    webserver_argument(launch)
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

    retry = commands.add_parser(
        "retry", help="launch what an ended backfill did not materialize (failed or never run)"
    )
    retry.add_argument("backfill_id")
    retry.add_argument("--wait", action="store_true", help="follow it until it ends")
    webserver_argument(retry)
    retry.set_defaults(func=_retry)

"""Holding or stopping a backfill that runs: ``cancel``, ``pause`` and ``resume``."""

from __future__ import annotations

import argparse
import getpass

from backfill_assets.core import settings
from backfill_assets.core.database import connect
from backfill_assets.tooling.commands.arguments import webserver, webserver_argument
from backfill_assets.tooling.environment import prepare


def _cancel(args: argparse.Namespace) -> int:
    prepare()
    from dagster import DagsterInstance

    from backfill_assets.tooling.cancel import cancel_backfill

    with DagsterInstance.get() as instance:
        server = webserver(args)
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


def register(commands: argparse._SubParsersAction) -> None:
    cancel = commands.add_parser(
        "cancel", help="cancel a backfill: its queued runs, and stop its running ones"
    )
    cancel.add_argument("backfill_id")
    webserver_argument(cancel)
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

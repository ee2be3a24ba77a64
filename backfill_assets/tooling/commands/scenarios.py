"""The scenarios with a verb of their own: partitions gone ``stale`` (late data, new logic), a
person to ``erase``, a column filled in place to make NOT NULL (``finish-column``)."""

from __future__ import annotations

import argparse
import sys

from backfill_assets.core import settings
from backfill_assets.core.database import connect
from backfill_assets.core.registry import load_registry
from backfill_assets.tooling.commands.launching import follow
from backfill_assets.tooling.environment import prepare


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
            return follow(instance, backfill_id, wait=True, as_json=False)
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


def register(commands: argparse._SubParsersAction) -> None:
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

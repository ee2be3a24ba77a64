"""What a backfill left behind: the audit trail (``audit``), what it changed (``report``), and
undoing it from its snapshots (``rollback``, ``snapshots``)."""

from __future__ import annotations

import argparse
import sys

from backfill_assets.core import session_limits, settings
from backfill_assets.core.database import connect
from backfill_assets.core.registry import load_registry
from backfill_assets.core.session_limits import timed
from backfill_assets.tooling.commands.arguments import bounded
from backfill_assets.tooling.environment import prepare

AUDIT_TABLE = "backfill_audit.backfill_runs"

MAX_RETENTION_DAYS = 36_500
"""A century: longer retentions are refused rather than overflowing PostgreSQL's intervals."""


def _rollback(args: argparse.Namespace) -> int:
    import getpass

    from backfill_assets.core import rollback
    from backfill_assets.core.audit import AuditTrail, RunInfo
    from backfill_assets.core.params import REASON, reason

    if bool(args.backfill) == bool(args.partition):
        print("give either --backfill ID or --partition KEY", file=sys.stderr)
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


def register(commands: argparse._SubParsersAction) -> None:
    undo = commands.add_parser("rollback", help="restore partitions from their snapshots")
    undo.add_argument("--backfill", help="undo every partition this backfill wrote")
    undo.add_argument("--reason", help="why: kept in the rollback's audit rows")
    undo.add_argument(
        "--partition", help="undo the latest write of one partition (its key, e.g. 2024-03-01)"
    )
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

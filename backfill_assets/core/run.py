"""One run of a table: the sequence every driver of a backfill shares, without Dagster.

A run is handed a table and the windows to write (a Dagster step's partitions, a worker's
share, a test's days) and does, in this order: check the role's privileges, the SQL contract and
the target's kind (refused before anything is written); create the target and where snapshots
go; close audit rows a killed process left running; guard every window in two statements and
record the refusals; then write the windows one by one, each in its own transaction(s) through
the table's strategy, holding back before each for the pause switch and the throttle, and
stopping early only when the connection is lost or the throttle gives up. A window refused
because windows still to come hold keys of its new rows (keys the source moved to an earlier
partition, ``core/table_keys.py``) is written again once after them. It returns every
window's outcome: the driver reports them (the Dagster asset as materializations, check
evaluations and a failure naming what was not written), then calls ``expire_snapshots``.

Nothing here asks which strategy the table has: ``strategy_of(table)`` says what the target is
and writes each window.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from backfill_assets.core import settings, snapshots
from backfill_assets.core.audit import AuditTrail, RunInfo, close_abandoned
from backfill_assets.core.contract import (
    ContractError,
    SourceNotReady,
    check_contract,
    check_target,
)
from backfill_assets.core.control import wait_while_paused
from backfill_assets.core.params import BackfillParams
from backfill_assets.core.partition_write import record_refusal, run_guards
from backfill_assets.core.partitioning import PartitionWindow
from backfill_assets.core.privileges import PrivilegeError, require_data_grants
from backfill_assets.core.progress import Progress
from backfill_assets.core.strategies import PartitionOutcome, Strategy, WriteHooks, strategy_of
from backfill_assets.core.tables import TableSpec
from backfill_assets.core.throttle import Throttle, ThrottleTimeout

Log = Callable[[str], object]


class RunRefused(Exception):
    """The run cannot start (a missing privilege, a broken contract, a source that does not
    exist yet); the message says why and that nothing was written."""


@dataclass(frozen=True)
class RunHooks:
    """Where a run's lines go: ``info`` (progress, time held back), ``warn`` (abandoned audit
    rows, guard overrides, retries, the throttle's and the pause's reasons), ``error`` (a
    window that failed); ``checkpoint``, called where the pause is read (before each partition,
    between a strategy's batches, and while a pause holds the run), may raise to stop the run
    there: a driver's way to stop a run whose cancel cannot reach its process as a signal (a
    step on another host)."""

    info: Log
    warn: Log
    error: Log
    checkpoint: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class RunResult:
    """Every window's outcome, in the order they were decided: the guard's refusals first, then
    the writes. ``stopped`` says why the windows without an outcome were not attempted."""

    windows: list[PartitionWindow]
    outcomes: list[PartitionOutcome]
    stopped: str | None = None

    @property
    def complete(self) -> bool:
        """Every window written and committed."""
        return all(o.succeeded for o in self.outcomes) and len(self.outcomes) >= len(self.windows)

    @property
    def committed(self) -> list[PartitionOutcome]:
        return [o for o in self.outcomes if o.succeeded]

    @property
    def failed(self) -> list[PartitionOutcome]:
        return [o for o in self.outcomes if not o.succeeded]

    @property
    def unattempted(self) -> list[str]:
        attempted = {o.window.key for o in self.outcomes}
        return [w.key for w in self.windows if w.key not in attempted]


def run_table(
    conn: psycopg.Connection,
    audit: AuditTrail,
    run: RunInfo,
    table: TableSpec,
    windows: list[PartitionWindow],
    params: BackfillParams,
    hooks: RunHooks,
) -> RunResult:
    """Write ``windows`` of ``table`` as one run (see the module's docstring); raises
    ``RunRefused`` before anything is written when the run cannot start."""
    strategy = prepare(conn, table)
    abandoned = close_abandoned(conn)
    if abandoned:
        hooks.warn(f"closed audit rows left running by a killed process: {abandoned}")
    guarded = run_guards(conn, table, windows, params)
    outcomes: list[PartitionOutcome] = []
    for window in windows:
        guard = guarded[window.key][0]
        if not guard.passed:
            record_refusal(audit, run, table, window, guard)
            outcomes.append(PartitionOutcome(window, "guard_failed", guard))
        elif "override" in guard.metadata:
            hooks.warn(f"guard override: {guard.metadata['override']}")

    progress = Progress(hooks.info, table.qualified_name, len(windows))
    throttle = Throttle(conn, table, hooks.warn)
    paused = [0.0]

    def hold_back() -> None:
        """The pause switch and the throttle: before each partition, and before each batch of a
        strategy that writes a partition in several transactions."""
        hooks.checkpoint()
        throttle.before_partition()
        # Read last: a pause given during the throttle's wait holds this write.
        waited = wait_while_paused(conn, run.backfill_id, hooks.warn, checkpoint=hooks.checkpoint)
        throttle.not_busy(waited)
        paused[0] += waited

    write_hooks = WriteHooks(hooks.info, hooks.warn, hold_back)
    stopped = None
    pending = deque(w for w in windows if guarded[w.key][0].passed)
    retried: set[str] = set()
    while pending:
        window = pending.popleft()
        if conn.broken or conn.closed:
            stopped = "the database connection was lost"  # the rest would fail alike
            break
        try:
            hold_back()
        except ThrottleTimeout as exc:
            stopped = str(exc)
            break
        held_before = paused[0] + throttle.paused_s
        outcome = strategy.write(
            conn, audit, run, table, window, params, guarded[window.key], write_hooks
        )
        held = paused[0] + throttle.paused_s - held_before
        if held:  # pauses and back-off between the batches of one partition's write
            outcome = dataclasses.replace(outcome, held_back_s=held)
        if retry_later(outcome, pending, retried):
            hooks.info(
                f"{table.qualified_name} {window.key}: keys of its new rows are still held by "
                f"{', '.join(outcome.held_by)}, which this run writes later: retried after them"
            )
            continue
        outcomes.append(outcome)
        if outcome.succeeded:
            progress.wrote(window.key, outcome.write.rows_written)
        else:
            hooks.error(f"{table.qualified_name} {window.key}: {outcome.error}")
        if outcome.halt:
            stopped = outcome.error
            break
    if paused[0] or throttle.paused_s:
        budget = (
            f" ({throttle.budget_s:.0f}s of it keeping writes within max_busy "
            f"{table.throttle.max_busy:.0%} of the time)"
            if throttle.budget_s
            else ""
        )
        hooks.info(
            f"{table.qualified_name}: held back {throttle.paused_s:.0f}s by the throttle"
            f"{budget} and {paused[0]:.0f}s by a pause"
        )
    return RunResult(windows, outcomes, stopped)


def retry_later(outcome: PartitionOutcome, pending: deque, retried: set[str]) -> bool:
    """A window refused because partitions still to be written in this run hold keys of its
    new rows (a key the source moved to an earlier day): queue it again, once, after them."""
    key = outcome.window.key
    if outcome.succeeded or not outcome.held_by or key in retried:
        return False
    if not set(outcome.held_by) <= {w.key for w in pending}:
        return False
    retried.add(key)
    pending.append(outcome.window)
    return True


def prepare(conn: psycopg.Connection, table: TableSpec) -> Strategy:
    """Refuse a run that cannot write (``RunRefused``), then create the target and where its
    snapshots go, as the table's strategy has them (no DDL when they exist); returns the
    strategy."""
    strategy = strategy_of(table)
    try:
        require_data_grants(
            conn, table.upstream, settings.DATA_URL_ENV, strategy.updated_tables(table)
        )
        check_contract(conn, table)
        check_target(conn, table)
    except (PrivilegeError, ContractError, SourceNotReady) as exc:
        raise RunRefused(f"{exc}. Nothing was written.") from None
    strategy.ensure_target(conn, table)
    strategy.ensure_snapshots(conn, table)
    return strategy


def expire_snapshots(conn: psycopg.Connection, table: TableSpec, hooks: RunHooks) -> int:
    """After a complete run has been reported: drop what the table's writes kept longer ago than
    its retention. Called last so that a failure here never hides the run's outcomes."""
    expired = snapshots.expire(conn, table)
    if expired:
        hooks.info(
            f"expired {expired} snapshot rows older than {table.snapshot_retention_days} days"
        )
    return expired

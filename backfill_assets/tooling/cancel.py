"""Canceling a backfill: its queued runs at once, its running ones by their worker, whatever kind.

The UI's "Cancel backfill" only marks the backfill CANCELING and leaves the runs to the daemon,
which acts on it only for a backfill that is not terminal. ``dagster job backfill`` marks its
backfill COMPLETED as soon as it has queued the runs, so the daemon never cancels them: they stay
queued and write once a daemon dequeues them. Here the runs are canceled as Dagster's own backfill
cancel does it (``cancel_backfill_runs_and_cancellation_complete``): queued ones from the queue
first, so the daemon cannot start them meanwhile, then running ones through the run coordinator
(the launcher asks the worker to stop; a partition mid-write rolls back). A run still STARTING is
waited for until it runs: stopped before its worker is up, it ends FAILED and is retried.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from dagster import DagsterInstance, DagsterRun, DagsterRunStatus

from backfill_assets.defs.dagster_internals import (
    BULK_ACTION_TERMINAL_STATUSES,
    BulkActionStatus,
    get_current_timestamp,
)
from backfill_assets.tooling.report import (
    FINISHED,
    backfill_runs,
    existing_backfill,
    has_ended,
)

# Queued first: a run still waiting cannot be dequeued while the running ones are stopped.
CANCEL_ORDER = (
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
)
DEQUEUED, STOPPING, STARTING = "dequeued", "stopping", "starting"
NOT_SUBMITTED = "Canceled before it was queued: its backfill was canceled (backfill-assets cancel)."


class NothingToCancelError(RuntimeError):
    """The backfill has ended: Dagster closed it and none of its runs is in flight."""


@dataclass(frozen=True)
class Cancellation:
    backfill_id: str
    status: str
    """The backfill's status once the cancel was recorded."""
    dequeued: int
    """Runs canceled before they started."""
    stopping: int
    """Running runs asked to stop."""
    starting: int = 0
    """Runs still being started when the cancel gave up waiting for them to run."""

    def lines(self) -> list[str]:
        what = f"backfill {self.backfill_id}: canceled {self.dequeued} queued run(s)"
        if self.stopping:
            what += f", stopping {self.stopping} running (a partition mid-write rolls back)"
        if self.starting:
            what += f"; {self.starting} still starting: cancel again once they run"
        if self.status == BulkActionStatus.CANCELING.value:
            what += "; CANCELING: the daemon stops what it launches meanwhile, then closes it"
        else:
            what += f"; marked {self.status}"
        return [what, f"  follow it: backfill-assets status {self.backfill_id} --wait"]


def cancel_backfill(
    instance: DagsterInstance,
    backfill_id: str,
    *,
    request: Callable[[str], None] | None = None,
) -> Cancellation:
    """Cancel every run of the backfill that has not ended, and mark the backfill canceled.

    A backfill Dagster has not closed is marked CANCELING first (by ``request``, e.g. the
    webserver's mutation, when given), so the daemon launches no more of its runs and closes it as
    CANCELED once they all ended. One Dagster already closed (a job backfill is COMPLETED once its
    runs are queued) is marked CANCELED: some of its runs will not run. Refused only when the
    backfill has ended (``report.has_ended``).
    """
    backfill = existing_backfill(instance, backfill_id)
    status = backfill.status.value
    runs = backfill_runs(instance, backfill)
    if has_ended(status, [run.status for run in runs]):
        raise NothingToCancelError(
            f"backfill {backfill_id} already ended ({status}) and none of its runs is queued or "
            f"running; nothing to cancel (what it did not write: backfill-assets status "
            f"{backfill_id})"
        )
    if backfill.status not in BULK_ACTION_TERMINAL_STATUSES:
        if request is None:
            instance.update_backfill(backfill.with_status(BulkActionStatus.CANCELING))
        else:
            request(backfill_id)
        backfill = existing_backfill(instance, backfill_id)
    outcomes = _cancel_runs(instance, [run for run in runs if run.status in CANCEL_ORDER])
    if backfill.status == BulkActionStatus.COMPLETED:
        backfill = backfill.with_status(BulkActionStatus.CANCELED).with_end_timestamp(
            get_current_timestamp()
        )
        instance.update_backfill(backfill)
    return Cancellation(
        backfill_id,
        backfill.status.value,
        dequeued=outcomes.count(DEQUEUED),
        stopping=outcomes.count(STOPPING),
        starting=outcomes.count(STARTING),
    )


def _cancel_runs(
    instance: DagsterInstance, runs: list[DagsterRun], *, start_timeout_s: float = 60
) -> list[str]:
    """Each run's outcome: queued ones first, so the daemon cannot start them while the running
    ones are stopped; a run being started is waited for until it runs (or ``start_timeout_s``)."""
    runs = sorted(runs, key=lambda run: CANCEL_ORDER.index(run.status))
    outcomes = {run.run_id: _cancel_run(instance, run.run_id) for run in runs}
    deadline = time.monotonic() + start_timeout_s
    while STARTING in outcomes.values() and time.monotonic() < deadline:
        time.sleep(0.5)
        for run_id, outcome in outcomes.items():
            if outcome == STARTING:
                outcomes[run_id] = _cancel_run(instance, run_id)
    return list(outcomes.values())


def _cancel_run(instance: DagsterInstance, run_id: str) -> str | None:
    """Cancel one run as its status allows, read just now (the daemon may have dequeued it)."""
    run = instance.get_run_by_id(run_id)
    if run is None or run.status in FINISHED or run.status == DagsterRunStatus.CANCELING:
        return None
    if run.status == DagsterRunStatus.NOT_STARTED:
        # Created but never submitted (its launcher stopped midway): the launcher has no worker
        # to stop, so it is canceled outright.
        instance.report_run_canceled(run, message=NOT_SUBMITTED)
        return DEQUEUED
    if run.status == DagsterRunStatus.STARTING:
        # Not yet: a termination sent before the worker is up makes the worker exit at once, and
        # the run is then FAILED (and retried), not canceled. Dagster's own backfill cancel skips
        # such runs too.
        return STARTING
    # The run coordinator's cancel, as the UI's "Terminate": a queued run is canceled from the
    # queue, a started one is terminated by the launcher (a partition mid-write rolls back).
    instance.run_coordinator.cancel_run(run_id)
    return DEQUEUED if run.status == DagsterRunStatus.QUEUED else STOPPING

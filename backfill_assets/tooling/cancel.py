"""Canceling a backfill: its queued runs at once, its running ones by their worker, whatever kind.

The UI's "Cancel backfill" only marks the backfill CANCELING and leaves the runs to the daemon,
which acts on it only for a backfill that is not terminal. ``dagster job backfill`` marks its
backfill COMPLETED as soon as it has queued the runs, so the daemon never cancels them: they stay
queued and write once a daemon dequeues them. Here the runs are canceled as Dagster's own backfill
cancel does it (``cancel_backfill_runs_and_cancellation_complete``): queued ones from the queue
first, so the daemon cannot start them meanwhile, then running ones through the run coordinator
(the launcher asks the worker to stop; a partition mid-write rolls back).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dagster import DagsterInstance, DagsterRunStatus

from backfill_assets.defs.dagster_internals import (
    BULK_ACTION_TERMINAL_STATUSES,
    BulkActionStatus,
    get_current_timestamp,
)
from backfill_assets.tooling.report import (
    backfill_runs,
    existing_backfill,
    has_ended,
    run_status,
)

# Queued before started: a run still waiting cannot be dequeued while the running ones are stopped.
CANCEL_ORDER = (
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
)
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

    def lines(self) -> list[str]:
        what = f"backfill {self.backfill_id}: canceled {self.dequeued} queued run(s)"
        if self.stopping:
            what += f", stopping {self.stopping} running (a partition mid-write rolls back)"
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
    runs = backfill_runs(instance, backfill_id)
    if has_ended(status, [run_status(run, status) for run in runs]):
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
    dequeued = stopping = 0
    for run in sorted(
        (run for run in runs if run.status in CANCEL_ORDER),
        key=lambda run: CANCEL_ORDER.index(run.status),
    ):
        if run.status == DagsterRunStatus.NOT_STARTED:
            # Created but never submitted (its launcher stopped midway): the coordinator would
            # hand it to the launcher, which has no worker to stop.
            instance.report_run_canceled(run, message=NOT_SUBMITTED)
            dequeued += 1
        elif _cancel_run(instance, run.run_id):
            dequeued += run.status == DagsterRunStatus.QUEUED
            stopping += run.status != DagsterRunStatus.QUEUED
    if backfill.status == BulkActionStatus.COMPLETED:
        backfill = backfill.with_status(BulkActionStatus.CANCELED).with_end_timestamp(
            get_current_timestamp()
        )
        instance.update_backfill(backfill)
    return Cancellation(backfill_id, backfill.status.value, dequeued, stopping)


def _cancel_run(instance: DagsterInstance, run_id: str) -> bool:
    """The run coordinator's cancel, as the UI's "Terminate": a queued run is canceled from the
    queue, a started one is terminated by the launcher. The run is read again there, so one the
    daemon dequeued meanwhile is terminated instead."""
    return instance.run_coordinator.cancel_run(run_id)

"""What a backfill has done so far, partition by partition, read from Dagster's own storage.

The backfill daemon updates an asset backfill's own bookkeeping once per tick (every 30 s in
Dagster 1.13), so a report built from it lags. This one reads the backfill's runs and their events
directly: a partition is *materialized* when a run of the backfill recorded its materialization,
*failed* when the run meant to write it ended without doing so, *in flight* while that run is
queued or running, *pending* while no run covers it yet. It also carries each partition's check
results, rows written, rows per second and an ETA, and ``finished`` turns true as soon as every
partition is accounted for, not at the daemon's next tick.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from dagster import (
    AssetCheckSeverity,
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    RunsFilter,
)

from backfill_assets.defs.dagster_internals import (
    BACKFILL_ID_TAG,
    BULK_ACTION_TERMINAL_STATUSES,
    get_current_timestamp,
)

FINISHED = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}
RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"
PARTITION = "dagster/partition"
ANY_ASSET = "*"
"""Asset of a job backfill's partitions: the job names no assets up front."""


TERMINAL = frozenset(s.value for s in BULK_ACTION_TERMINAL_STATUSES)


class UnknownBackfillError(RuntimeError):
    pass


def _seen_status(run: DagsterRun, backfill_status: str) -> DagsterRunStatus:
    """The run's status as its backfill sees it: a failed run that Dagster's run retries will
    launch again counts as queued (its partitions are not failed yet; the backfill daemon waits
    for the retry too). Run retries skip the runs of a backfill whose status is terminal, so
    then a failed run is just failed."""
    if run.is_complete_and_waiting_to_retry and backfill_status not in TERMINAL:
        return DagsterRunStatus.QUEUED
    return run.status


def has_ended(backfill_status: str, run_statuses: Iterable[DagsterRunStatus]) -> bool:
    """The one definition of a backfill's end, shared by ``status``, ``cancel`` and ``retry``:
    Dagster closed it (a terminal status) and none of its runs is in flight. Dagster's status
    alone is not enough: ``dagster job backfill`` marks its backfill COMPLETED as soon as it has
    queued the runs, before any of them ran."""
    return backfill_status in TERMINAL and all(s in FINISHED for s in run_statuses)


def backfill_runs(instance: DagsterInstance, backfill) -> list[DagsterRun]:
    """The backfill's runs, each with its status as the backfill sees it (``_seen_status``)."""
    runs = instance.get_runs(filters=RunsFilter(tags={BACKFILL_ID_TAG: backfill.backfill_id}))
    return [run.with_status(_seen_status(run, backfill.status.value)) for run in runs]


def existing_backfill(instance: DagsterInstance, backfill_id: str):
    """The backfill, or an error that says where its id comes from."""
    backfill = instance.get_backfill(backfill_id)
    if backfill is None:
        raise UnknownBackfillError(
            f"no backfill {backfill_id!r} in this Dagster instance; its id is printed at launch "
            "and listed under Runs > Backfills"
        )
    return backfill


@dataclass
class PartitionState:
    asset: str
    partition: str
    status: str = "pending"
    """pending | in_flight | materialized | failed"""
    rows: int = 0
    checks: dict[str, str] = field(default_factory=dict)
    """check name -> passed | warned | failed"""
    reasons: dict[str, str] = field(default_factory=dict)
    """check name -> the message of a check that did not pass (a guard's refusal, say)"""
    run_id: str | None = None


@dataclass
class RunEvents:
    """What one run recorded; cached once the run ended, since it cannot change any more."""

    status: DagsterRunStatus
    assets: frozenset[str]
    """The assets the run was launched for (empty: its job's, for job backfills)."""
    partitions: tuple[str, ...]
    materialized: dict[tuple[str, str], int]
    """(asset, partition) -> rows inserted"""
    checks: dict[tuple[str, str], dict[str, str]]
    reasons: dict[tuple[str, str], dict[str, str]]
    failure: str | None = None
    """Why the run failed, when it failed before any check could say (its first step failure,
    else the run's own failure: a contract error, definitions that no longer hold an asset)."""


@dataclass
class BackfillReport:
    backfill_id: str
    daemon_status: str
    created: float
    partitions: dict[tuple[str, str], PartitionState]
    runs: dict[str, DagsterRunStatus]
    failures: dict[str, str] = field(default_factory=dict)
    """run id -> why it failed, for failed runs whose checks do not say it"""
    error: str | None = None
    """Why the backfill itself failed (definitions the daemon no longer loads, say) or was
    stopped (a job backfill refused by the run coordinator)."""
    now: float = field(default_factory=get_current_timestamp)

    def count(self, status: str) -> int:
        return sum(p.status == status for p in self.partitions.values())

    @property
    def total(self) -> int:
        return len(self.partitions)

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.partitions.values())

    @property
    def elapsed_s(self) -> float:
        return max(self.now - self.created, 0.0)

    @property
    def ended(self) -> bool:
        """Closed by Dagster and nothing in flight (``has_ended``): what ``cancel`` and
        ``retry`` go by."""
        return has_ended(self.daemon_status, self.runs.values())

    @property
    def finished(self) -> bool:
        """Ended, or every run ended and every partition is materialized or failed while the
        daemon has yet to record it (at its next tick)."""
        if self.daemon_status in TERMINAL:
            return self.ended
        if self.daemon_status == "CANCELING":
            return False  # the daemon is still stopping runs; it says when it is done
        runs_ended = all(status in FINISHED for status in self.runs.values())
        accounted = self.count("materialized") + self.count("failed") == self.total
        return bool(self.runs) and runs_ended and accounted

    def state_line(self) -> str:
        """Finished or running, with Dagster's own status of the backfill: the daemon records
        the end at its next pass (a second later under ``backfill-assets daemon``, up to 30 s
        under Dagster's ``dagster-daemon``)."""
        if not self.finished:
            stopping = self.daemon_status in {"CANCELING", "CANCELED"}
            return f"{'canceling' if stopping else 'running'} (Dagster: {self.daemon_status})"
        if self.ended:
            return f"finished (Dagster: {self.daemon_status})"
        return f"finished (Dagster still says {self.daemon_status} until its daemon's next pass)"

    @property
    def failed_runs(self) -> int:
        """Runs that ended other than successfully."""
        return sum(s in FINISHED and s != DagsterRunStatus.SUCCESS for s in self.runs.values())

    @property
    def succeeded(self) -> bool:
        return self.finished and self.count("materialized") == self.total

    @property
    def failed_checks(self) -> dict[str, dict[str, str]]:
        """``asset partition`` -> each check that did not pass -> its verdict, with its message
        when it left one (``failed: guard refused to replace …``)."""
        return {
            f"{p.asset} {p.partition}": {
                n: f"{r}: {p.reasons[n]}" if n in p.reasons else r
                for n, r in p.checks.items()
                if r != "passed"
            }
            for p in self.partitions.values()
            if any(r != "passed" for r in p.checks.values())
        }

    def eta_s(self) -> float | None:
        done = self.count("materialized") + self.count("failed")
        if not done or done == self.total:
            return None
        return self.elapsed_s / done * (self.total - done)

    def line(self, width: int = 24) -> str:
        done, failed = self.count("materialized"), self.count("failed")
        filled = round(width * (done + failed) / self.total) if self.total else width
        bar = "#" * filled + "-" * (width - filled)
        rate = self.rows / self.elapsed_s if self.elapsed_s else 0.0
        eta = self.eta_s()
        return (
            f"[{bar}] {done}/{self.total} partitions materialized, {failed} failed, "
            f"{self.count('in_flight')} in flight; {self.rows:,} rows, {rate:,.0f} rows/s; "
            f"{len(self.runs)} runs; {self.elapsed_s:.0f}s"
            + (f", ETA {eta:.0f}s" if eta is not None else "")
        )

    def as_json(self) -> dict[str, object]:
        return {
            "backfill_id": self.backfill_id,
            "daemon_status": self.daemon_status,
            "finished": self.finished,
            "ended": self.ended,
            "succeeded": self.succeeded,
            "elapsed_s": round(self.elapsed_s, 1),
            "eta_s": None if self.eta_s() is None else round(self.eta_s(), 1),
            "rows": self.rows,
            "counts": {
                s: self.count(s) for s in ("materialized", "failed", "in_flight", "pending")
            },
            "runs": {run_id: status.value for run_id, status in self.runs.items()},
            "partitions": [
                {
                    "asset": p.asset,
                    "partition": p.partition,
                    "status": p.status,
                    "rows": p.rows,
                    "checks": p.checks,
                    "run_id": p.run_id,
                }
                for p in sorted(self.partitions.values(), key=lambda p: (p.asset, p.partition))
            ],
        }


class BackfillWatcher:
    """Builds reports of one backfill, reading each ended run's events only once."""

    def __init__(
        self, instance: DagsterInstance, backfill_id: str, *, live_detail: bool = True
    ) -> None:
        """``live_detail``: read the events of runs still in flight at every report (the
        partitions each has written so far), which a person watching wants; a follower that
        only waits for the end reads each run's events once, when it has ended."""
        self.instance = instance
        self.backfill_id = backfill_id
        self.live_detail = live_detail
        self._ended: dict[str, RunEvents] = {}

    def report(self) -> BackfillReport:
        backfill = existing_backfill(self.instance, self.backfill_id)
        partitions = {key: PartitionState(*key) for key in _targets(backfill)}
        runs = backfill_runs(self.instance, backfill)
        statuses, failures = {}, {}
        for run in sorted(runs, key=lambda r: r.run_id):
            statuses[run.run_id] = run.status
            events = self._ended.get(run.run_id) or self._read(
                run, events=self.live_detail or run.status in FINISHED
            )
            if run.status in FINISHED:
                self._ended[run.run_id] = events
            if run.status == DagsterRunStatus.FAILURE and events.failure:
                failures[run.run_id] = events.failure
            _apply(partitions, run.run_id, events)
        return BackfillReport(
            backfill_id=self.backfill_id,
            daemon_status=backfill.status.value,
            created=backfill.backfill_timestamp,
            partitions=partitions,
            runs=statuses,
            failures=failures,
            error=_error_text(backfill.error) if backfill.error else None,
        )

    def _read(self, run, *, events: bool = True) -> RunEvents:
        materialized: dict[tuple[str, str], int] = {}
        checks: dict[tuple[str, str], dict[str, str]] = {}
        reasons: dict[tuple[str, str], dict[str, str]] = {}
        records = (
            self.instance.get_records_for_run(
                run.run_id,
                of_type={
                    DagsterEventType.ASSET_MATERIALIZATION,
                    DagsterEventType.ASSET_CHECK_EVALUATION,
                    DagsterEventType.STEP_FAILURE,
                    DagsterEventType.RUN_FAILURE,
                },
            ).records
            if events
            else []
        )
        failures = []
        for record in records:
            event = record.event_log_entry.dagster_event
            if event.event_type in (DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE):
                failures.append(_failure_text(event))
            elif event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
                materialization = event.step_materialization_data.materialization
                # Rows a partition's write produced: inserted, or updated in place.
                inserted = materialization.metadata.get(
                    "rows_inserted", materialization.metadata.get("rows_updated")
                )
                key = (materialization.asset_key.to_user_string(), materialization.partition)
                materialized[key] = int(inserted.value) if inserted is not None else 0
            else:
                evaluation = event.asset_check_evaluation_data
                if evaluation.partition is None:
                    continue
                key = (evaluation.asset_key.to_user_string(), evaluation.partition)
                checks.setdefault(key, {})[evaluation.check_name] = _verdict(evaluation)
                message = evaluation.metadata.get("message")
                if not evaluation.passed and message is not None and message.value:
                    reasons.setdefault(key, {})[evaluation.check_name] = str(message.value)
        assets = frozenset(key.to_user_string() for key in run.asset_selection or ())
        partitions = _run_partitions(run.tags)
        failure = None if reasons else next(iter(failures), None)
        return RunEvents(run.status, assets, partitions, materialized, checks, reasons, failure)


def _failure_text(event) -> str:
    """A step's or run's failure as a person reads it: a deliberate failure's description, else
    the error's message, without the stack."""
    data = event.event_specific_data
    user = getattr(data, "user_failure_data", None)
    if user is not None and user.description:
        return user.description
    error = getattr(data, "error", None)
    if error is not None:
        return _error_text(error)
    return event.message or event.event_type_value


def _error_text(error) -> str:
    """The message of the error that caused it all, without Dagster's wrappers or the stack."""
    while error.cause is not None and error.cls_name.startswith("Dagster"):
        error = error.cause
    return error.message.strip()


def _verdict(evaluation) -> str:
    if evaluation.passed:
        return "passed"
    return "warned" if evaluation.severity == AssetCheckSeverity.WARN else "failed"


def _targets(backfill) -> list[tuple[str, str]]:
    if backfill.is_asset_backfill:
        subset = backfill.asset_backfill_data.target_subset
        return [
            (key.asset_key.to_user_string(), key.partition_key)
            for key in subset.iterate_asset_partitions()
            if key.partition_key is not None
        ]
    return [(ANY_ASSET, name) for name in backfill.partition_names or []]


def _run_partitions(tags) -> tuple[str, ...] | tuple[str, str]:
    """The partition key, or the inclusive (first, last) range, a run was launched for."""
    if RANGE_START in tags:
        return (tags[RANGE_START], tags[RANGE_END])
    if PARTITION in tags:
        return (tags[PARTITION], tags[PARTITION])
    return ()


def _apply(partitions: dict[tuple[str, str], PartitionState], run_id: str, events: RunEvents):
    for (asset, partition), rows in events.materialized.items():
        state = partitions.get((asset, partition)) or partitions.get((ANY_ASSET, partition))
        if state is not None:
            state.status, state.rows, state.run_id = "materialized", state.rows + rows, run_id
    for (asset, partition), checks in events.checks.items():
        state = partitions.get((asset, partition)) or partitions.get((ANY_ASSET, partition))
        if state is not None:
            state.checks.update(checks)
            for name in checks:  # a later run's verdict replaces an earlier one's reason
                state.reasons.pop(name, None)
            state.reasons.update(events.reasons.get((asset, partition), {}))
    if not events.partitions:
        return
    first, last = events.partitions
    # Partition keys here are ISO dates: their order as strings is their order in time.
    for state in partitions.values():
        if state.status == "materialized" or not first <= state.partition <= last:
            continue
        if events.assets and state.asset not in events.assets and state.asset != ANY_ASSET:
            continue
        if events.status in FINISHED:
            state.status, state.run_id = "failed", run_id
        elif state.status == "pending":
            state.status, state.run_id = "in_flight", run_id


MAX_POLL_S = 1.0
"""The longest ``watch`` waits between two reports."""


def watch(
    watcher: BackfillWatcher,
    *,
    timeout_s: float,
    on_change=None,
    poll_s: float = 0.25,
    until_ended: bool = False,
) -> BackfillReport:
    """Poll until the backfill is finished (``BackfillReport.finished``: what a person waits
    for), or ``until_ended``, until Dagster has closed it too (``ended``: what a command that
    acts on the backfill next, or a test, waits for). The one follower of a backfill.

    Polls every ``poll_s`` or ten times as long as the last report took, whichever is longer,
    but at least once a second: a short backfill's end is seen within a fraction of a second (a
    report costs ~6 ms here), a large one's reports take about a tenth of a core (~25 ms each at
    2,001 partitions), and one report that read a lot (the first reads the whole history, 3 s
    there; later ones what arrived since) does not delay the next by ten times as long."""
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        started = time.monotonic()
        report = watcher.report()
        spent = time.monotonic() - started
        shown = (report.count("materialized"), report.count("failed"), report.count("in_flight"))
        if on_change and shown != last:
            on_change(report)
            last = shown
        if report.ended if until_ended else report.finished:
            return report
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{report.line()} after {timeout_s:.0f}s; is `backfill-assets daemon` running? "
                "The demo's daemon log is logs/daemon.log"
            )
        pause = max(poll_s, min(10 * spent, MAX_POLL_S))
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))

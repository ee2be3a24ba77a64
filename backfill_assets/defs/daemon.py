"""The project's Dagster daemon: Dagster's own daemons, with a backfill pass every second.

Dagster 1.13's backfill daemon sleeps a fixed 30 s between passes
(``DEFAULT_DAEMON_INTERVAL_SECONDS``, read inside ``execute_backfill_iteration_loop``; no instance
setting changes it). A pass is what submits an asset backfill's next runs and closes a backfill
whose runs ended, so every backfill waited up to 30 s for its first run and again after each run:
29 s of a 48 s ``launch --wait`` of 90 days. Here the backfill daemon is Dagster's
``BackfillDaemon`` (same thread pools, same pass, ``execute_backfill_iteration``), only its loop
waits ``interval_s`` (``BACKFILL_DAEMON_INTERVAL_S``, 1 s by default) instead, and the run-retry
daemon waits for a failed run's status before it retries it (``SettledRetryDaemon``).

Both the backfill loop and the run queue's are also woken rather than left to their intervals:
the run queue right after each backfill pass (the runs it submitted start at once, not up to a
``dequeue_interval_seconds`` later), and both when a forked run's process ends (the launcher's
``when_runs_end``: its slot is free, and the backfill's next runs or its end are seen at once,
not at the next pass). Measured: ~1 s less per run of a backfill (docs/measurements.md). Every
other daemon (monitoring, sensors, schedules) is created exactly as ``dagster-daemon run``
creates it, from the instance's dagster.yaml.

A user who runs Dagster's own ``dagster-daemon run`` gets the same results, each backfill pass 30 s
apart. Everything private this needs comes from ``dagster_internals`` and is pinned by
``tests/test_daemon.py``, which fails when a Dagster upgrade moves it.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from threading import Event
from typing import Any

from dagster import DagsterInstance, RunsFilter

from backfill_assets.defs.dagster_internals import (
    BackfillDaemon,
    DaemonErrorCapture,
    EventLogConsumerDaemon,
    QueuedRunCoordinatorDaemon,
    SpanMarker,
    WorkspaceFileTarget,
    capture_interrupts,
    code_location_asset_keys,
    consume_new_runs_for_automatic_reexecution,
    create_daemon_of_type,
    daemon_controller_from_instance,
    execute_backfill_iteration,
    get_current_timestamp,
    setup_interrupt_handlers,
)
from backfill_assets.defs.run_launcher import MonitoredRunLauncher, fork_context, start_fork_server


class PromptBackfillDaemon(BackfillDaemon):
    """Dagster's backfill daemon whose passes are ``interval_s`` apart instead of 30 s, sooner
    when ``woken``, and which sets ``passed`` once a pass's work is done.

    The loop is ``dagster._daemon.backfill.execute_backfill_iteration_loop`` with the interval as a
    parameter and ``rest`` for its wait: the same pass, the same error capture and spans; shutdown
    is seen within half a second.
    """

    def __init__(
        self,
        settings: Mapping[str, Any],
        interval_s: float,
        *,
        woken: Event | None = None,
        passed: Event | None = None,
    ) -> None:
        super().__init__(settings)
        self.interval_s = interval_s
        self.woken = woken or Event()
        """Set (a run ended): the next pass starts now rather than at the interval."""
        self.passed = passed or Event()
        """Set after every pass and every backfill's evaluation in it: the run queue starts the
        runs it submitted."""

    def core_loop(self, workspace_process_context, shutdown_event: Event) -> Iterator:
        backfill_futures: dict[str, Future] = {}
        hooked: set[int] = set()  # ids of the futures that set ``passed`` when done
        published: set[str] | None = None
        while True:
            started = get_current_timestamp()
            try:  # for `status`; never in the way of the pass itself
                published = publish_assets(workspace_process_context, published)
            except Exception:
                self._logger.warning("could not store the loaded asset keys", exc_info=True)
            yield from one_pass(
                lambda: execute_backfill_iteration(
                    workspace_process_context,
                    self._logger,
                    threadpool_executor=self._threadpool_executor,
                    backfill_futures=backfill_futures,
                    submit_threadpool_executor=self._submit_threadpool_executor,
                ),
                self._logger,
                "BackfillDaemon",
            )
            # A pass hands each backfill's evaluation to a thread (Dagster's default settings):
            # its runs are submitted when that future is done. Each future is hooked once (a
            # done one calls back at once), before ``passed`` is set for the pass itself.
            for future in backfill_futures.values():
                if id(future) not in hooked:
                    hooked.add(id(future))
                    future.add_done_callback(lambda _: self.passed.set())
            hooked &= {id(future) for future in backfill_futures.values()}
            self.passed.set()
            elapsed = get_current_timestamp() - started
            yield from rest(shutdown_event, self.woken, self.interval_s - elapsed)
            yield None


class PromptRunQueueDaemon(QueuedRunCoordinatorDaemon):
    """Dagster's run queue daemon, its loop woken by ``woken`` (a backfill pass ended, a run's
    process ended) as well as every ``interval_seconds``.

    The loop is ``IntervalDaemon.core_loop`` (the same pass, spans and error capture) with
    ``rest`` for its wait; the pass is Dagster's ``run_iteration``.
    """

    def __init__(self, interval_seconds: float, woken: Event) -> None:
        super().__init__(interval_seconds=interval_seconds)
        self.woken = woken

    def core_loop(self, workspace_process_context, shutdown_event: Event) -> Iterator:
        while True:
            started = get_current_timestamp()
            yield from one_pass(
                lambda: self.run_iteration(workspace_process_context),
                self._logger,
                "QueuedRunCoordinatorDaemon",
            )
            elapsed = get_current_timestamp() - started
            yield from rest(shutdown_event, self.woken, self.interval_seconds - elapsed)
            yield None


def one_pass(iteration: Callable[[], Iterator], logger, name: str) -> Iterator:
    """One pass of a daemon's loop as Dagster's loops run one: between its spans, an error
    captured and logged (the loop goes on) rather than raised."""
    yield SpanMarker.START_SPAN
    try:
        yield from iteration()
    except Exception:
        yield DaemonErrorCapture.process_exception(
            exc_info=sys.exc_info(), logger=logger, log_message=f"{name} caught an error"
        )
    yield SpanMarker.END_SPAN


def rest(shutdown_event: Event, woken: Event, seconds: float) -> Iterator[None]:
    """Wait up to ``seconds`` between a daemon's passes: less if ``woken`` is set (it is cleared
    here) or the daemon is shutting down. Yields every half second, as Dagster's
    ``IntervalDaemon`` does while it waits, so the controller sees the daemon alive."""
    deadline = time.monotonic() + seconds
    while not shutdown_event.is_set():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        if woken.wait(min(0.5, remaining)):
            woken.clear()
            return
        yield None


class SettledRetryDaemon(EventLogConsumerDaemon):
    """Dagster's run-retry daemon, reading a failed run's status once it is stored.

    Dagster stores a run's failure event, then its status: a pass between the two reads a run
    that is still STARTED, and since the project tags a run "will retry" before failing it (see
    ``MonitoredRunLauncher._announce_retry``), the retry was attempted, refused ("cannot
    reexecute from failure a run that is not failed") and never tried again: the backfill failed
    (seen in the tests under load). The runs of the pass's events are read again until their
    status has landed (``SETTLE_S`` at most); the retry itself is Dagster's.
    """

    SETTLE_S = 5.0

    @property
    def handle_updated_runs_fns(self) -> list:
        return [self._retry_settled_runs]

    def _retry_settled_runs(self, workspace_process_context, run_records, logger) -> Iterator:
        instance = workspace_process_context.instance
        deadline = get_current_timestamp() + self.SETTLE_S
        while True:
            unsettled = [r.dagster_run.run_id for r in run_records if not r.dagster_run.is_finished]
            if not unsettled or get_current_timestamp() > deadline:
                break
            yield None
            time.sleep(0.1)
            fresh = {
                r.dagster_run.run_id: r
                for r in instance.get_run_records(filters=RunsFilter(run_ids=unsettled))
            }
            run_records = [fresh.get(r.dagster_run.run_id, r) for r in run_records]
        yield from consume_new_runs_for_automatic_reexecution(
            workspace_process_context, run_records, logger
        )


DAEMON_ASSETS_KEY = "backfill_assets/daemon_assets"
"""Where the project's daemon keeps the asset keys of the code it runs (Dagster's key-value
store, in its run storage): ``status`` compares a backfill's assets with them."""


def publish_assets(workspace_process_context, published: set[str] | None) -> set[str]:
    """Store the asset keys of the code locations the daemon has loaded, when they changed."""
    keys = code_location_asset_keys(workspace_process_context)
    if keys is None:  # a code location is (re)loading: what it holds is not known yet
        return published
    if keys != published:
        value = {"assets": sorted(keys), "at": get_current_timestamp()}
        workspace_process_context.instance.run_storage.set_cursor_values(
            {DAEMON_ASSETS_KEY: json.dumps(value)}
        )
    return keys


def daemon_assets(instance: DagsterInstance) -> set[str] | None:
    """The asset keys the project's daemon last loaded (None: no project daemon published any,
    e.g. under Dagster's own ``dagster-daemon``)."""
    stored = instance.run_storage.get_cursor_values({DAEMON_ASSETS_KEY}).get(DAEMON_ASSETS_KEY)
    return set(json.loads(stored)["assets"]) if stored else None


def project_daemons(instance: DagsterInstance, interval_s: float) -> list:
    """The daemons ``dagster-daemon run`` would start for ``instance``: the backfill one prompt,
    it and the run queue woken by each other and by the end of a forked run."""
    backfill_now, dequeue_now = Event(), Event()
    launcher = instance.run_launcher
    if isinstance(launcher, MonitoredRunLauncher):
        launcher.when_runs_end(backfill_now.set)
        launcher.when_runs_end(dequeue_now.set)
    settings = instance.get_backfill_settings()
    return [
        PromptBackfillDaemon(settings, interval_s, woken=backfill_now, passed=dequeue_now)
        if daemon_type == BackfillDaemon.daemon_type()
        else PromptRunQueueDaemon(instance.run_coordinator.dequeue_interval_seconds, dequeue_now)
        if daemon_type == QueuedRunCoordinatorDaemon.daemon_type()
        else SettledRetryDaemon()
        if daemon_type == EventLogConsumerDaemon.daemon_type()
        else create_daemon_of_type(daemon_type, instance)
        for daemon_type in instance.get_required_daemon_types()
    ]


@contextmanager
def warm_fork_server(instance: DagsterInstance) -> Iterator[None]:
    """Start the run launcher's fork server beside the code server, so the first run does not
    wait for its imports (~2-3 s); a launcher that does not fork runs has none. Once a first
    process has been forked from it, it prints ``RUNS_FORK_WARM`` (the benchmark waits for it
    before it launches)."""
    launcher = instance.run_launcher
    if isinstance(launcher, MonitoredRunLauncher) and launcher.fork_runs:

        def warm() -> None:
            started = time.monotonic()
            start_fork_server()
            first = fork_context().Process(target=int, name="warm-up")
            first.start()
            first.join()
            print(f"{RUNS_FORK_WARM} ({time.monotonic() - started:.1f} s)", flush=True)

        threading.Thread(target=warm, name="fork-server", daemon=True).start()
    yield


RUNS_FORK_WARM = "run launcher ready: runs fork from a warm server"


def run_daemon(workspace_file: Path, interval_s: float, *, log_level: str = "info") -> None:
    """Run the daemons until interrupted (Ctrl-C, SIGTERM), as ``dagster-daemon run -w`` does."""
    setup_interrupt_handlers()
    try:
        with (
            capture_interrupts(),
            DagsterInstance.get() as instance,
            warm_fork_server(instance),
            daemon_controller_from_instance(
                instance,
                workspace_load_target=WorkspaceFileTarget(paths=[str(workspace_file)]),
                gen_daemons=lambda inst: project_daemons(inst, interval_s),
                log_level=log_level,
                code_server_log_level="warning",
            ) as controller,
        ):
            controller.check_daemon_loop()
    except KeyboardInterrupt:
        return

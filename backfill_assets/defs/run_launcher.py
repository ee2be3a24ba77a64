"""Dagster's default run launcher, with runs forked instead of spawned, plus the worker health
check that run monitoring needs.

**Forked runs.** ``DefaultRunLauncher`` asks the code server to start a run, and the code server
spawns a new interpreter that imports Dagster, dagster-dbt and dbt before it writes a row (~2-3 s
of CPU a run). This launcher forks the run's process instead, from a ``multiprocessing`` fork
server that imported those libraries once (``run_worker.py``; the project's own code is still
imported by each run, as on disk when it starts). It watches its children as the code server
does: a run whose process exits without reporting the run's end is failed at once (and retried by
``run_retries``), and ``terminate`` interrupts the process as the code server would. Set
``fork_runs: false`` under ``run_launcher.config`` for Dagster's own behaviour; a run whose code
location uses another Python interpreter is always started by its code server.

``DefaultRunLauncher`` starts each run in a process forked by the code server and cannot tell
whether that process is still alive, so Dagster's run monitoring cannot be switched on with it.
When the code server stays up it notices a dead run worker itself; when the daemon, the code server
and their workers die together (a killed process group, a reboot, an out-of-memory kill), their
runs stayed ``STARTED`` forever and kept the queue's slots. This launcher answers the monitoring
daemon's question from what Dagster already records: every run worker stores an engine event
"Started process for run (pid: N)". A run whose worker is gone (no such process, a zombie, or a
process started after the event: the pid was reused) is reported ``FAILED``; monitoring then fails
the run, and ``run_retries`` in dagster.yaml retries it (selected there, with the intervals).

Monitoring asks the instance's launcher about *every* started run, also those it never launched:
a ``dagster asset materialize`` from the command line runs in the CLI's own process and records
no "Started process" event. Such runs record their worker when their resources start (the tag
``.backfill_assets/worker``: host, pid, time; ``record_worker``), and in-process execution logs
"Executing steps in process (pid: N)"; either serves. Without them a SIGKILLed CLI run stayed
``STARTED`` for good, and two of them filled ``max_concurrent_runs``.

A worker on another host cannot be seen from here: its runs are reported ``RUNNING``, as without
monitoring.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dagster import (
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    DefaultRunLauncher,
    Field,
)

from backfill_assets.defs.dagster_internals import (
    GRPC_INFO_TAG,
    WILL_RETRY_TAG,
    CheckRunHealthResult,
    ConfigurableClassData,
    LaunchRunContext,
    WorkerStatus,
    auto_reexecution_should_retry_run,
    get_run_crash_explanation,
)

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
STARTED_PROCESS = "Started process for run"
IN_PROCESS = "Executing steps in process"
WORKER_TAG = ".backfill_assets/worker"
"""Hidden (a leading dot, as Dagster's ``.dagster/grpc_info``), and no ``backfill_assets/``
parameter: a retry inherits its parent's tags, and a run refuses parameters it does not know."""
# A worker's start time is read in clock ticks (10 ms); the event is stored just after it starts.
START_SLACK_S = 2.0


RUN_WORKER_MODULE = "backfill_assets.defs.run_worker"
_fork_server_lock = threading.Lock()


def fork_context() -> multiprocessing.context.ForkServerContext:
    """This process's fork server, which has imported ``run_worker`` (started on first use)."""
    context = multiprocessing.get_context("forkserver")
    with _fork_server_lock:
        context.set_forkserver_preload([RUN_WORKER_MODULE])
    return context


def _execute_forked(run_id: str, instance_ref) -> None:
    """A forked run's entry point: ``run_worker.execute_run``, imported in the run's process,
    where the fork server has imported it already. Named here, not there, so that the launching
    process (the daemon) does not import dbt to pickle it: that cost its first run ~1.3 s."""
    from backfill_assets.defs.run_worker import execute_run

    execute_run(run_id, instance_ref)


def start_fork_server() -> None:
    """Start this process's fork server now rather than at the first run."""
    fork_context()
    multiprocessing.forkserver.ensure_running()


class MonitoredRunLauncher(DefaultRunLauncher):
    """``DefaultRunLauncher`` whose runs are forked and whose run workers can be health-checked;
    see the module docstring."""

    def __init__(self, inst_data: ConfigurableClassData | None = None, fork_runs: bool = True):
        super().__init__(inst_data=inst_data)
        self.fork_runs = fork_runs
        self._when_runs_end: list[Callable[[], None]] = []

    def when_runs_end(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever a forked run's process has ended, its run's end stored (by
        the run, or here for a crash): the daemon's loops look at once instead of at their next
        pass (``daemon.py``)."""
        self._when_runs_end.append(callback)

    @classmethod
    def config_type(cls) -> dict:
        return {
            "fork_runs": Field(
                bool,
                is_required=False,
                default_value=True,
                description="Fork each run from a server that has imported Dagster and dbt "
                "(false: the code server spawns a new interpreter per run, as Dagster does).",
            )
        }

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData, config_value: dict):
        return cls(inst_data=inst_data, **config_value)

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        origin = run.job_code_origin
        if not (self.fork_runs and origin and origin.executable_path == sys.executable):
            super().launch_run(context)
            return
        process = fork_context().Process(
            target=_execute_forked,
            args=(run.run_id, self._instance.get_ref()),
            name=f"dagster-run-{run.run_id}",
        )
        process.start()
        worker = {"run": run.run_id, "host": socket.gethostname(), "pid": process.pid}
        worker["forked"] = True  # by this launcher: ``terminate`` may interrupt it
        self._instance.add_run_tags(
            run.run_id, {WORKER_TAG: json.dumps({**worker, "at": time.time()})}
        )
        threading.Thread(
            target=self._reap, args=(run.run_id, process), name=f"reap-{run.run_id}", daemon=True
        ).start()

    def _reap(self, run_id: str, process: multiprocessing.process.BaseProcess) -> None:
        """Wait for a forked run's process; fail its run if it ended without saying how the run
        ended (killed, out of memory), as the code server does for the runs it spawned."""
        process.join()
        exit_code = process.exitcode
        process.close()
        try:
            self._store_crash(run_id, exit_code)
        finally:
            for callback in self._when_runs_end:
                try:
                    callback()
                except Exception:  # one listener's error neither stops the others nor this thread
                    logging.getLogger(__name__).exception("a when_runs_end callback failed")

    def _store_crash(self, run_id: str, exit_code: int | None) -> None:
        run = self._instance.get_run_by_id(run_id)
        if run is None or run.is_finished:
            return
        message = get_run_crash_explanation(
            prefix=f"Run execution process for {run_id}", exit_code=exit_code
        )
        if run.status == DagsterRunStatus.CANCELING:
            # Canceled (``terminate``'s SIGINT) before the run could record it, e.g. while the
            # forked process was still starting: the cancel, not a crash to retry.
            self._instance.report_run_canceled(run, message=message)
            return
        self._announce_retry(run)
        self._instance.report_engine_event(message, run, cls=self.__class__)
        self._instance.report_run_failed(run)

    def terminate(self, run_id: str) -> bool:
        """Cancel a run: a forked run's process on this host gets SIGINT (Dagster stops it
        between steps and records it canceled); any other goes to its code server."""
        run = self._instance.get_run_by_id(run_id)
        if run is None or run.is_finished:
            return False
        if GRPC_INFO_TAG in run.tags:
            return super().terminate(run_id)
        recorded = json.loads(run.tags.get(WORKER_TAG) or "{}")
        if recorded.get("run") != run_id or not recorded.get("forked"):
            return super().terminate(run_id)
        if recorded.get("host") != socket.gethostname():
            self._instance.report_engine_event(
                "Cannot cancel this run from here: its process is not on this host "
                f"({recorded.get('host', 'unknown')}); cancel it where it runs.",
                run,
                cls=self.__class__,
            )
            return False
        pid = int(recorded["pid"])
        if process_state(pid, float(recorded["at"])) != "running":
            self._instance.report_run_canceled(run, message=f"Run worker pid {pid} had ended.")
            return True
        self._instance.report_run_canceling(run)
        os.kill(pid, signal.SIGINT)
        return True

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        recorded = json.loads(run.tags.get(WORKER_TAG) or "{}")
        if recorded.get("run") == run.run_id:  # a retry inherits its parent's tags
            if recorded.get("host") != socket.gethostname():
                return CheckRunHealthResult(WorkerStatus.RUNNING, "run worker on another host")
            started = int(recorded["pid"]), float(recorded["at"])
        elif not _worker_is_local(run):
            return CheckRunHealthResult(WorkerStatus.RUNNING, "run worker on another host")
        else:
            started = worker_start(self._instance, run.run_id)
        if started is None:
            # Not recorded yet: the start timeout of run monitoring covers a worker that never
            # gets this far.
            return CheckRunHealthResult(WorkerStatus.RUNNING, "run worker not recorded yet")
        pid, recorded_at = started
        state = process_state(pid, recorded_at)
        if state == "running":
            return CheckRunHealthResult(WorkerStatus.RUNNING, f"run worker pid {pid} is alive")
        self._announce_retry(run)
        return CheckRunHealthResult(
            WorkerStatus.FAILED,
            f"run worker pid {pid} {state}: it died without reporting the end of its run "
            "(killed, out of memory, or the machine restarted)",
        )

    def _announce_retry(self, run: DagsterRun) -> None:
        """Tag the run "will retry" before monitoring fails it, not just after.

        Dagster stores a failed run's status, then its will-retry tag; a backfill daemon tick in
        between sees no run in progress and none waiting for a retry, and closes the backfill as
        failed. Run monitoring and the backfill daemon both tick at once when a daemon starts,
        so after a restart that race was lost every time (seen in the tests).
        """
        if not self._instance.run_retries_enabled or run.remote_job_origin is None:
            return  # a CLI's in-process run has no code location to be retried from
        failed = run.with_status(DagsterRunStatus.FAILURE)
        if auto_reexecution_should_retry_run(self._instance, failed, None):
            self._instance.add_run_tags(run.run_id, {WILL_RETRY_TAG: "true"})


def worker_start(instance: DagsterInstance, run_id: str) -> tuple[int, float] | None:
    """The pid and time of the latest event of ``run_id`` naming its worker: "Started process for
    run" (a launched run) or "Executing steps in process" (any in-process run, the CLI's too)."""
    for record in reversed(instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT)):
        event = record.dagster_event
        if event is None or not record.message.startswith((STARTED_PROCESS, IN_PROCESS)):
            continue
        pid = event.engine_event_data.metadata.get("pid")
        if pid is not None:
            return int(pid.value), record.timestamp
    return None


def record_worker(instance: DagsterInstance, run: DagsterRun) -> None:
    """Tag the run with the host and pid of the process executing it, whoever launched it.

    Called when a run's resources start: the one record that tells a live worker on another
    host (a CLI run elsewhere, sharing this storage) from a dead one here. A forked run's
    launcher has recorded it already.
    """
    recorded = json.loads(run.tags.get(WORKER_TAG) or "{}")
    if recorded.get("run") == run.run_id and recorded.get("pid") == os.getpid():
        return
    worker = {"run": run.run_id, "host": socket.gethostname(), "pid": os.getpid()}
    instance.add_run_tags(run.run_id, {WORKER_TAG: json.dumps({**worker, "at": time.time()})})


def _worker_is_local(run: DagsterRun) -> bool:
    grpc = json.loads(run.tags.get(GRPC_INFO_TAG) or "{}")
    return bool(grpc.get("socket")) or grpc.get("host", "localhost") in LOCAL_HOSTS


def process_state(pid: int, started_by: float) -> str:
    """``running``, or why process ``pid`` is not the one that was running at ``started_by``."""
    proc = Path(f"/proc/{pid}")
    if not Path("/proc/self/stat").exists():  # not Linux: liveness only
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "no longer exists"
        except PermissionError:
            pass
        return "running"
    try:
        stat = (proc / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return "no longer exists"
    # Fields after the command name (which may hold spaces and parentheses): state is the 3rd
    # field of stat(5), starttime the 22nd.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return "has exited"
    started_at = _boot_time() + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    if started_at > started_by + START_SLACK_S:
        return "no longer exists (its pid now belongs to a newer process)"
    return "running"


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise RuntimeError("/proc/stat has no btime line")

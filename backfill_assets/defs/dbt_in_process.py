"""dbt in the run's own process: the same ``dbt build``, without a process of its own.

dagster-dbt starts every dbt command as a child process and reads the JSON log lines it prints.
A child imports dbt again (~1.8 s of CPU, measured) although the run's process imported most of
dbt with the definitions (importing ``dbt.cli.main`` after them costs ~0.2 s): two seconds per run
that builds models, paid again by every run of a backfill. ``popen`` stands in for that child where
dagster-dbt starts it (``subprocess.Popen`` in ``dagster_dbt.core.dbt_cli_invocation``, replaced
for the duration of one ``cli`` call by ``in_process``): ``InProcessDbt`` runs dbt's documented
programmatic entry, ``dbtRunner``, in a thread, with the environment dagster-dbt gives the child,
and dbt's console log (the CLI's own JSON lines, same filter, same secret scrubbing) into a pipe
that dagster-dbt reads as the child's stdout. The exit code is the CLI's: 0, 1 (a node failed),
2 (dbt raised). An interrupt (the run being terminated) stops dbt as Ctrl-C stops its CLI.

dbt keeps its flags, event loggers, adapters and the environment it reads per process, so one
invocation runs at a time (``_ONE_AT_A_TIME``); a call made while another is still running gets
a child process, as before. ``tests/test_dbt_in_process.py`` pins that dagster-dbt still starts
dbt where this replaces it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress

import dagster_dbt.core.dbt_cli_invocation as dbt_cli_invocation

from backfill_assets.core.settings import dbt_in_process

_ONE_AT_A_TIME = threading.Lock()
CANCEL_EVERY_S = 0.5
"""After an interrupt, dbt's open queries are cancelled again this often until dbt has ended."""


class InProcessDbt:
    """What dagster-dbt uses of a ``subprocess.Popen`` of dbt: ``args``, ``stdout`` (bytes,
    one JSON event per line), ``wait``, ``returncode``, ``send_signal``.

    The environment is the process's from here until dbt ends (libpq reads ``PGOPTIONS`` at each
    connection): the caller keeps what it gave dbt meanwhile, as the project's dbt step does
    (``dbt_process_env`` spans the whole build). Built only by ``popen``, holding
    ``_ONE_AT_A_TIME``, which the thread releases once dbt has ended.
    """

    def __init__(self, args: Sequence[str], env: Mapping[str, str]) -> None:
        self.args = list(args)
        self.returncode: int | None = None
        self.stopping = threading.Event()
        read_fd, write_fd = os.pipe()
        self.stdout = os.fdopen(read_fd, "rb")
        self._log = _Log(os.fdopen(write_fd, "w", encoding="utf-8", buffering=1))
        restore = _enter_environment(env)
        self.thread = threading.Thread(target=self._run, args=(restore,), name="dbt", daemon=True)
        self.thread.start()

    def _run(self, restore: Callable[[], None]) -> None:
        code = 2
        try:
            code = self._invoke(self.args[1:])
        except BaseException as exc:  # reported as the CLI would an error: exit 2
            self._log.write(_error_line(f"dbt could not run in process: {exc!r}") + "\n")
        finally:
            restore()
            self.returncode = code
            self._log.close()
            _ONE_AT_A_TIME.release()

    def _invoke(self, args: list[str]) -> int:
        import dbt.task.runnable
        from dbt.cli.exceptions import DbtUsageException
        from dbt.cli.main import dbtRunner
        from dbt.deprecations import buffered_deprecations, reset_deprecations
        from dbt_common.events.event_manager_client import cleanup_event_logger
        from dbt_common.events.functions import (
            capture_stdout_logs,
            reset_metadata_vars,
            stop_capture_stdout_logs,
        )

        # What a new process would start without: the last invocation's deprecations (each is
        # told once per process), metadata variables read from another environment.
        reset_deprecations()
        buffered_deprecations.clear()
        reset_metadata_vars()
        capture_stdout_logs(self._log)
        pool_class = dbt.task.runnable.DbtThreadPool
        dbt.task.runnable.DbtThreadPool = _stoppable_pool(self)
        try:
            result = dbtRunner().invoke(args)
        finally:
            dbt.task.runnable.DbtThreadPool = pool_class
            stop_capture_stdout_logs()
            cleanup_event_logger()  # its console logger writes to ``_log``, closed next
        if result.success:
            return 0
        if result.exception is None:
            return 1
        if isinstance(result.exception, DbtUsageException):  # dbt logs nothing; its CLI says it
            self._log.write(_error_line(f"dbt: {result.exception}") + "\n")
        return 2

    def wait(self, timeout: float | None = None) -> int:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """SIGINT/SIGTERM: what Ctrl-C does to dbt's CLI. dbt submits no further node (its next
        submission raises KeyboardInterrupt in dbt's own thread, which dbt handles as Ctrl-C), a
        microbatch model starts no further batch (dbt's pool reads as closed), and the queries
        running meanwhile are cancelled, again every ``CANCEL_EVERY_S`` until dbt has ended."""
        if sig not in (signal.SIGINT, signal.SIGTERM) or self.stopping.is_set():
            return
        self.stopping.set()
        threading.Thread(target=self._cancel_until_ended, name="dbt-cancel", daemon=True).start()

    def _cancel_until_ended(self) -> None:
        while self.thread.is_alive():
            _cancel_open_queries()
            time.sleep(CANCEL_EVERY_S)


def _stoppable_pool(invocation: InProcessDbt) -> type:
    """dbt's thread pool for one invocation, stopped by its interrupt: closed to the microbatch
    runner, and refusing dbt's next node with the KeyboardInterrupt Ctrl-C would raise."""

    from dbt.graph.thread_pool import DbtThreadPool

    class StoppablePool(DbtThreadPool):
        def is_closed(self) -> bool:
            return super().is_closed() or invocation.stopping.is_set()

        def apply_async(self, *args, **kwargs):
            if invocation.stopping.is_set() and threading.current_thread() is invocation.thread:
                raise KeyboardInterrupt
            return super().apply_async(*args, **kwargs)

    return StoppablePool


def popen(args: Sequence[str], *, env: Mapping[str, str] | None = None, **options):
    """dagster-dbt's ``subprocess.Popen`` of dbt: in process, unless another in-process dbt
    command is still running (then the child process dagster-dbt meant)."""
    if not _ONE_AT_A_TIME.acquire(blocking=False):
        return subprocess.Popen(args, env=env, **options)
    try:
        return InProcessDbt(args, dict(env if env is not None else os.environ))
    except BaseException:
        _ONE_AT_A_TIME.release()
        raise


def _cancel_open_queries() -> None:
    """What dbt's own interrupt handling does (``GraphRunnableTask._cancel_connections``): each
    adapter's open connections cancelled from a connection of the calling thread."""
    from dbt.adapters.factory import FACTORY

    for adapter in list(FACTORY.adapters.values()):
        with suppress(Exception), adapter.connection_named("master"):  # best effort, as dbt's
            adapter.cancel_open_connections()


def _error_line(message: str) -> str:
    """An error as a line of dbt's JSON log (dagster-dbt collects error lines' messages)."""
    info = {"level": "error", "msg": message, "name": "InProcessDbtError"}
    return json.dumps({"info": info, "data": {}})


class _Log:
    """The pipe's writing end. Once dagster-dbt has stopped reading (a run interrupted), dbt's
    last lines go nowhere, as a child's would, instead of a logging error per line."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> None:
        with suppress(OSError, ValueError):
            self._stream.write(text)

    def flush(self) -> None:
        with suppress(OSError, ValueError):
            self._stream.flush()

    def close(self) -> None:
        with suppress(OSError, ValueError):
            self._stream.close()


def _enter_environment(env: Mapping[str, str]) -> Callable[[], None]:
    """Give the process the child's environment (dbt reads its flags from it, libpq its
    options); returns what puts back what was there, leaving any variable someone changed since
    as they left it."""
    before = dict(os.environ)
    os.environ.update(env)
    for name in [name for name in os.environ if name not in env]:
        del os.environ[name]

    def restore() -> None:
        for name, value in env.items():
            if os.environ.get(name) == value and before.get(name) != value:
                if name in before:
                    os.environ[name] = before[name]
                else:
                    del os.environ[name]
        for name, value in before.items():
            if name not in env and name not in os.environ:
                os.environ[name] = value

    return restore


@contextmanager
def in_process() -> Iterator[None]:
    """dagster-dbt's dbt commands run by ``popen`` for the block (unless
    ``BACKFILL_DBT_IN_PROCESS=0``)."""
    if not dbt_in_process():
        yield
        return
    module = dbt_cli_invocation.subprocess
    shim = types.SimpleNamespace(Popen=popen, PIPE=subprocess.PIPE, STDOUT=subprocess.STDOUT)
    dbt_cli_invocation.subprocess = shim
    try:
        yield
    finally:
        dbt_cli_invocation.subprocess = module

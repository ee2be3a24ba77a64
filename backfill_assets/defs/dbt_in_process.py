"""dbt in the run's own process: the same ``dbt build``, without a process of its own.

dagster-dbt starts every dbt command as a child process and reads the JSON log lines it prints.
A child imports dbt again (~1.8 s of CPU, measured) although the run's process imported most of
dbt with the definitions (importing ``dbt.cli.main`` after them costs ~0.2 s): two seconds per run
that builds models, paid again by every run of a backfill. ``InProcessDbt`` stands in for that
child where dagster-dbt starts it (``subprocess.Popen`` in ``dagster_dbt.core.dbt_cli_invocation``,
replaced for the duration of one ``cli`` call by ``in_process``): it runs dbt's documented
programmatic entry, ``dbtRunner``, in a thread, with the environment and working directory
dagster-dbt gives the child, and dbt's console log (the CLI's own JSON lines, same filter, same
secret scrubbing) into a pipe that dagster-dbt reads as the child's stdout. The exit code is the
CLI's: 0, 1 (a node failed), 2 (dbt raised). An interrupt (the run being terminated) cancels dbt's
open queries, as the CLI does on Ctrl-C.

dbt keeps its flags, event loggers, adapters, the environment it reads and the working directory
per process, so invocations take turns (``_ONE_AT_A_TIME``); a run's steps run one at a time
anyway. ``tests/test_dbt_model.py`` pins that dagster-dbt still starts dbt where this replaces it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress

import dagster_dbt.core.dbt_cli_invocation as dbt_cli_invocation

from backfill_assets.core.settings import dbt_in_process

_ONE_AT_A_TIME = threading.Lock()


class InProcessDbt:
    """What dagster-dbt uses of a ``subprocess.Popen`` of dbt: ``args``, ``stdout`` (bytes,
    one JSON event per line), ``wait``, ``returncode``, ``send_signal``.

    The environment and working directory are the process's from here until dbt ends (libpq
    reads ``PGOPTIONS`` at each connection): the caller keeps what it gave dbt meanwhile, as the
    project's dbt step does (``dbt_process_env`` spans the whole build).
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        **_popen_options,
    ) -> None:
        self.args = list(args)
        self.returncode: int | None = None
        self._signals = threading.Lock()
        self._in_dbt = False
        read_fd, write_fd = os.pipe()
        self.stdout = os.fdopen(read_fd, "rb")
        self._log = os.fdopen(write_fd, "w", encoding="utf-8", buffering=1)
        _ONE_AT_A_TIME.acquire()  # released by the thread, once dbt has ended
        try:
            restore = _enter_process_state(dict(env or os.environ), cwd)
        except BaseException:
            _ONE_AT_A_TIME.release()
            raise
        self._thread = threading.Thread(target=self._run, args=(restore,), name="dbt", daemon=True)
        self._thread.start()

    def _run(self, restore: Callable[[], None]) -> None:
        code = 2
        try:
            code = self._invoke(self.args[1:])
        except BaseException as exc:  # reported as the CLI would an error: exit 2
            self._log.write(_error_line(f"dbt could not run in process: {exc!r}") + "\n")
        finally:
            while True:  # an interrupt landing here must not leave the reader waiting
                try:
                    restore()
                    _ONE_AT_A_TIME.release()
                    self.returncode = code
                    self._log.close()
                    break
                except KeyboardInterrupt:
                    continue

    def _invoke(self, args: list[str]) -> int:
        from dbt.cli.exceptions import DbtUsageException
        from dbt.cli.main import dbtRunner
        from dbt_common.events.event_manager_client import cleanup_event_logger
        from dbt_common.events.functions import capture_stdout_logs, stop_capture_stdout_logs

        capture_stdout_logs(self._log)
        try:
            with self._signals:
                self._in_dbt = True
            try:
                result = dbtRunner().invoke(args)
            finally:
                with self._signals:
                    self._in_dbt = False
        finally:
            stop_capture_stdout_logs()
            cleanup_event_logger()  # its console logger writes to ``_log``, closed next
        if result.success:
            return 0
        if result.exception is None:
            return 1
        if isinstance(result.exception, DbtUsageException):  # dbt logs nothing; its CLI says it
            self._log.write(_error_line(f"dbt: {result.exception}") + "\n")
        return 2

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """SIGINT/SIGTERM: what Ctrl-C does to dbt's CLI. A KeyboardInterrupt in dbt's thread
        (dbt stops scheduling nodes and cancels its connections) and, since that thread may be
        waiting for a node's query, the cancel of the open queries right away."""
        if sig not in (signal.SIGINT, signal.SIGTERM):
            return
        with self._signals:
            if not self._in_dbt:
                return
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(self._thread.ident), ctypes.py_object(KeyboardInterrupt)
            )
        _cancel_open_queries()

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    kill = terminate


def _cancel_open_queries() -> None:
    """What dbt's own interrupt handling does (``GraphRunnableTask._cancel_connections``): each
    adapter's open connections cancelled from a connection of the calling thread."""
    from dbt.adapters.factory import FACTORY

    for adapter in list(FACTORY.adapters.values()):
        with suppress(Exception), adapter.connection_named("master"):  # best effort, as dbt's
            adapter.cancel_open_connections()


def _error_line(message: str) -> str:
    import json

    return json.dumps(
        {"info": {"level": "error", "msg": message, "name": "InProcessDbtError"}, "data": {}}
    )


def _enter_process_state(env: Mapping[str, str], cwd) -> Callable[[], None]:
    """Give the process the child's environment and working directory (dbt reads its flags from
    the environment, libpq its options); returns what puts back what was there."""
    saved = {name: os.environ.get(name) for name in env}
    gone = [name for name in os.environ if name not in env]
    saved.update({name: os.environ[name] for name in gone})
    here = os.getcwd()
    os.environ.update(env)
    for name in gone:
        del os.environ[name]
    if cwd is not None:
        os.chdir(cwd)

    def restore() -> None:
        os.chdir(here)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    return restore


@contextmanager
def in_process() -> Iterator[None]:
    """dagster-dbt's dbt commands run by ``InProcessDbt`` for the block (unless
    ``BACKFILL_DBT_IN_PROCESS=0``)."""
    if not dbt_in_process():
        yield
        return
    module = dbt_cli_invocation.subprocess
    shim = types.SimpleNamespace(Popen=InProcessDbt, PIPE=subprocess.PIPE, STDOUT=subprocess.STDOUT)
    dbt_cli_invocation.subprocess = shim
    try:
        yield
    finally:
        dbt_cli_invocation.subprocess = module

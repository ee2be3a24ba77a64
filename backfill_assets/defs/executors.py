"""Where a run's steps execute: in the run's own process, or on Celery workers.

``BACKFILL_EXECUTOR=celery`` (``core/settings.py``) gives every job and asset backfill of the code
location Dagster's own ``celery_executor``: the run's process (forked by the launcher as always)
orchestrates, and each step is a task on the broker's queue, executed by whichever worker
(``backfill-assets worker``) takes it. Everything a step needs is in the environment and the two
databases: the pause switch, the throttle, progress and the audit are rows; run sizes are read
when the definitions load; dbt parses into the worker's own folder (``BACKFILL_DBT_TARGET_DIR``).

The Celery settings are here once, for the executor and the workers (``celery_worker``), because
they must agree:

- ``task_acks_late`` with ``task_reject_on_worker_lost``: a step is acknowledged when it ends, so
  a worker killed in the middle of one (SIGKILL, OOM, a lost node) gives it back to the queue and
  another worker executes it again. Without them the message was gone with the worker and the run
  waited for its result forever. Executing a step again is safe: a partition's write is one
  transaction that replaces the partition (the killed one rolled back), and its audit row is
  written inside it.
- ``worker_prefetch_multiplier`` 1: a worker holds only the steps it runs; a second step waiting
  in a busy worker's buffer would wait for it while another worker idles.
- The pool is prefork (``backfill-assets worker`` starts it): the worker's main process keeps the
  broker's heartbeats while a child executes the step, and children die with it (Celery sets
  their parent-death signal), so a killed worker never leaves a step writing behind it.
"""

from __future__ import annotations

from typing import Any

from dagster import ExecutorDefinition, in_process_executor

from backfill_assets.core import settings

RESULT_BACKEND = "rpc://"
"""A step's events come back to its run over the broker itself: no result store to run."""
CELERY_CONFIG: dict[str, Any] = {
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "worker_prefetch_multiplier": 1,
    # A step's result is read once by its run; results are not kept past that.
    "result_expires": 24 * 3600,
    "broker_connection_retry_on_startup": True,
}


def run_executor(choice: settings.Executor | None = None) -> ExecutorDefinition:
    """The code location's executor for ``BACKFILL_EXECUTOR``.

    In process (the default): a run's steps (a table, then the dbt models reading it) depend on
    each other and run one after the other anyway; the default multiprocess executor would start
    a Python process per step, each importing the definitions again (~2.5 s,
    docs/measurements.md).
    """
    choice = choice or settings.executor()
    if not choice.distributed:
        return in_process_executor
    from dagster_celery import celery_executor

    return celery_executor.configured(
        {
            "broker": choice.broker,
            "backend": RESULT_BACKEND,
            "config_source": celery_config(choice),
        },
        name="celery",
    )


def celery_config(choice: settings.Executor) -> dict[str, Any]:
    """The Celery app's settings for ``choice``: the executor's and every worker's."""
    return {**CELERY_CONFIG, "task_default_queue": choice.queue}

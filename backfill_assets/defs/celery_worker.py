"""The Celery app of a step worker: ``celery -A backfill_assets.defs.celery_worker worker``, which
``backfill-assets worker`` starts with the project's environment.

The app is dagster-celery's (its ``execute_plan`` task: load the run's job from its code origin,
execute the step, return its events), built from the same settings as the code location's
executor (``executors.celery_config``): a worker and the runs that send it steps must agree on the
broker, the queue and the acknowledgement rules. Importing this module also loads the libraries a
step imports (``run_worker``: Dagster, dagster-dbt, dbt) before the pool forks its children, as the
run launcher's fork server does; the project's own code is imported by each child when its first
step loads the definitions.
"""

from __future__ import annotations

from dagster_celery.executor import CeleryExecutor
from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_task

import backfill_assets.defs.run_worker  # noqa: F401  (see above)
from backfill_assets.core import settings
from backfill_assets.defs.dagster_internals import RetryMode
from backfill_assets.defs.executors import RESULT_BACKEND, celery_config


def worker_app(choice: settings.Executor):
    """The Celery app for ``choice``, with dagster-celery's task registered."""
    executor = CeleryExecutor(
        retries=RetryMode(RetryMode.DISABLED),
        broker=choice.broker,
        backend=RESULT_BACKEND,
        config_source=celery_config(choice),
    )
    celery_app = make_app(executor.app_args())
    create_task(celery_app)
    return celery_app


app = worker_app(settings.require_celery())

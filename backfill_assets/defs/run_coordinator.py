"""Dagster's queued run coordinator, refusing a job backfill that would rewrite a whole range by
accident.

``dagster job backfill -j JOB --partitions ""`` exits 0 having queued every partition of the job:
Dagster's CLI reads an empty ``--partitions`` as no selection and no selection as all partitions
(``gen_partition_names_from_args``), as it does for ``--all`` or no ``--from``/``--to``. A typo
then rewrites a year once a daemon runs. Every run of a backfill passes through the coordinator
(the CLI submits a job backfill's runs itself, in its own process; the daemon those of the UI's
backfills), so the rule is kept here: a *job* backfill selecting every partition of its job, or
more than ``BACKFILL_MAX_PARTITIONS``, is refused unless tagged
``backfill_assets/full_rebuild=true``. Refused, the backfill is CANCELED with the reason as its
error, and each of its runs is canceled, with the reason as its message, before it was queued.
Asset backfills (the UI's "Materialize", ``backfill-assets launch``) name their range on purpose
and are not limited.

The CLI creates and submits every run *before* it records the backfill, so while the backfill is
unknown its runs are held (not queued) and decided when the CLI's instance is disposed, after the
backfill was recorded. If the CLI dies in between, its runs stay NOT_STARTED: nothing runs them.
"""

from __future__ import annotations

from collections.abc import Mapping

import click
from dagster import (
    DagsterRun,
    DagsterRunStatus,
    QueuedRunCoordinator,
    SubmitRunContext,
)

from backfill_assets.core.params import FULL_REBUILD, ParameterError, full_rebuild
from backfill_assets.core.partitioning import UnknownPartitionError
from backfill_assets.core.registry import DeclarationError, load_registry
from backfill_assets.core.settings import SettingsError, max_job_backfill_partitions
from backfill_assets.defs.dagster_internals import (
    BACKFILL_ID_TAG,
    BulkActionStatus,
    SerializableErrorInfo,
    get_current_timestamp,
)
from backfill_assets.project import job_name

OVERRIDE = f'--tags \'{{"{FULL_REBUILD}": "true"}}\''
UNRECORDED = (
    "the process that launched backfill {id} stopped before recording it; its runs were never "
    "queued. Launch it again."
)


class JobBackfillRefused(click.ClickException):
    """Raised at the end of ``dagster job backfill``: it exits 1, printing the reason."""


def refusal(
    backfill_id: str,
    job: str,
    partitions: list[str],
    whole_range: list[str] | None,
    tags: Mapping[str, str],
    limit: int,
) -> str | None:
    """Why a job backfill of ``partitions`` is refused, or None. ``whole_range``: every
    partition of the job, when known."""
    try:
        if full_rebuild(tags):
            return None
    except ParameterError as exc:
        return f"backfill {backfill_id} refused: {exc}; nothing was queued"
    selected = set(partitions)
    if whole_range and len(whole_range) > 1 and selected >= set(whole_range):
        why = (
            f"it selects all {len(selected)} partitions of {job} ({whole_range[0]}.."
            f"{whole_range[-1]}), as an empty --partitions, --all or no selection does"
        )
    elif len(selected) > limit:
        why = (
            f"it selects {len(selected)} partitions of {job}, more than {limit} "
            "(BACKFILL_MAX_PARTITIONS)"
        )
    else:
        return None
    return (
        f"backfill {backfill_id} refused: {why}; nothing was queued or written. Name the "
        "partitions (--partitions 2024-04-01,2024-04-02 or --from/--to), use `backfill-assets "
        f"launch` for a long range, or rebuild them all on purpose with {OVERRIDE}"
    )


class GuardedRunCoordinator(QueuedRunCoordinator):
    """``QueuedRunCoordinator`` that refuses job backfills as the module docstring says."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._verdicts: dict[str, str | None] = {}
        self._held: dict[str, list[str]] = {}

    def submit_run(self, context: SubmitRunContext) -> DagsterRun:
        run = context.dagster_run
        backfill_id = run.tags.get(BACKFILL_ID_TAG)
        if backfill_id is None or run.status != DagsterRunStatus.NOT_STARTED:
            return super().submit_run(context)
        if backfill_id not in self._verdicts:
            backfill = self._instance.get_backfill(backfill_id)
            if backfill is None:  # Dagster's CLI, which records the backfill after its runs
                self._held.setdefault(backfill_id, []).append(run.run_id)
                return run
            self._verdicts[backfill_id] = self._verdict(backfill)
            if self._verdicts[backfill_id] is not None:
                self._refuse_backfill(backfill, self._verdicts[backfill_id])
        verdict = self._verdicts[backfill_id]
        if verdict is None:
            return super().submit_run(context)
        self._instance.report_run_canceled(run, message=verdict)
        return self._instance.get_run_by_id(run.run_id) or run

    def dispose(self) -> None:
        """Queue or refuse the runs held for the backfills recorded since; a refusal ends
        ``dagster job backfill`` with exit code 1 and the reason."""
        held, self._held = self._held, {}
        refused = []
        for backfill_id, run_ids in held.items():
            backfill = self._instance.get_backfill(backfill_id)
            verdict = UNRECORDED.format(id=backfill_id) if backfill is None else None
            verdict = verdict or self._verdict(backfill)
            if verdict is not None and backfill is not None:
                self._refuse_backfill(backfill, verdict)
            for run in filter(None, map(self._instance.get_run_by_id, run_ids)):
                if verdict is None:
                    super().submit_run(SubmitRunContext(run, workspace=None))
                else:
                    self._instance.report_run_canceled(run, message=verdict)
            if verdict is not None:
                refused.append(verdict)
        super().dispose()
        if refused:
            raise JobBackfillRefused("\n".join(refused))

    def _verdict(self, backfill) -> str | None:
        """Why the backfill is refused, or None. When the rule cannot be checked (a bad setting,
        declarations that no longer load) it is refused too, saying why."""
        if backfill.is_asset_backfill:
            return None
        job = backfill.job_name or ""
        try:
            return refusal(
                backfill.backfill_id,
                job,
                list(backfill.partition_names or []),
                _job_partitions(job),
                backfill.tags,
                max_job_backfill_partitions(),
            )
        except (SettingsError, DeclarationError, UnknownPartitionError) as exc:
            return f"backfill {backfill.backfill_id} refused: its size cannot be checked: {exc}"

    def _refuse_backfill(self, backfill, verdict: str) -> None:
        """The backfill ends CANCELED with the reason as its error (``backfill-assets status``
        and the UI's backfill page show it)."""
        error = SerializableErrorInfo(verdict, stack=[], cls_name=JobBackfillRefused.__name__)
        self._instance.update_backfill(
            backfill.with_status(BulkActionStatus.CANCELED)
            .with_error(error)
            .with_end_timestamp(get_current_timestamp())
        )


def _job_partitions(job: str) -> list[str] | None:
    """Every partition of one of the project's backfill jobs, or None for another job."""
    for table in load_registry():
        if job in (job_name(table), job_name(table, with_downstream=True)):
            last = table.partitioning.last_key()
            first = table.partitioning.first_key()
            return table.partitioning.keys_between(first, last) if last else []
    return None

"""dbt tests as Dagster asset checks with one result per test and partition.

dagster-dbt reports a dbt test once per invocation, and a run here covers many days: Dagster
would store that one result with no partition and show every day's check as skipped. So the dbt
step runs ``dbt build`` over its window (the tests are scoped to the window by the dbt package's
``macros/partition_window.sql``), holds back dagster-dbt's range-wide results and
yields one ``AssetCheckEvaluation`` per test and day instead: a passing test passes every day of
the window; a failing test's compiled SQL is re-run grouped by the ``partition_key`` column the
project's tests return, so only the days that hold failing rows fail (for a monthly or hourly
model, the months or hours holding them). A test whose rows name no day (``not_null`` on the
partition column itself) fails every day of the run.
Design and measurements: ``docs/design/dbt-tests-as-partition-checks.md``.
"""

from bisect import bisect_right
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import psycopg
from dagster import (
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetSpec,
    Failure,
    Output,
    PartitionsDefinition,
    TimeWindowPartitionsDefinition,
)
from dagster_dbt import DagsterDbtTranslator, DbtProject
from dagster_dbt.core.dbt_cli_invocation import DbtCliInvocation
from psycopg import sql

from backfill_assets.defs.checks import latest_materializations, this_runs_materializations


class PartitionedChecksTranslator(DagsterDbtTranslator):
    """Declares every dbt test's check with its models' partitions, so results are kept per day."""

    def __init__(self, partitions_def: PartitionsDefinition | None) -> None:
        super().__init__()
        self._partitions_def = partitions_def

    def get_asset_check_spec(
        self,
        asset_spec: AssetSpec,
        manifest: Mapping[str, Any],
        unique_id: str,
        project: DbtProject | None,
    ) -> AssetCheckSpec | None:
        spec = super().get_asset_check_spec(asset_spec, manifest, unique_id, project)
        if spec is None:
            return spec
        # The test's own `description:` (dagster-dbt reads only meta.description).
        described = spec.description or manifest["nodes"].get(unique_id, {}).get("description")
        return AssetCheckSpec(
            name=spec.name,
            asset=spec.asset_key,
            description=described or None,
            additional_deps=spec.additional_deps,
            blocking=spec.blocking,
            metadata=spec.metadata,
            automation_condition=spec.automation_condition,
            partitions_def=self._partitions_def,
        )

    def get_group_name(self, dbt_resource_props: Mapping[str, Any]) -> str | None:
        """A model's group is its schema, as a declared table's is: what it holds, not
        ``default``."""
        return dbt_resource_props.get("schema") or super().get_group_name(dbt_resource_props)


def failures_by_partition(
    conn: psycopg.Connection,
    compiled_sql: str,
    partitions: Sequence[str],
    window_failures: int,
    definition: TimeWindowPartitionsDefinition,
) -> dict[str, int]:
    """Failing rows per partition of ``partitions``; rows that name no partition count against
    every one. A row's ``partition_key`` (a day, a time, or a key as text) counts against the
    partition whose window holds it: a day inside a month against that month's key, a time
    against its UTC hour's."""
    query = sql.SQL("SELECT partition_key, count(*) FROM ({}) AS failures GROUP BY 1").format(
        sql.SQL(compiled_sql.strip().rstrip(";"))
    )
    try:
        found = conn.execute(query).fetchall()
    except psycopg.errors.UndefinedColumn:
        return dict.fromkeys(partitions, window_failures)
    spans = {key: definition.time_window_for_partition_key(key) for key in partitions}
    windows = sorted((span.start, span.end, key) for key, span in spans.items())
    counts, unattributed = dict.fromkeys(partitions, 0), 0
    for value, count in found:
        if value is None:
            unattributed += count
        elif isinstance(value, str) and value in counts:
            counts[value] += count
        elif (instant := _instant(value)) is not None:
            at = bisect_right(windows, instant, key=lambda window: window[0]) - 1
            if at >= 0 and instant < windows[at][1]:
                counts[windows[at][2]] += count
    return {key: counts[key] + unattributed for key in partitions}


def _instant(value: object) -> datetime | None:
    """A ``partition_key`` value as a UTC instant: a date's midnight, a naive time read in UTC."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    return None


@dataclass(frozen=True)
class CheckedDays:
    """The days a dbt step builds or checks, per asset, and the materializations its results
    point at (``None``: this run's own, read once the build is done)."""

    days: dict[AssetKey, list[str]]
    targets: dict | None = None

    @property
    def span(self) -> list[str]:
        return sorted({day for days in self.days.values() for day in days})


def checked_days(
    context: AssetExecutionContext, definition: TimeWindowPartitionsDefinition
) -> CheckedDays:
    """The run's partitions; or, for checks launched on their own with no partition (the UI's
    "Execute all" on a model's checks), every day the model holds, each checked against that
    day's latest materialization. Without this such a run could only fail."""
    if context.has_partition_key or context.has_partition_key_range:
        keys = {k.asset_key for k in context.selected_asset_check_keys}
        days = context.partition_keys
        if context.selected_asset_keys:
            return CheckedDays(dict.fromkeys(keys | set(context.selected_asset_keys), days))
        targets = {}  # checks alone: each day's latest materialization, as below
        for key in keys:
            targets |= latest_materializations(context, key, set(days))
        return CheckedDays(dict.fromkeys(keys, days), targets)
    if context.selected_asset_keys:
        names = ", ".join(k.to_user_string() for k in sorted(context.selected_asset_keys))
        raise Failure(
            description=f"{names} are partitioned: pick the partitions to build (Materialize, "
            "then a range such as [2024-04-01...2024-04-07]). Nothing was built."
        )
    order = {day: i for i, day in enumerate(definition.get_partition_keys())}
    days, targets = {}, {}
    for key in sorted({k.asset_key for k in context.selected_asset_check_keys}):
        latest = latest_materializations(context, key)
        targets |= latest
        days[key] = sorted((day for _, day in latest if day in order), key=order.__getitem__)
    if not any(days.values()):
        names = ", ".join(key.to_user_string() for key in days)
        raise Failure(
            description=f"No partition of {names} has been materialized yet, so there is "
            "nothing to check: materialize partitions, and their checks run with them."
        )
    return CheckedDays(days, targets)


def per_partition_check_events(
    context: AssetExecutionContext,
    invocation: DbtCliInvocation,
    conn: psycopg.Connection,
    checked: CheckedDays,
) -> Iterator[object]:
    """Stream dbt's events, replacing each range-wide test result by one result per day.

    Raises dbt's own error (models, window, database message) when a model failed; failing tests
    alone do not raise here: their evaluations carry the failure, and Dagster fails the step for
    a failed blocking (severity ``error``) test after every output is stored.
    """
    held_back: dict[AssetCheckKey, AssetCheckResult] = {}
    for event in invocation.stream():
        if isinstance(event, AssetCheckResult):
            held_back[AssetCheckKey(event.asset_key, event.check_name)] = event
        else:
            yield event
    results = {r["unique_id"]: r for r in invocation.get_artifact("run_results.json")["results"]}
    if any(r["status"] == "error" and not uid.startswith("test.") for uid, r in results.items()):
        raise invocation.get_error() or RuntimeError(f"dbt failed: {invocation.dbt_command}")

    targets = this_runs_materializations(context) if checked.targets is None else checked.targets
    for key, result in held_back.items():
        spec = context.assets_def.get_spec_for_check_key(key)
        days = checked.days.get(key.asset_key, [])
        test = results[result.metadata["unique_id"].value]
        status = test["status"]  # pass | fail | warn | error
        window_failures = test.get("failures") or 0
        if status == "pass":
            failures: dict[str, int | None] = dict.fromkeys(days, 0)
        elif status in ("fail", "warn"):
            compiled, definition = test["compiled_code"], context.assets_def.partitions_def
            failures = failures_by_partition(conn, compiled, days, window_failures, definition)
        else:  # the test's SQL itself failed: no day can be said to pass
            failures = dict.fromkeys(days)
        for day in days:
            count = failures[day]
            metadata: dict[str, object] = {
                "partition": day,
                "dbt_status": status,
                "failed_row_count": -1 if count is None else count,
                "window_failed_row_count": window_failures,
                "dbt_unique_id": test["unique_id"],
            }
            if status == "error":
                metadata["message"] = test.get("message") or ""
            yield AssetCheckEvaluation(
                asset_key=key.asset_key,
                check_name=key.name,
                passed=count == 0,
                metadata=metadata,
                severity=AssetCheckSeverity.WARN if status == "warn" else AssetCheckSeverity.ERROR,
                partition=day,
                blocking=spec.blocking,
                target_materialization_data=targets.get((key.asset_key, day)),
            )
        yield Output(None, output_name=context.assets_def.get_output_name_for_asset_check_key(key))

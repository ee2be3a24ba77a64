"""Driving Dagster's own backfill machinery from Python: the daemon, the CLI, the run queue.

The demo and the end-to-end tests both go through here, so what they prove is the path a user takes
by hand: ``dagster job backfill`` records a backfill and queues its runs, ``dagster-daemon run``
dequeues and executes them against the PostgreSQL-backed instance.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dagster import (
    AssetCheckSeverity,
    AssetKey,
    AssetSelection,
    DagsterEventType,
    DagsterInstance,
    Definitions,
    RunsFilter,
)

from backfill_assets.core.params import LAUNCHED_BY
from backfill_assets.core.partitioning import Partitioning, UnknownPartitionError
from backfill_assets.core.settings import WORKSPACE_FILE
from backfill_assets.defs.dagster_internals import (
    BACKFILL_ID_TAG,
    PARENT_BACKFILL_ID_TAG,
    ROOT_BACKFILL_ID_TAG,
    USER_TAG,
    PartitionBackfill,
    get_current_timestamp,
    make_new_backfill_id,
)
from backfill_assets.tooling.report import (
    FINISHED,
    BackfillReport,
    BackfillWatcher,
    backfill_runs,
    existing_backfill,
    has_ended,
    watch,
)


class BackfillLaunchError(RuntimeError):
    """The dagster CLI refused or failed to record the backfill; no run was queued."""


@contextmanager
def running_daemon(
    env: Mapping[str, str],
    log_path: Path,
    *,
    command: Sequence[str] = ("backfill-assets", "daemon"),
) -> Iterator[subprocess.Popen]:
    """``backfill-assets daemon`` (Dagster's daemons, a backfill pass every second) in the
    background for the duration of the block, then stopped. The benchmark passes Dagster's own
    ``dagster-daemon run -w workspace.yaml`` as ``command`` to compare."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            list(command),
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        _stop_process_group(process)


def launch_job_backfill(
    env: Mapping[str, str],
    job: str,
    partitioning: Partitioning,
    first: str,
    last: str,
    *,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Record a backfill of ``first``..``last`` (inclusive) and queue its runs; returns its id.

    Keys are checked against the job's partitions first, so a typo fails with the allowed
    range in the message rather than the CLI's terse ``invalid value``.
    """
    partitioning.keys_between(first, last)
    command = ["dagster", "job", "backfill", "-w", str(WORKSPACE_FILE), "-j", job]
    command += ["--from", first, "--to", last, "--noprompt"]
    if tags:
        import json

        command += ["--tags", json.dumps(dict(tags))]
    completed = subprocess.run(
        command, env={**os.environ, **env}, capture_output=True, text=True, check=False
    )
    match = re.search(r"Launched backfill job `([^`]+)`", completed.stdout)
    if completed.returncode != 0 or not match:
        detail = (completed.stderr or completed.stdout).strip().splitlines()[-5:]
        raise BackfillLaunchError(
            f"`{' '.join(command)}` failed (exit {completed.returncode}): " + " | ".join(detail)
        )
    return match.group(1)


def launch_asset_backfill(
    instance: DagsterInstance,
    asset_keys: Sequence[AssetKey],
    first: str,
    last: str,
    *,
    tags: Mapping[str, str] | None = None,
    definitions: Definitions | None = None,
    only: Sequence[str] | None = None,
) -> str:
    """Record an asset backfill of ``first``..``last`` (inclusive), as the UI's "Materialize" does;
    with ``only``, of just those partitions of that range.

    Unlike a job backfill, the daemon plans an asset backfill's runs itself and honours each
    asset's ``BackfillPolicy``, so several partitions share one run. ``definitions`` defaults to
    the code location's; it must be what the daemon loads.
    """
    if definitions is None:
        from backfill_assets.definitions import defs as definitions
    keys = partition_keys(definitions, asset_keys[0], first, last)
    if only is not None:
        keys = [key for key in keys if key in set(only)]
    graph = definitions.resolve_asset_graph()
    backfill_id = make_new_backfill_id()
    backfill = PartitionBackfill.from_asset_partitions(
        backfill_id=backfill_id,
        asset_graph=graph,
        partition_names=keys,
        asset_selection=list(asset_keys),
        backfill_timestamp=get_current_timestamp(),
        tags=with_user(tags),
        dynamic_partitions_store=instance,
        all_partitions=False,
        title=f"{first}..{last}" if only is None else f"{len(keys)} of {first}..{last}",
        description=None,
        run_config=None,
    )
    instance.add_backfill(backfill)
    return backfill_id


def with_user(tags: Mapping[str, str] | None) -> dict[str, str]:
    """The tags, with whoever launched the backfill also as Dagster's own ``user`` tag: the UI
    shows it as "Launched by" (else "Manually launched"), on the backfill and each of its runs."""
    tags = dict(tags or {})
    if tags.get(LAUNCHED_BY):
        tags.setdefault(USER_TAG, tags[LAUNCHED_BY])
    return tags


def retry_backfill(instance: DagsterInstance, backfill_id: str, definitions: Definitions) -> str:
    """A new backfill of exactly what the ended one did not materialize (failed, canceled or never
    run), with its tags; as the UI's "Re-execute from failure". Returns the new id."""
    backfill = closed(instance, backfill_id)
    tags = {
        **backfill.tags,
        PARENT_BACKFILL_ID_TAG: backfill.backfill_id,
        ROOT_BACKFILL_ID_TAG: backfill.tags.get(ROOT_BACKFILL_ID_TAG, backfill.backfill_id),
    }
    if not backfill.is_asset_backfill:
        raise BackfillLaunchError(
            f"backfill {backfill_id} is a job backfill (`dagster job backfill`); re-execute it "
            "from the UI (Runs > Backfills), or launch its failed days with "
            "`backfill-assets launch`"
        )
    data = backfill.get_asset_backfill_data(definitions.resolve_asset_graph())
    missing = data.target_subset - data.materialized_subset
    if missing.num_partitions_and_non_partitioned_assets == 0:
        raise BackfillLaunchError(
            f"backfill {backfill_id} materialized every partition it targeted; nothing to retry"
        )
    retry = PartitionBackfill.from_asset_graph_subset(
        backfill_id=make_new_backfill_id(),
        asset_graph_subset=missing,
        dynamic_partitions_store=instance,
        tags=tags,
        backfill_timestamp=get_current_timestamp(),
        title=f"Retry of {backfill.title or backfill_id}",
        description=backfill.description,
        run_config=backfill.run_config,
    )
    instance.add_backfill(retry)
    return retry.backfill_id


def closed(instance: DagsterInstance, backfill_id: str, *, grace_s: float = 75):
    """The backfill once it has ended (``report.has_ended``): what it materialized is only final
    then. Its runs may all have ended a tick (30 s) before the daemon records it, so a backfill
    whose runs all ended is waited for; one with runs in flight is refused, even when Dagster
    already calls it COMPLETED (a job backfill, once its runs are queued)."""
    report = BackfillWatcher(instance, backfill_id).report()
    if report.ended:
        return existing_backfill(instance, backfill_id)
    if not report.finished:
        in_flight = sum(status not in FINISHED for status in report.runs.values())
        raise BackfillLaunchError(
            f"backfill {backfill_id} is still running ({in_flight} run(s) queued or running, "
            f"Dagster: {report.daemon_status}); wait for it (backfill-assets status "
            f"{backfill_id} --wait) or cancel it first (backfill-assets cancel {backfill_id})"
        )
    deadline = time.monotonic() + grace_s
    while True:
        backfill = existing_backfill(instance, backfill_id)
        statuses = [run.status for run in backfill_runs(instance, backfill)]
        if has_ended(backfill.status.value, statuses):
            return backfill
        if time.monotonic() > deadline:
            raise BackfillLaunchError(
                f"backfill {backfill_id}: its runs ended but the daemon has not closed it after "
                f"{grace_s:.0f}s; is `backfill-assets daemon` running?"
            )
        time.sleep(1)


def asset_selection(
    definitions: Definitions, names: Sequence[str], *, downstream: bool = False
) -> list[AssetKey]:
    """Asset keys for ``analytics/fct_orders`` or ``analytics.fct_orders``; with ``downstream``
    also what is built from them and shares their partitions. Unknown names are refused, listing
    the partitioned assets."""
    graph = definitions.resolve_asset_graph()
    partitioned = {
        key.to_user_string(): key
        for key in graph.get_all_asset_keys()
        if graph.get(key).is_materializable and graph.get(key).partitions_def is not None
    }
    keys = []
    for name in names:
        key = partitioned.get(name.replace(".", "/"))
        if key is None:
            raise ValueError(
                f"unknown asset {name!r}; partitioned assets: {', '.join(sorted(partitioned))}"
            )
        keys.append(key)
    if downstream:
        first = graph.get(keys[0]).partitions_def
        for key in sorted(AssetSelection.assets(*keys).downstream().resolve(graph)):
            if key not in keys and graph.get(key).partitions_def == first:
                keys.append(key)
    return keys


def daemon_is_alive(instance: DagsterInstance, within_s: float = 60) -> bool:
    """Whether a dagster-daemon's backfill loop reported in the last ``within_s`` seconds."""
    heartbeat = instance.get_daemon_heartbeats().get("BACKFILL")
    return heartbeat is not None and get_current_timestamp() - heartbeat.timestamp < within_s


def partition_keys(definitions: Definitions, asset: AssetKey, first: str, last: str) -> list[str]:
    """The keys from ``first`` to ``last`` of the asset's partitions; refuses, naming its range."""
    partitions_def = definitions.resolve_asset_graph().get(asset).partitions_def
    keys = partitions_def.get_partition_keys() if partitions_def else []
    span = f"{keys[0]} to {keys[-1]}" if keys else "none"
    for key in (first, last):
        if key not in keys:
            inside = bool(keys) and keys[0] <= key <= keys[-1]
            raise UnknownPartitionError(
                f"unknown partition key {key!r}: {asset.to_user_string()} has partitions "
                f"from {span}"
                + (
                    f" and {key} is not one of them (they are {', '.join(keys[:2])}, …); pick one"
                    if inside
                    else "; pick a key in that range"
                )
            )
    start, end = keys.index(first), keys.index(last)
    if start > end:
        raise UnknownPartitionError(
            f"the range {first}..{last} is reversed: {first} comes after {last}; swap them"
        )
    return keys[start : end + 1]


def wait_for_backfill(
    instance: DagsterInstance,
    backfill_id: str,
    *,
    timeout_s: float = 900,
    on_progress: Callable[[BackfillReport], None] | None = None,
    poll_s: float = 0.25,
) -> BackfillReport:
    """Follow the backfill until it has ended (``report.has_ended``: closed by Dagster, no run
    in flight), with the follower ``status --wait`` and ``launch --wait`` use (``report.watch``);
    ``on_progress`` sees each report whose counts changed."""
    return watch(
        BackfillWatcher(instance, backfill_id, live_detail=False),
        timeout_s=timeout_s,
        on_change=on_progress,
        poll_s=poll_s,
        until_ended=True,
    )


@dataclass(frozen=True)
class BackfillSummary:
    partitions_materialized: list[str]
    rows_written: int
    checks_passed: int
    checks_failed: int
    checks_warned: int


def summarize_backfill(instance: DagsterInstance, backfill_id: str) -> BackfillSummary:
    runs = instance.get_runs(filters=RunsFilter(tags={BACKFILL_ID_TAG: backfill_id}))
    materialized: set[str] = set()
    rows = passed = failed = warned = 0
    for run in runs:
        for record in instance.get_records_for_run(
            run.run_id,
            of_type={
                DagsterEventType.ASSET_MATERIALIZATION,
                DagsterEventType.ASSET_CHECK_EVALUATION,
            },
        ).records:
            event = record.event_log_entry.dagster_event
            if event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
                materialization = event.step_materialization_data.materialization
                materialized.add(materialization.partition)
                inserted = materialization.metadata.get(
                    "rows_inserted", materialization.metadata.get("rows_updated")
                )
                rows += int(inserted.value) if inserted is not None else 0
            else:
                evaluation = event.asset_check_evaluation_data
                if evaluation.passed:
                    passed += 1
                elif evaluation.severity == AssetCheckSeverity.WARN:
                    warned += 1
                else:
                    failed += 1
    return BackfillSummary(sorted(materialized), rows, passed, failed, warned)


def _stop_process_group(process: subprocess.Popen, *, linger_s: float = 15.0) -> None:
    """Stop a process started with ``start_new_session`` and everything in its group.

    The daemon's code server and run workers share its group. On SIGTERM a code server waits for
    its runs to end; a run stuck on a database that went away kept it alive for good, holding
    memory, after the daemon itself had exited. What is left ``linger_s`` after the daemon is
    killed; its runs are then failed by run monitoring when a daemon starts again.
    """
    group = process.pid
    if process.poll() is None:
        os.killpg(group, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(group, signal.SIGKILL)
            process.wait()
    deadline = time.monotonic() + linger_s
    while _group_alive(group):
        if time.monotonic() > deadline:
            os.killpg(group, signal.SIGKILL)
            return
        time.sleep(0.2)


def _group_alive(group: int) -> bool:
    """Whether a process of ``group`` still runs. Zombies do not count: once the daemon has
    exited, its children are reaped by init, which here took up to 2 s after they had ended."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():  # not Linux: any member, zombie or not
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended meanwhile
        # After the command: state is field 3 of stat(5), the process group field 5.
        if int(fields[2]) == group and fields[0] not in ("Z", "X"):
            return True
    return False

"""Dagster's PostgreSQL event log, with one kept connection per process and events stored by the
batch (dagster.yaml).

A backfill run stores ~8 events per partition (a materialization, six check evaluations, its
planned events). Stock ``PostgresEventLogStorage`` opens a new connection for every statement
(SQLAlchemy ``NullPool``, ~1.7 ms each on a local socket) and asks the catalog whether the asset
check table exists before every check event: measured on 90 partitions of ``fct_orders``, 2,406
connections and 637 catalog lookups made a 14.6 s run, 10 s of it event storage; this class makes
the same run 6.3 s (docs/measurements.md). It changes nothing stored.

It keeps one connection open per process, the way Dagster's own webserver configures the same
class (``optimize_for_webserver``: a pool of one, more opened on demand when threads contend), and
remembers tables once found (Dagster never drops them while running). Selected in
``dagster_home/dagster.yaml``; the webserver still applies its own statement timeout on top.

It also stores a run's events by the batch, not one round trip each (3.9 ms a check evaluation,
5.5 ms a materialization: a run of 30 partitions spent 1.1 s storing them, more than its writes):

- **materializations**: Dagster stores the materializations of one multi-partition output in one
  batch when ``DAGSTER_EVENT_BATCH_SIZE`` is set (its own ``store_event_batch``); a process that
  loads this storage sets it (``EVENT_BATCH_SIZE`` unless the environment already says);
- **check evaluations**: consecutive ones are held and stored together (one INSERT of the events,
  one UPDATE of their planned execution rows) as soon as anything else is stored, or a thousand
  are held, or the storage is disposed. Dagster writes them one by one, with no batch of its own;
  the run yields every partition's evaluations in a row, then its check outputs, so they are
  stored within milliseconds, in the same order, with the same rows as one by one.

The UI reads the same rows either way (tests: every check result per partition).
"""

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as db
from dagster import DagsterEventType, EventLogEntry
from dagster_postgres.event_log import PostgresEventLogStorage
from dagster_postgres.utils import get_token_provider_from_config, pg_url_from_config
from sqlalchemy.dialects import postgresql

from backfill_assets.defs.dagster_internals import (
    AssetCheckExecutionRecordStatus,
    AssetCheckExecutionsTable,
    ConfigurableClassData,
    SqlEventLogStorageTable,
)

# Kept connections are replaced after an hour, so a long-lived daemon follows server restarts
# and failovers the way a fresh connection would.
RECYCLE_S = 3600
log = logging.getLogger("backfill_assets")
EVENT_BATCH_SIZE = "1000"
"""Materializations of one output stored per statement by Dagster (``DAGSTER_EVENT_BATCH_SIZE``)."""
MAX_HELD = 1000
"""Check evaluations held at most before they are stored."""


class PooledPostgresEventLogStorage(PostgresEventLogStorage):
    """``PostgresEventLogStorage`` that keeps its connection; see the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tables_found: set[str] = set()
        self._held: list[EventLogEntry] = []
        self._holding = threading.RLock()
        os.environ.setdefault("DAGSTER_EVENT_BATCH_SIZE", EVENT_BATCH_SIZE)
        # statement_timeout 0: none, as the stock storage; max_overflow -1: no cap on the
        # connections opened beyond the kept one, as NullPool had none.
        self.optimize_for_webserver(statement_timeout=0, pool_recycle=RECYCLE_S, max_overflow=-1)

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData | None, config_value: Mapping[str, Any]
    ) -> "PooledPostgresEventLogStorage":
        return cls(
            inst_data=inst_data,
            postgres_url=pg_url_from_config(config_value),
            should_autocreate_tables=config_value.get("should_autocreate_tables", True),
            token_provider=get_token_provider_from_config(config_value),
        )

    def has_table(self, table_name: str) -> bool:
        if table_name in self._tables_found:
            return True
        found = super().has_table(table_name)
        if found:
            self._tables_found.add(table_name)
        return found

    def store_event(self, event: EventLogEntry) -> None:
        """Hold a run's check evaluation; store anything else after the ones held."""
        with self._holding:
            if _held_back(event):
                self._held.append(event)
                if len(self._held) >= MAX_HELD:
                    self.store_held()
                return
            self.store_held()
        super().store_event(event)

    def dispose(self) -> None:
        try:
            self.store_held()
        finally:
            super().dispose()

    def store_held(self) -> None:
        """Store the held check evaluations: one INSERT of the events, one UPDATE of the rows
        their planned events created (an INSERT for any that has none), in one transaction. If
        that fails, or one check of one partition was evaluated twice in the batch, they are
        stored one by one the stock way (Dagster does the same when a batch fails); any not
        stored then stay held."""
        with self._holding:
            held, self._held = self._held, []
            if not held:
                return
            if len(held) > 1 and not _repeats(held):
                try:
                    self._store_evaluations(held)
                    return
                except Exception as exc:
                    log.warning(f"storing {len(held)} check evaluations at once failed ({exc})")
            for number, event in enumerate(held):
                try:
                    super().store_event(event)
                except BaseException:
                    self._held[:0] = held[number:]
                    raise

    def _store_evaluations(self, held: list[EventLogEntry]) -> None:
        with self.index_transaction() as conn:
            rows = [self._event_to_row(event) for event in held]
            ids = _insert_rows(conn, SqlEventLogStorageTable, rows, returning="id")
            executions = [
                _execution_row(event, row["event"], event_id)
                for event, row, event_id in zip(held, rows, ids, strict=True)
            ]
            updated = _update_planned(conn, executions)
            missing = [e for e in executions if e["evaluation_event_storage_id"] not in updated]
            if missing:
                _insert_rows(conn, AssetCheckExecutionsTable, missing)

    def store_event_batch(self, events: Sequence[EventLogEntry]) -> None:
        """Dagster's batches (``DAGSTER_EVENT_BATCH_SIZE``): materializations as Dagster stores
        them; a run's planned events (stock: one by one) in one INSERT, their asset-event tags,
        the asset's row from the last event of each asset (as Dagster's batch of materializations
        does) and the planned check rows, in one transaction."""
        self.store_held()
        kinds = {event.dagster_event_type for event in events}
        if not kinds <= PLANNED or not all(event.run_id for event in events):
            super().store_event_batch(events)
            return
        with self.index_transaction() as conn:
            rows = [self._event_to_row(event) for event in events]
            ids = _insert_rows(conn, SqlEventLogStorageTable, rows, returning="id")
            assets = [
                (event, event_id)
                for event, event_id in zip(events, ids, strict=True)
                if event.dagster_event_type == DagsterEventType.ASSET_MATERIALIZATION_PLANNED
            ]
            if assets:
                self._store_asset_event_tags(conn, [e for e, _ in assets], [i for _, i in assets])
                last = {event.dagster_event.asset_key: (event, i) for event, i in assets}
                for event, event_id in last.values():
                    self._store_asset_event(conn, event, event_id)
            planned_checks = [
                row
                for event, row, event_id in zip(events, rows, ids, strict=True)
                if event.dagster_event_type == DagsterEventType.ASSET_CHECK_EVALUATION_PLANNED
                for row in _planned_rows(event, row["event"], event_id)
            ]
            if planned_checks:
                _insert_rows(conn, AssetCheckExecutionsTable, planned_checks)


def _insert_rows(
    conn, table: db.Table, rows: list[dict[str, Any]], *, returning: str | None = None
) -> list[int]:
    """Insert ``rows`` (dicts of ``table``'s columns, all with the same keys) in one statement,
    their values bound as one array per column: one short text to plan whatever their number
    (SQLAlchemy's multi-row VALUES compiles a parameter per value: ~0.2 ms a row). ``WITH
    ORDINALITY`` keeps their order; the ``returning`` column of each, in order."""
    names = list(rows[0])
    dialect = postgresql.dialect()
    types = {name: table.c[name].type.compile(dialect) for name in names}
    arrays = ", ".join(f"CAST(:{name} AS {types[name]}[])" for name in names)
    columns = ", ".join(names)
    inserted = conn.execute(
        db.text(
            f"INSERT INTO {table.name} ({columns}) SELECT {columns} FROM unnest({arrays}) "
            f"WITH ORDINALITY AS g ({columns}, n) ORDER BY n"
            + (f" RETURNING {returning}" if returning else "")
        ),
        {name: [row[name] for row in rows] for name in names},
    )
    return [int(value) for (value,) in inserted] if returning else []


PLANNED = {
    DagsterEventType.ASSET_MATERIALIZATION_PLANNED,
    DagsterEventType.ASSET_CHECK_EVALUATION_PLANNED,
}


def _repeats(events: list[EventLogEntry]) -> bool:
    """Two evaluations of one check of one partition in one run (their planned row is one)."""
    seen = set()
    for event in events:
        evaluation = event.get_dagster_event().event_specific_data
        seen.add((evaluation.asset_key, evaluation.check_name, evaluation.partition))
    return len(seen) < len(events)


def _held_back(event: EventLogEntry) -> bool:
    """A check evaluation of a run (an evaluation without a run is stored as it comes)."""
    return bool(
        event.run_id
        and event.is_dagster_event
        and event.dagster_event_type == DagsterEventType.ASSET_CHECK_EVALUATION
    )


def _execution_row(event: EventLogEntry, serialized: str, event_id: int) -> dict[str, object]:
    """The ``asset_check_executions`` row of an evaluation, as Dagster's
    ``_update_asset_check_evaluation`` writes it (``serialized``: the event as stored)."""
    evaluation = event.get_dagster_event().event_specific_data
    target = evaluation.target_materialization_data
    passed = AssetCheckExecutionRecordStatus.SUCCEEDED
    return {
        "asset_key": evaluation.asset_key.to_string(),
        "check_name": evaluation.check_name,
        "partition": evaluation.partition,
        "run_id": event.run_id,
        "execution_status": (
            passed if evaluation.passed else AssetCheckExecutionRecordStatus.FAILED
        ).value,
        "evaluation_event": serialized,
        "evaluation_event_timestamp": _timestamp(event),
        "evaluation_event_storage_id": event_id,
        "materialization_event_storage_id": target.storage_id if target else None,
    }


def _planned_rows(event: EventLogEntry, serialized: str, event_id: int) -> list[dict[str, object]]:
    """The ``asset_check_executions`` rows of a planned check, one per partition, as Dagster's
    ``_store_asset_check_evaluation_planned`` writes them."""
    planned = event.get_dagster_event().event_specific_data
    subset = planned.partitions_subset
    return [
        {
            "asset_key": planned.asset_key.to_string(),
            "check_name": planned.check_name,
            "partition": partition,
            "run_id": event.run_id,
            "execution_status": AssetCheckExecutionRecordStatus.PLANNED.value,
            "evaluation_event": serialized,
            "evaluation_event_timestamp": _timestamp(event),
            "evaluation_event_storage_id": event_id,
        }
        for partition in (subset.get_partition_keys() if subset else [None])
    ]


def _timestamp(event: EventLogEntry) -> datetime:
    """An event's time as Dagster stores it in PostgreSQL: UTC, without a time zone."""
    return datetime.fromtimestamp(event.timestamp, UTC).replace(tzinfo=None)


UPDATE_PLANNED = (
    "UPDATE asset_check_executions AS t SET execution_status = g.status, "
    "evaluation_event = g.event, evaluation_event_timestamp = g.at, "
    "evaluation_event_storage_id = g.event_id, materialization_event_storage_id = g.target "
    "FROM unnest(CAST(:asset_keys AS text[]), CAST(:checks AS text[]), CAST(:runs AS text[]), "
    "CAST(:partitions AS text[]), CAST(:statuses AS text[]), CAST(:events AS text[]), "
    "CAST(:ats AS timestamp[]), CAST(:event_ids AS bigint[]), CAST(:targets AS bigint[])) "
    "AS g (asset_key, check_name, run_id, partition, status, event, at, event_id, target) "
    "WHERE t.asset_key = g.asset_key AND t.check_name = g.check_name AND t.run_id = g.run_id "
    "AND {partition} RETURNING g.event_id"
)
"""The planned rows of a batch of evaluations (same asset, check, run and partition) turned into
their results: one statement, its values bound as arrays (one text to plan, whatever the size).
Partitions are matched with ``=`` when every evaluation has one: the join then runs on the
unique index's four columns. ``IS NOT DISTINCT FROM`` (for unpartitioned checks) only filters
after the other three, a run's every partition for each evaluation: 0.2 s per 1,000 evaluations
of a 366-partition run, growing with the run."""


def _update_planned(conn, rows: Sequence[dict[str, object]]) -> set[int]:
    """Apply ``UPDATE_PLANNED``; returns the storage ids of the evaluations it found."""

    def column(name: str) -> list[object]:
        return [row[name] for row in rows]

    partitioned = all(row["partition"] is not None for row in rows)
    match = (
        "t.partition = g.partition"
        if partitioned
        else "t.partition IS NOT DISTINCT FROM g.partition"
    )
    found = conn.execute(
        db.text(UPDATE_PLANNED.format(partition=match)),
        {
            "asset_keys": column("asset_key"),
            "checks": column("check_name"),
            "runs": column("run_id"),
            "partitions": column("partition"),
            "statuses": column("execution_status"),
            "events": column("evaluation_event"),
            "ats": column("evaluation_event_timestamp"),
            "event_ids": column("evaluation_event_storage_id"),
            "targets": column("materialization_event_storage_id"),
        },
    )
    return {int(event_id) for (event_id,) in found}

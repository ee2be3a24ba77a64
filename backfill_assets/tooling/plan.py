"""``backfill-assets plan``: what a backfill would do and how long it would take, writing nothing.

Reads only: the source's rows per partition (the guard's own one-statement measurement), the rows
each partition holds now (what its snapshot will keep), the assets downstream that will be
rebuilt, and a duration estimated from history: the median seconds per partition of the table's
recent writes (audit trail) and the median overhead of the recent runs that wrote it (Dagster's run
records minus their writes' time). The estimate is the runs, in waves of the run queue's
concurrency, plus the daemon's pickup (its backfill loop ticks every 30 s: 15 s on average).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import psycopg
from dagster import AssetKey, AssetSelection, DagsterInstance, Definitions

from backfill_assets.core.contract import (
    ContractError,
    SourceNotReady,
    check_contract,
    check_target,
)
from backfill_assets.core.database import relation_exists
from backfill_assets.core.guards import measured_sources, target_rows_all
from backfill_assets.core.registry import Registry
from backfill_assets.core.run_sizing import write_history

DAEMON_PICKUP_S = 1.0
"""Wait for the backfill daemon's next pass: ``backfill-assets daemon`` passes every second
(Dagster's own ``dagster-daemon`` every 30 s, ~15 s on average)."""
UNMEASURED_RUN_OVERHEAD_S = 15.0
UNMEASURED_PARTITION_S = 0.05


@dataclass
class TablePlan:
    table: str
    partitions: list[str]
    source_rows: dict[str, int]
    current_rows: dict[str, int]
    partitions_per_run: int
    seconds_per_partition: float
    measured_writes: int

    @property
    def runs(self) -> int:
        return math.ceil(len(self.partitions) / self.partitions_per_run)


@dataclass
class Plan:
    assets: list[str]
    downstream: list[str]
    tables: list[TablePlan]
    concurrency: int
    run_overhead_s: float
    measured_runs: int
    notes: list[str] = field(default_factory=list)
    readers: list[str] = field(default_factory=list)
    """Every asset built from the selected ones, rebuilt by this backfill or not: its numbers
    change now (rebuilt) or at its next rebuild."""
    owners: dict[str, list[str]] = field(default_factory=dict)
    """Owners of the selected assets and of the readers, by asset."""

    @property
    def tell(self) -> list[str]:
        """Whom to tell before launching: every owner of what will change, once."""
        return sorted({owner for owners in self.owners.values() for owner in owners})

    @property
    def runs(self) -> int:
        return max((t.runs for t in self.tables), default=1)

    @property
    def estimated_s(self) -> float:
        """Runs in waves of the queue's concurrency; each wave a run's overhead and writes."""
        waves = math.ceil(self.runs / max(self.concurrency, 1))
        writes = sum(
            t.seconds_per_partition * min(t.partitions_per_run, len(t.partitions))
            for t in self.tables
        )
        return DAEMON_PICKUP_S + waves * (self.run_overhead_s + writes)

    def as_json(self) -> dict[str, object]:
        return {
            "assets": self.assets,
            "downstream": self.downstream,
            "runs": self.runs,
            "concurrency": self.concurrency,
            "estimated_s": round(self.estimated_s, 1),
            "run_overhead_s": round(self.run_overhead_s, 2),
            "measured_runs": self.measured_runs,
            "tables": [
                {
                    "table": t.table,
                    "partitions": len(t.partitions),
                    "first": t.partitions[0],
                    "last": t.partitions[-1],
                    "partitions_per_run": t.partitions_per_run,
                    "seconds_per_partition": round(t.seconds_per_partition, 4),
                    "measured_writes": t.measured_writes,
                    "source_rows": sum(t.source_rows.values()),
                    "snapshot_rows": sum(t.current_rows.values()),
                    "source_rows_per_partition": t.source_rows,
                }
                for t in self.tables
            ],
            "notes": self.notes,
            "readers": self.readers,
            "owners": self.owners,
            "tell": self.tell,
        }

    def lines(self) -> list[str]:
        out = [f"plan: {', '.join(self.assets)}"]
        if self.downstream:
            out.append(f"  rebuilds downstream: {', '.join(self.downstream)}")
        stale = [r for r in self.readers if r not in self.downstream]
        if stale:
            out.append(
                f"  not rebuilt, out of date until they are: {', '.join(stale)} (add --downstream)"
            )
        if self.tell:
            changed = [*self.assets, *self.readers]
            out.append(f"  tell first: {', '.join(self.tell)} (owners of what changes:")
            out.extend(
                f"    {asset}: {', '.join(self.owners.get(asset) or ['no owner declared'])}"
                for asset in changed
            )
            out[-1] += ")"
        for t in self.tables:
            rows = sum(t.source_rows.values())
            empty = [k for k, n in t.source_rows.items() if n == 0]
            out.append(
                f"  {t.table}: {len(t.partitions)} partitions {t.partitions[0]}..{t.partitions[-1]}"
                f", {rows:,} rows to write, {sum(t.current_rows.values()):,} rows now (kept in "
                f"snapshots), {t.runs} run(s) of up to {t.partitions_per_run} partitions"
            )
            if empty:
                out.append(f"    no rows to write for: {', '.join(empty)} (the guard will refuse)")
        basis = f"{self.measured_runs} recent runs" if self.measured_runs else "no run history yet"
        out.append(
            f"  estimated {self.estimated_s:.0f}s: {self.runs} run(s), {self.concurrency} at a "
            f"time, ~{self.run_overhead_s:.0f}s overhead each ({basis}), plus "
            f"~{DAEMON_PICKUP_S:.0f}s for the daemon to pick it up"
        )
        out.extend(f"  note: {note}" for note in self.notes)
        out.append(
            "  nothing was written; `backfill-assets launch` with the same arguments runs it"
        )
        return out


def plan(
    conn: psycopg.Connection,
    instance: DagsterInstance,
    definitions: Definitions,
    registry: Registry,
    keys: Sequence[AssetKey],
    partitions: Sequence[str],
    *,
    selected: Sequence[AssetKey],
) -> Plan:
    """The plan for ``keys`` over ``partitions``; ``selected`` is what the user named (the rest
    of ``keys`` is downstream)."""
    graph = definitions.resolve_asset_graph()
    by_path = registry.by_asset_path()
    history = write_history(conn)
    tables: list[TablePlan] = []
    notes: list[str] = []
    for key in keys:
        table = by_path.get(tuple(key.path))
        if table is None:
            continue
        try:  # the run would stop here first: so does the plan
            check_contract(conn, table)
            check_target(conn, table)
        except SourceNotReady as exc:
            raise ContractError(f"{table.qualified_name} cannot be backfilled yet: {exc}") from None
        windows = table.partitioning.windows(list(partitions))
        stats, errors = measured_sources(conn, table, windows)
        notes.extend(
            f"{table.qualified_name} {day}: its SQL fails ({error}); the guard will refuse it"
            for day, error in errors.items()
        )
        per_partition = history.get(table.qualified_name)
        policy = graph.get(key).backfill_policy
        tables.append(
            TablePlan(
                table=table.qualified_name,
                partitions=list(partitions),
                source_rows={k: s.rows for k, s in stats.items()},
                current_rows=target_rows_all(conn, table, windows),
                partitions_per_run=(policy.max_partitions_per_run if policy else None) or 1,
                seconds_per_partition=per_partition[0] if per_partition else UNMEASURED_PARTITION_S,
                measured_writes=per_partition[1] if per_partition else 0,
            )
        )
        if not per_partition:
            notes.append(f"{table.qualified_name} has no recorded writes: its timing is a guess")
    overhead, measured_runs = _run_overhead(conn, instance, [t.table for t in tables])
    readers = sorted(AssetSelection.assets(*selected).downstream().resolve(graph) - set(selected))
    return Plan(
        assets=[k.to_user_string() for k in selected],
        downstream=[k.to_user_string() for k in keys if k not in selected],
        tables=tables,
        concurrency=_concurrency(instance),
        run_overhead_s=overhead,
        measured_runs=measured_runs,
        notes=notes,
        readers=[k.to_user_string() for k in readers],
        owners={
            k.to_user_string(): list(graph.get(k).owners)
            for k in [*selected, *readers]
            if graph.get(k).owners
        },
    )


def _run_overhead(
    conn: psycopg.Connection, instance: DagsterInstance, tables: list[str]
) -> tuple[float, int]:
    """Median seconds a recent run that wrote these tables spent outside its writes."""
    if not tables or not relation_exists(conn, "backfill_audit", "backfill_runs"):
        return UNMEASURED_RUN_OVERHEAD_S, 0
    runs = conn.execute(
        "SELECT dagster_run_id, sum(extract(epoch FROM ended_at - started_at)) FROM"
        " backfill_audit.backfill_runs WHERE table_name = ANY(%s) AND status = 'succeeded'"
        " AND dagster_run_id IS NOT NULL GROUP BY dagster_run_id ORDER BY max(id) DESC LIMIT 20",
        [tables],
    ).fetchall()
    overheads = []
    for run_id, db_seconds in runs:
        record = instance.get_run_record_by_id(run_id)
        if record is None or record.start_time is None or record.end_time is None:
            continue
        overheads.append(max(record.end_time - record.start_time - float(db_seconds), 0.0))
    if not overheads:
        return UNMEASURED_RUN_OVERHEAD_S, 0
    return statistics.median(overheads), len(overheads)


def _concurrency(instance: DagsterInstance) -> int:
    """Runs in progress at once: dagster.yaml's ``concurrency.runs`` (or the run coordinator's)."""
    queue = instance.get_concurrency_config().run_queue_config
    return queue.max_concurrent_runs if queue and queue.max_concurrent_runs > 0 else 1

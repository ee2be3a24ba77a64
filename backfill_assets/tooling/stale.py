"""Which written partitions a backfill should redo, and why: what ``backfill-assets stale`` reports.

Two kinds of reason, from two places:

- **source changed** (late-arriving rows, corrections upstream): for a declared table, the
  audited checksum of the partition's latest write differs from what the table's SQL yields now
  (``core.staleness``; it reads the source, not Dagster).
- **code changed**, or an upstream partition rewritten since: Dagster's own stale status of the
  partition, the one the UI shows as "Unsynced" on the asset's Partitions tab. A declared table's
  code version changes with its SQL or its columns (``TableSpec.sql_hash``); a dbt model's with
  its SQL (dagster-dbt hashes the raw code). Any partitioned asset has this one, dbt models too.

A partition neither audited nor materialized is *never written*: listed apart, never launched.
"""

from __future__ import annotations

from dataclasses import dataclass

from dagster import AssetKey, DagsterInstance, Definitions

from backfill_assets.core.database import connect
from backfill_assets.core.registry import Registry
from backfill_assets.core.staleness import staleness
from backfill_assets.defs.dagster_internals import (
    StaleCause,
    StaleCauseCategory,
    StaleStatus,
    stale_status_resolver,
)
from backfill_assets.tooling.launch import partition_keys


@dataclass(frozen=True)
class StalePartition:
    key: str
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class StaleReport:
    asset: AssetKey
    first: str
    last: str
    written: int
    stale: list[StalePartition]
    never_written: list[str]

    def lines(self) -> list[str]:
        head = (
            f"{self.asset.to_user_string()} {self.first}..{self.last}: {len(self.stale)} of "
            f"{self.written} written partition(s) are stale"
        )
        body = [f"  {s.key}: {'; '.join(s.reasons)}" for s in self.stale]
        if self.never_written:
            never = self.never_written
            body.append(f"  never written: {len(never)} ({never[0]}..{never[-1]}), not counted")
        return [head, *body]


def describe(cause: StaleCause) -> str:
    """One stale cause in the words of a backfill: what changed since the partition was written."""
    if cause.category == StaleCauseCategory.CODE:
        return "code changed since it was written (new code version)"
    if cause.dependency is not None:
        upstream = cause.dependency.asset_key.to_user_string()
        day = f" {cause.dependency.partition_key}" if cause.dependency.partition_key else ""
        return f"upstream {upstream}{day} was rewritten since"
    return cause.reason


def find_stale(
    instance: DagsterInstance,
    definitions: Definitions,
    registry: Registry,
    asset: AssetKey,
    first: str | None,
    last: str | None,
    data_url: str,
) -> StaleReport:
    """The partitions of ``asset`` from ``first`` to ``last`` (default: all) that are stale, with
    every reason found; refuses an unpartitioned asset or a key outside its range."""
    node = definitions.resolve_asset_graph().get(asset)
    if node.partitions_def is None:
        raise ValueError(
            f"{asset.to_user_string()} is not partitioned; stale compares partitions: "
            "materialize it whole instead"
        )
    every = node.partitions_def.get_partition_keys()
    first, last = first or every[0], last or every[-1]
    keys = partition_keys(definitions, asset, first, last)
    reasons: dict[str, list[str]] = {key: [] for key in keys}
    written: set[str] = set()
    table = registry.by_asset_path().get(tuple(asset.path))
    if table is not None:
        with connect(data_url, limits=table.timeouts.session()) as conn:
            for found in staleness(conn, table, table.partitioning.windows(keys)):
                if found.never_written:
                    continue
                written.add(found.partition_key)
                if found.changed:
                    same = found.written_rows == found.source_rows
                    reasons[found.partition_key].append(
                        f"source changed: {found.written_rows} rows written, the source yields "
                        f"{found.source_rows}"
                        + (" with other values (their checksum differs)" if same else "")
                    )
    resolver = stale_status_resolver(instance, definitions.resolve_asset_graph())
    for key in keys:
        if resolver.get_status(asset, key) == StaleStatus.MISSING:
            continue
        written.add(key)
        reasons[key].extend(describe(c) for c in resolver.get_stale_causes(asset, key))
    return StaleReport(
        asset=asset,
        first=first,
        last=last,
        written=len(written),
        stale=[StalePartition(k, tuple(reasons[k])) for k in keys if reasons[k]],
        never_written=[k for k in keys if k not in written],
    )

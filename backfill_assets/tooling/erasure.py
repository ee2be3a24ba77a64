"""``backfill-assets erase``: one person's rows out of every table, mart and snapshot, as a
backfill, with a record that proves it and holds nothing about them.

The order matters. The source must no longer yield the person (checked per partition before
anything is launched, or a rewrite would put them back). Then, per declared table with a
``subject_column``, one asset backfill of exactly the partitions that hold the person in the
table or in a mart built from it (dbt ``meta: {subject_column: ...}``), the marts included, with
the intended-shrink override and the reason. Only after those writes are the snapshots purged:
each rewrite snapshots the rows it replaced, the person's among them. Last, one transaction
counts the person's rows in every relation checked and, finding none, stores the record; it
holds back for the throttle and a pause like a write, and a lock it is not granted in time is
retried as a write's is.
Re-running after a failure continues from what remains.
"""

from __future__ import annotations

from collections.abc import Callable

import psycopg
from dagster import AssetKey, DagsterInstance, DagsterRunStatus, Definitions

from backfill_assets.core import snapshots
from backfill_assets.core.control import hold_back
from backfill_assets.core.database import connect
from backfill_assets.core.erasure import (
    ErasureError,
    ErasureRecord,
    SubjectRelation,
    exists,
    holds,
    record_erasure,
    remaining,
    snapshot_relations,
    source_still_yields,
    subject_rows,
    subject_type,
)
from backfill_assets.core.params import ALLOW_SHRINK, LAUNCHED_BY, REASON
from backfill_assets.core.partition_write import explained
from backfill_assets.core.registry import Registry
from backfill_assets.core.session_limits import snapshots_of
from backfill_assets.core.tables import TableSpec
from backfill_assets.core.throttle import ThrottleTimeout
from backfill_assets.core.writer import with_lock_retries
from backfill_assets.project import ensure_manifest
from backfill_assets.tooling.launch import asset_selection, launch_asset_backfill, wait_for_backfill


def model_subjects(manifest: dict) -> dict[tuple[str, str], SubjectRelation]:
    """dbt models whose ``meta`` names a ``subject_column``, by their relation (= asset path)."""
    found = {}
    for node in manifest["nodes"].values():
        column = (node.get("config", {}).get("meta") or {}).get("subject_column")
        if node.get("resource_type") == "model" and column:
            relation = (node["schema"], node.get("alias") or node["name"])
            found[relation] = SubjectRelation(*relation, column, node["config"].get("event_time"))
    return found


def erase(
    instance: DagsterInstance,
    definitions: Definitions,
    registry: Registry,
    data_url: str,
    subject: str,
    reason: str,
    requested_by: str,
    *,
    echo: Callable[[str], None] = print,
    timeout_s: float = 3600,
) -> int:
    """Erase the person; returns the id of the erasure record. Raises ErasureError, having
    launched nothing, when the source still holds them or a value is wrong."""
    declared = [t for t in registry if t.subject_column]
    if not declared:
        raise ErasureError(
            "no declared table names a subject_column (the column naming the person a row is "
            "about); add one to the tables that hold people's rows"
        )
    models = model_subjects(ensure_manifest(registry))
    plans: list[tuple[TableSpec, list[AssetKey], list[str]]] = []
    relations: list[SubjectRelation] = []
    tables: list[TableSpec] = []
    skipped: list[str] = []
    if not subject.strip():
        raise ErasureError("--subject is empty; give the person's value in the subject columns")
    with connect(data_url) as conn:
        for table in declared:
            kind = subject_type(table)
            if not holds(conn, kind, subject):
                skipped.append(
                    f"{table.qualified_name}: skipped, its {table.subject_column} is a {kind} "
                    f"and cannot hold {subject!r}"
                )
                continue
            # Any partition, written or not: a later backfill of one would bring them back.
            still = source_still_yields(conn, table, table.partitioning.all_keys(), subject)
            if still:
                shown = ", ".join(f"{k} ({n})" for k, n in list(still.items())[:5])
                raise ErasureError(
                    f"the source of {table.qualified_name} still yields {sum(still.values())} "
                    f"row(s) about the person, in {len(still)} partition(s): {shown}; erase them "
                    f"at the source first (it reads {', '.join(table.upstream) or 'its SQL'}), "
                    "then run erase again. Nothing was launched."
                )
            keys = asset_selection(definitions, [table.asset_name], downstream=True)
            marts = [models[tuple(k.path)] for k in keys if tuple(k.path) in models]
            days: set[str] = set()
            for relation in [SubjectRelation.of(table), *marts]:
                days |= set(subject_rows(conn, relation, subject, table.partitioning))
            outside = sorted(d for d in days if not table.partitioning.contains_key(d))
            if outside:
                raise ErasureError(
                    f"{table.qualified_name} (or a mart built from it) holds the person's rows "
                    f"outside its partitions ({', '.join(outside[:5])}); no backfill reaches "
                    "them: delete them by hand, then run erase again. Nothing was launched."
                )
            tables.append(table)
            relations += [SubjectRelation.of(table), *marts]
            plans.append((table, keys, sorted(days)))
        if not tables:
            columns = ", ".join(
                f"{t.qualified_name}.{t.subject_column} ({subject_type(t)})" for t in declared
            )
            raise ErasureError(
                f"--subject {subject!r} fits no subject column: {columns}; give the person's "
                "value as those columns hold it"
            )
        before = {r.qualified_name: sum(subject_rows(conn, r, subject).values()) for r in relations}
    for line in skipped:
        echo(line)

    backfill_ids = []
    tags = {REASON: reason, LAUNCHED_BY: requested_by, ALLOW_SHRINK: "true"}
    for table, keys, held in plans:
        if not held:
            echo(f"{table.qualified_name}: no partition holds the person")
            continue
        backfill_id = launch_asset_backfill(
            instance, keys, held[0], held[-1], tags=tags, definitions=definitions, only=held
        )
        backfill_ids.append(backfill_id)
        names = ", ".join(k.to_user_string() for k in keys)
        echo(
            f"{table.qualified_name}: rewriting {len(held)} partition(s) ({names}), "
            f"backfill {backfill_id}"
        )
        progress = wait_for_backfill(
            instance, backfill_id, timeout_s=timeout_s, on_progress=lambda p: echo(p.line())
        )
        statuses = progress.runs.values()
        if not statuses or any(s != DagsterRunStatus.SUCCESS for s in statuses):
            raise ErasureError(
                f"backfill {backfill_id} did not rewrite every partition ({progress.line()}); "
                f"see `backfill-assets status {backfill_id}`, fix the cause, then run erase "
                "again (it continues from what remains). No erasure was recorded."
            )

    limits = snapshots_of(t.timeouts for t in tables)

    def purge_and_record() -> int:
        """The snapshots' purge, the final count and the record, in one transaction, after the
        throttle and the pause switch (of the erasure's backfills, or ``--all``), as a write."""
        hold_back(conn, tables, backfill_ids or [None], echo)
        return _purge_and_record(conn, tables, relations, before, subject, record_fields, echo)

    record_fields = {"reason": reason, "requested_by": requested_by, "backfill_ids": backfill_ids}
    with connect(data_url, limits=limits) as conn:
        try:
            return with_lock_retries(purge_and_record, tables[0], "snapshot purge", echo)
        except (psycopg.errors.LockNotAvailable, ThrottleTimeout) as exc:
            raise ErasureError(
                f"the snapshots' purge did not run: {explained(exc, tables[0])}. The rewrites are "
                "done; run erase again to purge and record (nothing of the purge was kept)"
            ) from None


def _purge_and_record(conn, tables, relations, before, subject, record_fields, echo) -> int:
    with conn.transaction():
        purged = snapshots.erase_subject(conn, tables, subject)
        kept = [r for t in tables for r in snapshot_relations(conn, t)]
        checked = [r for r in relations + kept if exists(conn, r)]
        left = remaining(conn, checked, subject)
        if left:
            where = ", ".join(f"{name} ({rows})" for name, rows in left.items())
            raise ErasureError(
                f"rows about the person remain after the rewrites: {where}; nothing of this "
                "check was recorded (the snapshots' purge is rolled back with it)"
            )
        checked_names = {r.qualified_name for r in checked}
        record = ErasureRecord(
            **record_fields,
            rows_erased={
                **{n: c for n, c in before.items() if n in checked_names},
                **{f"snapshots of {n}": c for n, c in purged.items()},
            },
            relations_checked=sorted(checked_names),
        )
        erasure_id = record_erasure(conn, record)
    echo(
        f"erasure {erasure_id}: no row about the person remains in "
        f"{len(record.relations_checked)} relation(s); rows removed: "
        + ", ".join(f"{n} {c}" for n, c in record.rows_erased.items())
    )
    return erasure_id

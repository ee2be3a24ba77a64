"""Reconciliation after the write, inside the partition's transaction, before it commits.

The new rows are verified where they will live (row count against the source, unique key,
required columns, measure sums) while the transaction is still open: a blocking failure rolls the
partition back, so a wrong partition is never committed and downstream models never read it. The
before/after diff compares the deleted rows (kept by the writer: in the snapshot, or a temporary
table) with the new ones and raises a WARN when numbers shift more than the table allows. All of
it is one statement per partition.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import psycopg
from psycopg import sql

from backfill_assets.core.fingerprint import (
    ROW_HASH,
    Fingerprint,
    checksum_of,
    row_text,
    sums_of,
)
from backfill_assets.core.outcomes import CheckOutcome, SourceStats
from backfill_assets.core.params import BackfillParams
from backfill_assets.core.partitioning import PartitionWindow
from backfill_assets.core.table_keys import KeysElsewhere, keys_elsewhere
from backfill_assets.core.tables import TableSpec


@dataclass(frozen=True)
class PartitionDiff:
    rows_added: int
    rows_removed: int
    rows_changed: int
    sums_before: dict[str, Decimal]
    sums_after: dict[str, Decimal]

    def moved_fraction(self, rows_before: int) -> float:
        return (self.rows_added + self.rows_removed + self.rows_changed) / max(rows_before, 1)

    def sum_shift(self, measure: str) -> float:
        before, after = self.sums_before[measure], self.sums_after[measure]
        return float(abs(after - before) / abs(before)) if before else (1.0 if after else 0.0)

    def as_metadata(self) -> dict[str, object]:
        deltas = {
            f"{m}_delta": float(self.sums_after[m] - self.sums_before[m]) for m in self.sums_after
        }
        return {
            "rows_added": self.rows_added,
            "rows_removed": self.rows_removed,
            "rows_changed": self.rows_changed,
            **deltas,
        }


@dataclass(frozen=True)
class Verification:
    outcomes: dict[str, CheckOutcome]
    before: Fingerprint
    after: Fingerprint
    diff: PartitionDiff
    elsewhere: KeysElsewhere | None = None
    """Keys of the new rows that other partitions hold (``unique_key_is_unique`` failed)."""

    @property
    def failed_blocking(self) -> list[str]:
        return [name for name, o in self.outcomes.items() if not o.passed and o.severity == "ERROR"]

    def failure_details(self) -> str:
        """``check: message`` of each failed blocking check, for errors and the audit."""
        return "; ".join(f"{n}: {self.outcomes[n].message}" for n in self.failed_blocking)

    def changes(self) -> dict[str, object]:
        """What the write changed, as the audit keeps it (column ``changes``) for the backfill
        report: rows added, removed and changed by key, and each measure's sum over the whole
        partition before and after (decimal strings: exact)."""
        return {
            "measures": list(self.after.sums),
            "rows_added": self.diff.rows_added,
            "rows_removed": self.diff.rows_removed,
            "rows_changed": self.diff.rows_changed,
            "sums_before": {m: str(v) for m, v in self.before.sums.items()},
            "sums_after": {m: str(v) for m, v in self.after.sums.items()},
        }


def verify(
    conn: psycopg.Connection,
    table: TableSpec,
    window: PartitionWindow,
    source: SourceStats,
    params: BackfillParams,
    previous: sql.Composable,
    current: sql.Composable | None = None,
) -> Verification:
    """Evaluate every after-write check on the uncommitted partition: one statement, and one
    lookup of the new rows' keys in the table's other partitions (``table_keys``).

    ``previous`` is a relation shaped like the table holding the partition's old rows (the rows
    the DELETE removed, or the partition a swap replaces); ``current`` the one holding the new
    rows (default: the table). Each side is read once (materialized CTEs);
    fingerprints, measure sums, NULL counts, duplicated keys and the keyed diff are all computed
    from those two reads, with no sort (the checksum is order-independent).
    """
    measures = [sql.Identifier(m) for m in table.measures]
    carried = sql.SQL("").join(sql.SQL(", {}").format(m) for m in measures)
    sums = sql.SQL("").join(sql.SQL(", sum({})").format(m) for m in measures)
    nulls = sql.SQL("").join(
        sql.SQL(", count(*) FILTER (WHERE {} IS NULL)").format(sql.Identifier(c))
        for c in table.required_columns
    )
    key = sql.SQL("ROW({})::text").format(
        sql.SQL(", ").join(sql.Identifier(k) for k in table.unique_key)
    )
    side = sql.SQL(
        "SELECT k, r, {row_hash} AS h{carried}{required} FROM "
        "(SELECT {key} AS k, {row} AS r{carried}{required} FROM {rel}) AS side"
    )
    required = sql.SQL("").join(
        sql.SQL(", {}").format(sql.Identifier(c))
        for c in table.required_columns
        if c not in table.measures
    )
    row_hash = ROW_HASH.format(row_text=sql.SQL("r"))
    query = sql.SQL(
        "WITH o AS MATERIALIZED ({old}), n AS MATERIALIZED ({new}) "
        "SELECT * FROM "
        "(SELECT count(*), {checksum}{sums} FROM o) AS before, "
        "(SELECT count(*), {checksum}{sums}{nulls} FROM n) AS after, "
        "(SELECT count(*), coalesce(sum(c), 0) FROM "
        "  (SELECT count(*) AS c FROM n GROUP BY k HAVING count(*) > 1) AS d) AS dup, "
        "(SELECT count(*) FILTER (WHERE o.k IS NULL), count(*) FILTER (WHERE n.k IS NULL), "
        "  count(*) FILTER (WHERE o.k IS NOT NULL AND n.k IS NOT NULL AND o.r <> n.r) "
        "  FROM o FULL JOIN n ON o.k = n.k) AS diff"
    ).format(
        old=side.format(
            key=key,
            row=row_text(table),
            row_hash=row_hash,
            carried=carried,
            required=sql.SQL(""),
            rel=sql.SQL("{} AS t WHERE {}").format(previous, table.window_filter()),
        ),
        new=side.format(
            key=key,
            row=row_text(table),
            row_hash=row_hash,
            carried=carried,
            required=required,
            rel=sql.SQL("{} AS t WHERE {}").format(
                current or table.identifier, table.window_filter()
            ),
        ),
        checksum=checksum_of(sql.SQL("h")),
        sums=sums,
        nulls=nulls,
    )
    values = list(conn.execute(query, window.as_params()).fetchone())
    m, r = len(table.measures), len(table.required_columns)

    def take(count: int) -> list:
        taken = values[:count]
        del values[:count]
        return taken

    rows_before, checksum_before, *sums_before = take(2 + m)
    rows_after, checksum_after, *rest = take(2 + m + r)
    sums_after, null_counts = rest[:m], rest[m:]
    duplicated_keys, rows_with_duplicates = take(2)
    added, removed, changed = take(3)
    before = Fingerprint(rows_before, checksum_before, sums_of(table, sums_before))
    after = Fingerprint(rows_after, checksum_after, sums_of(table, sums_after))
    diff = PartitionDiff(
        rows_added=added,
        rows_removed=removed,
        rows_changed=changed,
        sums_before=before.sums,
        sums_after=after.sums,
    )
    elsewhere = keys_elsewhere(conn, table, window, current)
    outcomes = {
        "rows_match_source": CheckOutcome(
            after.rows == source.rows,
            {"source_rows": source.rows, "target_rows": after.rows},
            message=f"the partition holds {after.rows} rows, the source {source.rows}"
            + (
                f" (does {table.sql_source} return rows outside the window, not filtered on"
                f" %(start)s <= {table.partition_column} < %(end)s?)"
                if source.rows > after.rows
                else ""
            ),
        ),
        "unique_key_is_unique": unique_outcome(
            table, duplicated_keys, int(rows_with_duplicates), window, elsewhere
        ),
        "required_columns_not_null": not_null_outcome(table, null_counts),
        "measures_reconcile": measures_outcome(table, source, diff),
        "change_within_threshold": change_outcome(table, before, diff, params),
    }
    return Verification(outcomes, before, after, diff, elsewhere)


def unique_outcome(
    table: TableSpec,
    duplicated_keys: int,
    rows: int,
    window: PartitionWindow | None = None,
    elsewhere: KeysElsewhere | None = None,
) -> CheckOutcome:
    """No key twice in the partition, nor (``elsewhere``) in another partition of the table."""
    metadata: dict[str, object] = {
        "unique_key": ", ".join(table.unique_key),
        "duplicated_keys": duplicated_keys,
        "rows_with_duplicated_keys": rows,
        "keys_in_other_partitions": elsewhere.count if elsewhere else 0,
    }
    problems = []
    if duplicated_keys:
        problems.append(
            f"{duplicated_keys} values of ({', '.join(table.unique_key)}) occur more than once"
        )
    if elsewhere and window:
        metadata["other_partitions"] = ", ".join(elsewhere.partitions[:20])
        metadata["keys_held_elsewhere"] = ", ".join(elsewhere.keys)
        problems.append(f"{elsewhere.describe(table, window)}; {elsewhere.advice(window)}")
    return CheckOutcome(not problems, metadata, message="; ".join(problems))


def not_null_outcome(table: TableSpec, counts: list[int]) -> CheckOutcome:
    if not table.required_columns:
        return CheckOutcome(True, {"required_columns": ""})
    nulls = dict(zip(table.required_columns, counts, strict=True))
    offending = {c: n for c, n in nulls.items() if n}
    return CheckOutcome(
        not offending,
        {f"nulls_in_{c}": n for c, n in nulls.items()},
        message=", ".join(f"{n} NULLs in {c}" for c, n in offending.items()),
    )


def measures_outcome(table: TableSpec, source: SourceStats, diff: PartitionDiff) -> CheckOutcome:
    tolerance = Decimal(str(table.sum_tolerance))
    gaps = {m: abs(diff.sums_after[m] - source.sums[m]) for m in table.measures}
    off = {m: gap for m, gap in gaps.items() if gap > tolerance}
    metadata: dict[str, object] = {"tolerance": table.sum_tolerance}
    for m in table.measures:
        metadata[f"{m}_source"] = float(source.sums[m])
        metadata[f"{m}_target"] = float(diff.sums_after[m])
    return CheckOutcome(
        not off,
        metadata,
        message=", ".join(f"sum({m}) differs from the source by {gap}" for m, gap in off.items()),
    )


def change_outcome(
    table: TableSpec, before: Fingerprint, diff: PartitionDiff, params
) -> CheckOutcome:
    metadata: dict[str, object] = {
        **diff.as_metadata(),
        "rows_before": before.rows,
        "warn_above": params.diff_warn,
    }
    if before.rows == 0:
        return CheckOutcome(True, metadata | {"note": "first write of this partition"}, "WARN")
    shifts = {"rows": diff.moved_fraction(before.rows)}
    shifts |= {f"sum({m})": diff.sum_shift(m) for m in table.measures}
    over = {name: shift for name, shift in shifts.items() if shift > params.diff_warn}
    metadata |= {f"shift_{name}": round(value, 4) for name, value in shifts.items()}
    return CheckOutcome(
        not over,
        metadata,
        severity="WARN",
        message=", ".join(f"{name} moved {value:.1%}" for name, value in over.items()),
    )

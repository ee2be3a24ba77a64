"""Reconciliation after the write, inside the partition's transaction, before it commits.

The new rows are verified where they will live (row count against the source, unique key,
required columns, measure sums) while the transaction is still open: a blocking failure rolls the
partition back, so a wrong partition is never committed and downstream models never read it. The
before/after diff compares the deleted rows (kept by the writer: in the snapshot, or a temporary
table) with the new ones and raises a WARN when numbers shift more than the table allows. All of
it is one statement per partition.
"""

from __future__ import annotations

from collections.abc import Mapping
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
from backfill_assets.core.table_keys import (
    ELSEWHERE_COLUMNS,
    KeysElsewhere,
    elsewhere_of,
    found_elsewhere,
)
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
    bound: Mapping[str, object] | None = None,
) -> Verification:
    """Evaluate every after-write check on the uncommitted partition, in one statement.

    ``previous`` is a relation shaped like the table holding the partition's old rows (the rows
    the DELETE removed, or the partition a swap replaces); ``current`` the one holding the new
    rows (default: the table); ``bound``, values of their placeholders. Each side is read once
    (materialized CTEs) and each row's text hashed once: fingerprints, measure sums, NULL
    counts, duplicated keys, the keyed diff (a row changed when its hash did) and the lookup of
    the new keys in the table's other partitions (``table_keys``) all come from those two
    reads, with no sort (the checksum is order-independent). Only what the checks need is
    carried (the keys, the hash, the measures and required columns, under generated names), not
    the rows' text.
    """
    keys = [sql.Identifier(k) for k in table.unique_key]
    measures = [sql.Identifier(m) for m in table.measures]
    required = [sql.Identifier(c) for c in table.required_columns]
    # The CTEs hold generated names only: no table's own column can clash with h, c or k0.
    key_as = [sql.Identifier(f"k{i}") for i in range(len(keys))]
    measure_as = [sql.Identifier(f"m{i}") for i in range(len(measures))]
    null_as = [sql.Identifier(f"q{i}") for i in range(len(required))]

    def side(relation: sql.Composable, with_required: bool) -> sql.Composed:
        columns = [
            *(sql.SQL("{} AS {}").format(c, a) for c, a in zip(keys, key_as, strict=True)),
            sql.SQL("{} AS h").format(ROW_HASH.format(row_text=row_text(table, "t"))),
            *(sql.SQL("{} AS {}").format(c, a) for c, a in zip(measures, measure_as, strict=True)),
        ]
        if with_required:
            nulls_of = zip(required, null_as, strict=True)
            columns += [sql.SQL("{} IS NULL AS {}").format(c, a) for c, a in nulls_of]
        return sql.SQL("SELECT {} FROM {} AS t WHERE {}").format(
            sql.SQL(", ").join(columns), relation, table.window_filter()
        )

    sums = sql.SQL("").join(sql.SQL(", sum({})").format(a) for a in measure_as)
    nulls = sql.SQL("").join(sql.SQL(", count(*) FILTER (WHERE {})").format(a) for a in null_as)
    same_key = sql.SQL(" AND ").join(sql.SQL("o.{a} = n.{a}").format(a=a) for a in key_as)
    named_back = zip(key_as, keys, strict=True)
    new_keys = sql.SQL("(SELECT DISTINCT {} FROM n)").format(
        sql.SQL(", ").join(sql.SQL("{} AS {}").format(a, c) for a, c in named_back)
    )
    query = sql.SQL(
        "WITH o AS MATERIALIZED ({old}), n AS MATERIALIZED ({new}), {found} "
        "SELECT * FROM "
        "(SELECT count(*), {checksum}{sums} FROM o) AS before, "
        "(SELECT count(*), {checksum}{sums}{nulls} FROM n) AS after, "
        "(SELECT count(*), coalesce(sum(c), 0) FROM "
        "  (SELECT count(*) AS c FROM n GROUP BY {k} HAVING count(*) > 1) AS d) AS dup, "
        "(SELECT count(*) FILTER (WHERE o.h IS NULL), count(*) FILTER (WHERE n.h IS NULL), "
        "  count(*) FILTER (WHERE o.h <> n.h) FROM o FULL JOIN n ON {same_key}) AS diff, "
        "(SELECT {elsewhere}) AS elsewhere"
    ).format(
        old=side(previous, with_required=False),
        new=side(current or table.identifier, with_required=True),
        found=found_elsewhere(conn, table, new_keys),
        checksum=checksum_of(sql.SQL("h")),
        sums=sums,
        nulls=nulls,
        k=sql.SQL(", ").join(key_as),
        same_key=same_key,
        elsewhere=ELSEWHERE_COLUMNS,
    )
    values = list(conn.execute(query, {**window.as_params(), **(bound or {})}).fetchone())
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
    elsewhere = elsewhere_of(table, take(3))
    before = Fingerprint(rows_before, checksum_before, sums_of(table, sums_before))
    after = Fingerprint(rows_after, checksum_after, sums_of(table, sums_after))
    diff = PartitionDiff(
        rows_added=added,
        rows_removed=removed,
        rows_changed=changed,
        sums_before=before.sums,
        sums_after=after.sums,
    )
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

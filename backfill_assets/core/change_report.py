"""What a backfill changed, partition by partition: the numbers analysts read after it.

Every successful write stores in its audit row what it changed (``changes``: rows added, removed
and changed by key, each measure's sum over the partition before and after; measured inside the
write's transaction by the reconciliation, ``reconcile.Verification.changes``). This module reads
them back for one backfill and renders them: Markdown (the partition's ``changes`` metadata in
the UI, the CLI's summary) and a standalone HTML page with, per table and measure, a chart of the
sum before and after per partition. Nothing is recomputed: the page shows what the audit holds.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from decimal import Decimal

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from backfill_assets.core.audit import TABLE as AUDIT_TABLE
from backfill_assets.core.audit import ensure_audit_table


@dataclass(frozen=True)
class PartitionChange:
    table_name: str
    partition_key: str
    status: str
    """succeeded | failed | guard_failed | running: the latest attempt within the backfill."""
    rows_before: int | None
    rows_after: int | None
    rows_added: int | None
    rows_removed: int | None
    rows_changed: int | None
    sums_before: dict[str, Decimal]
    sums_after: dict[str, Decimal]
    """Each in the declared order of the measures (jsonb does not keep keys' order)."""
    reason: str | None
    launched_by: str
    sql_hash: str
    code_version: str
    error: str | None = None

    @classmethod
    def of(cls, row: dict) -> PartitionChange:
        changes = row.get("changes") or {}
        order = changes.get("measures") or list(changes.get("sums_after", {}))
        before, after = changes.get("sums_before", {}), changes.get("sums_after", {})
        return cls(
            table_name=row["table_name"],
            partition_key=row["partition_key"],
            status=row["status"],
            rows_before=row.get("rows_before"),
            rows_after=row.get("rows_after"),
            rows_added=changes.get("rows_added"),
            rows_removed=changes.get("rows_removed"),
            rows_changed=changes.get("rows_changed"),
            sums_before={m: Decimal(before[m]) for m in order if m in before},
            sums_after={m: Decimal(after[m]) for m in order if m in after},
            reason=row.get("reason"),
            launched_by=row["launched_by"],
            sql_hash=row["sql_hash"],
            code_version=row["code_version"],
            error=row.get("error"),
        )

    @property
    def measures(self) -> list[str]:
        return list(self.sums_after)

    def as_json(self) -> dict[str, object]:
        return {
            "table": self.table_name,
            "partition": self.partition_key,
            "status": self.status,
            "rows_before": self.rows_before,
            "rows_after": self.rows_after,
            "rows_added": self.rows_added,
            "rows_removed": self.rows_removed,
            "rows_changed": self.rows_changed,
            "sums_before": {m: str(v) for m, v in self.sums_before.items()},
            "sums_after": {m: str(v) for m, v in self.sums_after.items()},
            "error": self.error,
        }


def backfill_changes(conn: psycopg.Connection, backfill_id: str) -> list[PartitionChange]:
    """The latest audit row of each (table, partition) the backfill wrote or tried to."""
    ensure_audit_table(conn)
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            sql.SQL(
                "SELECT DISTINCT ON (table_name, partition_key) * FROM {} WHERE backfill_id = %s "
                "ORDER BY table_name, partition_key, id DESC"
            ).format(AUDIT_TABLE),
            [backfill_id],
        ).fetchall()
    return [PartitionChange.of(row) for row in rows]


def _number(value: Decimal | int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _cell(text: str) -> str:
    """Text safe in a Markdown table cell or line: one line, no column separator."""
    return " ".join(text.split()).replace("|", "\\|")


def _delta(before: Decimal, after: Decimal) -> str:
    moved = after - before
    return "±0" if not moved else f"{moved:+,}"


def _by_table(changes: list[PartitionChange]) -> dict[str, list[PartitionChange]]:
    tables: dict[str, list[PartitionChange]] = {}
    for change in changes:
        tables.setdefault(change.table_name, []).append(change)
    return tables


def _provenance(changes: list[PartitionChange]) -> list[tuple[str, str]]:
    def values(attribute: str) -> str:
        found = sorted({str(getattr(c, attribute) or "-") for c in changes})
        return ", ".join(found)

    return [
        ("reason", values("reason")),
        ("launched by", values("launched_by")),
        ("table code (sql hash)", values("sql_hash")),
        ("project code (git)", values("code_version")),
    ]


def markdown(changes: list[PartitionChange], *, heading: str | None = None) -> str:
    """A Markdown summary: who, why, which code, then per table one line per partition."""
    lines = [f"### {heading}", ""] if heading else []
    if not changes:
        return (
            "\n".join(
                [
                    *lines,
                    "This backfill wrote no declared table (the dbt models it rebuilt are not in "
                    "the report; their checks are per partition in the UI).",
                ]
            )
            + "\n"
        )
    lines += [f"**{name}:** {_cell(value)}  " for name, value in _provenance(changes)]
    for table, rows in _by_table(changes).items():
        measures = next((row.measures for row in rows if row.measures), [])
        lines += ["", f"**{table}**", ""]
        head = ["partition", "status", "rows before → after", "added", "removed", "changed"]
        head += [f"sum({m}) before → after (Δ)" for m in measures]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in rows:
            cells = [
                row.partition_key,
                row.status if not row.error else f"{row.status}: {row.error}",
                f"{_number(row.rows_before)} → {_number(row.rows_after)}",
                _number(row.rows_added),
                _number(row.rows_removed),
                _number(row.rows_changed),
            ]
            for m in measures:
                if m in row.sums_after:
                    before, after = row.sums_before[m], row.sums_after[m]
                    cells.append(f"{before:,} → {after:,} ({_delta(before, after)})")
                else:
                    cells.append("")
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _chart(title: str, keys: list[str], before: list[float], after: list[float]) -> str:
    """An inline SVG line chart of two series over the partitions; no script, no network."""
    width, height, left, bottom, top = 760, 220, 90, 40, 24
    values = before + after
    low, high = min(values), max(values)
    if high == low:
        low, high = low - 1, high + 1
    step = (width - left - 20) / max(len(keys) - 1, 1)

    def point(i: int, v: float) -> tuple[float, float]:
        y = top + (height - top - bottom) * (1 - (v - low) / (high - low))
        return left + i * step, y

    def series(vs: list[float], colour: str, name: str, dash: str) -> str:
        pts = [point(i, v) for i, v in enumerate(vs)]
        line = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        dots = "".join(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"><title>'
            f"{html.escape(keys[i])} {name}: {vs[i]:,}</title></circle>"
            for i, (x, y) in enumerate(pts)
        )
        return (
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" stroke-dasharray="{dash}" '
            f'points="{line}"/>{dots}'
        )

    axis_y = height - bottom

    def label(v: float) -> str:
        return f"{v:,.0f}" if float(v).is_integer() else f"{v:,.2f}"

    labels = (
        f'<text x="{left - 6}" y="{top + 4}" text-anchor="end">{label(high)}</text>'
        f'<text x="{left - 6}" y="{axis_y}" text-anchor="end">{label(low)}</text>'
        f'<text x="{left}" y="{axis_y + 18}">{html.escape(keys[0])}</text>'
    )
    if len(keys) > 1:
        labels += (
            f'<text x="{width - 20}" y="{axis_y + 18}" text-anchor="end">'
            f"{html.escape(keys[-1])}</text>"
        )
    return (
        f'<figure><figcaption>{html.escape(title)}: <span class="before">before</span> / '
        f'<span class="after">after</span></figcaption>'
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{html.escape(title)}">'
        f'<line x1="{left}" y1="{axis_y}" x2="{width - 20}" y2="{axis_y}" stroke="#999"/>'
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{axis_y}" stroke="#999"/>{labels}'
        f"{series(before, '#8a8a8a', 'before', '6 4')}{series(after, '#1f6feb', 'after', '')}"
        "</svg></figure>"
    )


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 980px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { margin: 1em 0; } svg text { font-size: 11px; fill: #555; }
.before { color: #8a8a8a; } .after { color: #1f6feb; } .bad { color: #b42318; }
"""


def html_page(backfill_id: str, changes: list[PartitionChange]) -> str:
    """A standalone page: provenance, then per table a chart per measure (and of its rows)
    before vs after per partition, and the numbers as a table."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Backfill {html.escape(backfill_id)}</title><style>{STYLE}</style></head><body>",
        f"<h1>Backfill {html.escape(backfill_id)}</h1><dl>",
    ]
    for name, value in _provenance(changes):
        parts.append(f"<dt>{html.escape(name)}</dt><dd>{html.escape(value)}</dd>")
    parts.append("</dl>")
    if not changes:
        parts.append("<p>This backfill left no audit rows: it wrote no declared table.</p>")
    for table, rows in _by_table(changes).items():
        written = [r for r in rows if r.status == "succeeded"]
        parts.append(f"<h2>{html.escape(table)}</h2>")
        parts.append(
            f"<p>{len(written)} of {len(rows)} partition(s) written; rows added "
            f"{sum(r.rows_added or 0 for r in written):,}, removed "
            f"{sum(r.rows_removed or 0 for r in written):,}, changed "
            f"{sum(r.rows_changed or 0 for r in written):,}.</p>"
        )
        keys = [r.partition_key for r in written]
        if keys:
            parts.append(
                _chart(
                    "rows",
                    keys,
                    [float(r.rows_before or 0) for r in written],
                    [float(r.rows_after or 0) for r in written],
                )
            )
            for m in written[0].measures:
                parts.append(
                    _chart(
                        f"sum({m})",
                        keys,
                        [float(r.sums_before.get(m, 0)) for r in written],
                        [float(r.sums_after.get(m, 0)) for r in written],
                    )
                )
        measures = written[0].measures if written else []
        head = ["partition", "status", "rows before", "rows after", "added", "removed", "changed"]
        head += [f"{label} {m}" for m in measures for label in ("before", "after")]
        parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>")
        for r in rows:
            status = html.escape(r.status + (f": {r.error}" if r.error else ""))
            cells = [
                html.escape(r.partition_key),
                f"<span class='bad'>{status}</span>" if r.status != "succeeded" else status,
                _number(r.rows_before),
                _number(r.rows_after),
                _number(r.rows_added),
                _number(r.rows_removed),
                _number(r.rows_changed),
            ]
            for m in measures:
                cells += [_number(r.sums_before.get(m)), _number(r.sums_after.get(m))]
            parts.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)

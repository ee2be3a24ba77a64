"""The table registry: one YAML declaration per table, beside the SQL that computes it.

Adding a table is one ``tables/<name>.yaml`` and one ``tables/<name>.sql``; the asset, its checks,
its backfill jobs, rollback, snapshot expiry and the CLI's choices all derive from what is loaded
here. A declaration is data a user edits without touching package code, so every mistake in it is
reported with the file, the field and what is allowed, before anything runs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import cache
from pathlib import Path

import yaml

from backfill_assets.core.partitioning import GRANULARITIES, HOUR_KEY_FORMAT, Partitioning
from backfill_assets.core.run_sizing import MAX_PER_RUN
from backfill_assets.core.settings import REPO_ROOT
from backfill_assets.core.strategies import DEFAULT as DEFAULT_STRATEGY
from backfill_assets.core.strategies import NAMES as STRATEGIES
from backfill_assets.core.strategies import all_strategies
from backfill_assets.core.strategies import get as strategy_named
from backfill_assets.core.tables import Column, TableSpec, ThrottleLimits, Timeouts

TABLES_PATH_ENV = "BACKFILL_TABLES_PATH"
DEFAULT_TABLES_DIR = REPO_ROOT / "tables"

KEYS = {
    "table": "schema.name of the table to build (required)",
    "description": "what a row is, for the UI",
    "strategy": "how a partition is written",
    "sql": "the SQL file, relative to the YAML (default: same name, .sql)",
    "upstream": "schema.table of every table the SQL reads",
    "partitions": "column, every (hour | day | week | month), start, optional end (exclusive)",
    "columns": "name: type, in order; 'type not null' or {type, not_null, check}",
    "unique_key": "column(s) that identify a row",
    "measures": "numeric columns whose sums must reconcile with the source",
    "subject_column": "column naming the person a row is about (erasure)",
    "owners": "who answers for the table: emails or team:NAME (the UI shows them; plan names them)",
    "thresholds": "max_shrink, diff_warn, sum_tolerance",
    "snapshots": "keep (true | false), retention_days",
    "partitions_per_run": "partitions one backfill run writes (default: sized from the audit)",
    "timeouts": "lock (5s), statement (30min), lock_retries (8): limits of every write statement",
    "throttle": "pause, max_busy, max_lock_waiters, max_transaction_age, "
    "max_active_connections, max_replica_lag, max_wait: when writes hold back",
}
PARTITION_KEYS = ("column", "every", "start", "end")
THRESHOLD_KEYS = ("max_shrink", "diff_warn", "sum_tolerance")
SNAPSHOT_KEYS = ("keep", "retention_days")
TIMEOUT_KEYS = ("lock", "statement", "lock_retries")
THROTTLE_KEYS = (
    "pause",
    "max_busy",
    "max_lock_waiters",
    "max_transaction_age",
    "max_active_connections",
    "max_replica_lag",
    "max_wait",
)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|min|h)?\s*$")
_UNIT_MS = {"ms": 1, "s": 1_000, "min": 60_000, "h": 3_600_000}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")
_OWNER = re.compile(r"^(team:\S+|[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,7})$")
"""Dagster's two kinds of owner (``dagster._core.utils.is_valid_email``'s pattern for emails)."""
_NOT_NULL = re.compile(r"\s+not\s+null\s*$", re.IGNORECASE)


class DeclarationError(ValueError):
    """A table declaration that cannot be used; the message names the file and the field."""


def keys() -> dict[str, str]:
    """Every key a declaration may have, with its help text: ``KEYS``, with ``strategy``
    listing the strategies, and after it their own blocks (``batched_update:``)."""
    strategies = all_strategies()
    described = " | ".join(f"{s.name} ({s.summary})" for s in strategies)
    own = {key: text for s in strategies for key, text in s.declaration_keys.items()}
    ordered = list(KEYS.items())
    at = list(KEYS).index("strategy")
    return dict([*ordered[:at], ("strategy", described), *own.items(), *ordered[at + 1 :]])


@dataclass(frozen=True)
class Registry:
    tables: tuple[TableSpec, ...]

    def __iter__(self) -> Iterator[TableSpec]:
        return iter(self.tables)

    def __len__(self) -> int:
        return len(self.tables)

    @property
    def names(self) -> list[str]:
        return [table.qualified_name for table in self.tables]

    def table(self, qualified_name: str | None) -> TableSpec:
        """The spec of ``schema.table``; with one table declared, ``None`` means that one."""
        if not qualified_name and len(self.tables) == 1:
            return self.tables[0]
        for table in self.tables:
            if table.qualified_name == qualified_name:
                return table
        known = ", ".join(self.names) or "none (add a YAML file to tables/)"
        if not qualified_name:
            raise ValueError(f"name a table; the declared tables are: {known}")
        raise ValueError(f"unknown table {qualified_name!r}; the declared tables are: {known}")

    def by_asset_path(self) -> dict[tuple[str, str], TableSpec]:
        return {table.asset_path: table for table in self.tables}


def tables_dirs() -> list[Path]:
    """Where declarations are read: ``BACKFILL_TABLES_PATH`` (``:``-separated), else ``tables/``."""
    value = os.environ.get(TABLES_PATH_ENV)
    if not value:
        return [DEFAULT_TABLES_DIR]
    return [Path(part).resolve() for part in value.split(os.pathsep) if part]


def load_registry(dirs: list[Path] | None = None) -> Registry:
    """The declared tables, parsed once per process until a declaration or its SQL changes: an
    edited query is a new code version, which ``stale`` and the next run must see."""
    found = tuple(dirs or tables_dirs())
    return _load(found, _edits(found))


def _edits(dirs: tuple[Path, ...]) -> tuple[tuple[str, int], ...]:
    return tuple(
        sorted(
            (str(path), path.stat().st_mtime_ns)
            for directory in dirs
            if directory.is_dir()
            for path in directory.rglob("*")
            if path.suffix in {".yaml", ".yml", ".sql"} and path.is_file()
        )
    )


@cache
def _load(dirs: tuple[Path, ...], _edits: tuple[tuple[str, int], ...]) -> Registry:
    tables: dict[str, tuple[TableSpec, Path]] = {}
    for directory in dirs:
        if not directory.is_dir():
            raise DeclarationError(
                f"{directory} is not a directory; {TABLES_PATH_ENV} lists folders of table "
                f"declarations (one YAML file and one SQL file per table) separated by "
                f"{os.pathsep!r}, not commas"
            )
        for path in sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml")):
            table = parse_declaration(path)
            if table.qualified_name in tables:
                raise DeclarationError(
                    f"{path}: table {table.qualified_name} is already declared in "
                    f"{tables[table.qualified_name][1]}; keep one declaration per table"
                )
            tables[table.qualified_name] = (table, path)
    return Registry(tuple(table for table, _ in tables.values()))


def parse_declaration(path: Path) -> TableSpec:
    """A ``TableSpec`` from one YAML file; any problem is a ``DeclarationError`` naming it."""
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, ValueError) as exc:
        # PyYAML raises ValueError for a date-shaped value that is no date (2019-13-01).
        raise DeclarationError(f"{path}: not readable as YAML ({exc})") from None
    try:
        return _spec(path, document)
    except DeclarationError as exc:
        raise DeclarationError(f"{path}: {exc}") from None


def _spec(path: Path, doc: object) -> TableSpec:
    doc = _mapping(doc, "the file", keys())
    schema, name = _qualified(_required(doc, "table"), "table")
    partitions = _mapping(_required(doc, "partitions"), "partitions", PARTITION_KEYS)
    columns = _columns(_required(doc, "columns"))
    column_names = [column.name for column in columns]

    def known_columns(field: str, names: list[str]) -> tuple[str, ...]:
        unknown = [n for n in names if n not in column_names]
        if unknown:
            raise DeclarationError(
                f"{field}: {', '.join(unknown)} not among the columns ({', '.join(column_names)})"
            )
        return tuple(names)

    every = str(partitions.get("every", "day"))
    if every not in GRANULARITIES:
        raise DeclarationError(
            f"partitions.every: {every!r} is not one of {', '.join(GRANULARITIES)}"
        )
    column = known_columns("partitions.column", [str(_required(partitions, "column"))])[0]
    read = _hour if every == "hour" else _date
    zoned = every == "hour" and _hour_column_zoned(columns, column)
    try:
        partitioning = Partitioning(
            column=column,
            granularity=every,
            start=read(_required(partitions, "start"), "partitions.start"),
            end=read(partitions["end"], "partitions.end") if partitions.get("end") else None,
            zoned=zoned,
        )
    except ValueError as exc:
        raise DeclarationError(f"partitions: {exc}") from None

    declared = str(doc.get("strategy") or DEFAULT_STRATEGY)
    if declared not in STRATEGIES:
        raise DeclarationError(f"strategy: {declared!r} is not one of {', '.join(STRATEGIES)}")
    strategy = strategy_named(declared)
    unique_key = known_columns("unique_key", _names(_required(doc, "unique_key"), "unique_key"))
    for other in all_strategies():
        for key in other.declaration_keys:
            if other is not strategy and doc.get(key) is not None:
                raise DeclarationError(
                    f"{key}: only for strategy: {other.name} (add that key, or remove this block)"
                )
    written = strategy.read_declaration(
        Declaration(path, doc, columns, column, unique_key, known_columns)
    )
    measures = known_columns("measures", _names(doc.get("measures") or [], "measures"))
    subject = doc.get("subject_column")
    if subject is not None:
        known_columns("subject_column", [str(subject)])
    thresholds = _mapping(doc.get("thresholds") or {}, "thresholds", THRESHOLD_KEYS)
    snapshots = _mapping(doc.get("snapshots") or {}, "snapshots", SNAPSHOT_KEYS)
    upstream = tuple(
        ".".join(_qualified(entry, "upstream"))
        for entry in _names(doc.get("upstream") or [], "upstream")
    )
    return TableSpec(
        schema=schema,
        name=name,
        partitioning=partitioning,
        columns=columns,
        unique_key=unique_key,
        description=str(doc.get("description") or ""),
        upstream=upstream,
        declared_in=path,
        measures=measures,
        subject_column=str(subject) if subject is not None else None,
        max_shrink=_fraction(thresholds, "max_shrink", 0.5),
        diff_warn=_fraction(thresholds, "diff_warn", 0.1),
        sum_tolerance=_number(thresholds, "sum_tolerance", 0.01),
        snapshots=_flag(snapshots, "keep", True),
        snapshot_retention_days=_days(snapshots, "retention_days", 30),
        partitions_per_run=_per_run(doc.get("partitions_per_run")),
        timeouts=_timeouts(doc.get("timeouts") or {}),
        throttle=_throttle(doc.get("throttle") or {}),
        strategy=declared,
        **written,
        owners=_owners(doc.get("owners") or []),
    )


def _owners(value: object) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    odd = [item for item in items if not isinstance(item, str)]
    if odd:
        raise DeclarationError(
            f"owners: {odd[0]!r} is not an email or team:NAME; write each owner as a string, "
            "e.g. owners: [team:finance, ana@example.com]"
        )
    owners = list(dict.fromkeys(_names(value, "owners")))  # once each, in order
    for owner in owners:
        if not _OWNER.match(owner):
            raise DeclarationError(
                f"owners: {owner!r} is neither an email address nor a team (team:NAME), the two "
                "kinds of owner Dagster shows"
            )
    return tuple(owners)


def _throttle(value: object) -> ThrottleLimits:
    doc = _mapping(value, "throttle", THROTTLE_KEYS)
    default = ThrottleLimits()
    day = 24 * 3_600_000
    return ThrottleLimits(
        pause_ms=_duration(doc, "pause", default.pause_ms, 0, 3_600_000, "throttle"),
        max_lock_waiters=_count(doc, "max_lock_waiters", default.max_lock_waiters),
        max_transaction_age_ms=_duration(
            doc, "max_transaction_age", default.max_transaction_age_ms, 1_000, day, "throttle"
        ),
        max_active_connections=_count(doc, "max_active_connections", 0),
        max_replica_lag_ms=_duration(
            doc, "max_replica_lag", default.max_replica_lag_ms, 1_000, day, "throttle"
        ),
        max_wait_ms=_duration(doc, "max_wait", default.max_wait_ms, 1_000, day, "throttle"),
        max_busy=_share(doc, "max_busy", default.max_busy),
    )


def _share(doc: Mapping, key: str, default: float) -> float:
    """A share of wall time: a number in (0, 1] (``0.3``) or a percentage (``30%``)."""
    value = doc.get(key, default)
    share: float | None = None
    if isinstance(value, str):
        text = value.strip()
        try:
            share = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            share = None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        share = float(value)
    if share is None or not 0.01 <= share <= 1:
        raise DeclarationError(
            f"throttle.{key}: {value!r} is not a share of the run's wall time between 0.01 and 1 "
            "(e.g. 0.3 or 30%: its writes take at most that share, it waits the rest)"
        )
    return share


def _count(doc: Mapping, key: str, default: int) -> int:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100_000:
        raise DeclarationError(f"throttle.{key}: {value!r} is not a whole number 0..100000")
    return value


def _timeouts(value: object) -> Timeouts:
    doc = _mapping(value, "timeouts", TIMEOUT_KEYS)
    default = Timeouts()
    retries = doc.get("lock_retries", default.lock_retries)
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 100:
        raise DeclarationError(f"timeouts.lock_retries: {retries!r} is not a whole number 0..100")
    return Timeouts(
        lock_ms=_duration(doc, "lock", default.lock_ms, low_ms=10, high_ms=600_000),
        statement_ms=_duration(doc, "statement", default.statement_ms, 1_000, 24 * 3_600_000),
        lock_retries=retries,
    )


def _duration(
    doc: Mapping, key: str, default_ms: int, low_ms: int, high_ms: int, block: str = "timeouts"
) -> int:
    """A duration such as ``250ms``, ``5s``, ``2min``, ``1h`` (a bare number is seconds)."""
    if key not in doc:
        return default_ms
    value = doc[key]
    match = _DURATION.match(str(value)) if not isinstance(value, bool) else None
    if match is None:
        raise DeclarationError(
            f"{block}.{key}: {value!r} is not a duration such as 250ms, 5s, 2min or 1h"
        )
    ms = round(float(match.group(1)) * _UNIT_MS[match.group(2) or "s"])
    if not low_ms <= ms <= high_ms:
        raise DeclarationError(
            f"{block}.{key}: {value!r} is outside {low_ms} ms .. {high_ms // 1000} s"
        )
    return ms


def _mapping(value: object, field: str, allowed) -> Mapping:
    if not isinstance(value, Mapping):
        raise DeclarationError(f"{field} must be a mapping of keys to values")
    unknown = [str(k) for k in value if k not in allowed]
    if unknown:
        raise DeclarationError(
            f"unknown key(s) {', '.join(unknown)} in {field}; allowed: {', '.join(allowed)}"
        )
    return value


def _required(doc: Mapping, key: str) -> object:
    if doc.get(key) in (None, "", [], {}):
        hint = keys().get(key, "")
        raise DeclarationError(f"{key} is missing" + (f" ({hint})" if hint else ""))
    return doc[key]


def _qualified(value: object, field: str) -> tuple[str, str]:
    parts = str(value).split(".")
    if len(parts) != 2 or not all(_NAME.match(p) for p in parts):
        raise DeclarationError(f"{field}: {value!r} is not schema.table (e.g. analytics.orders)")
    return parts[0], parts[1]


def _names(value: object, field: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise DeclarationError(f"{field} must be a name or a list of names")
    return list(items)


def _columns(value: object) -> tuple[Column, ...]:
    if not isinstance(value, Mapping):
        raise DeclarationError("columns must map each column name to its type, in order")
    columns = []
    for name, spec in value.items():
        if not _NAME.match(str(name)):
            raise DeclarationError(f"columns: {name!r} is not a plain column name")
        if isinstance(spec, str):
            nullable = _NOT_NULL.search(spec) is None
            columns.append(Column(str(name), _NOT_NULL.sub("", spec).strip(), nullable))
            continue
        spec = _mapping(spec, f"columns.{name}", ("type", "not_null", "check"))
        if not spec.get("type"):
            raise DeclarationError(f"columns.{name}: type is missing (e.g. bigint, date, text)")
        columns.append(
            Column(
                str(name),
                str(spec["type"]),
                nullable=not _flag(spec, "not_null", False),
                check=str(spec["check"]) if spec.get("check") else None,
            )
        )
    return tuple(columns)


_TIMESTAMP = re.compile(r"^timestamp(\s*\(\d\))?(\s+without\s+time\s+zone)?$", re.I)
_TIMESTAMPTZ = re.compile(
    r"^(timestamptz(\s*\(\d\))?|timestamp(\s*\(\d\))?\s+with\s+time\s+zone)$", re.I
)


def _hour_column_zoned(columns: tuple[Column, ...], name: str) -> bool:
    """Whether an hourly table's partition column is a ``timestamptz`` (else a ``timestamp``);
    any other type is refused: an hour's window is a range of times."""
    declared = next(c.type for c in columns if c.name == name).strip()
    if _TIMESTAMPTZ.match(declared):
        return True
    if _TIMESTAMP.match(declared):
        return False
    raise DeclarationError(
        f"partitions.column: {name} is {declared}, but hourly partitions need a timestamp or "
        f"timestamptz column (declare columns.{name}: timestamptz)"
    )


def _hour(value: object, field: str) -> datetime:
    """A UTC hour as a naive datetime: ``2024-03-01 13:00``, ``2024-03-01T13:00:00Z``, a
    Dagster key ``2024-03-01-13:00`` or a date (its midnight); an offset is converted to UTC."""
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, date):
        return datetime(value.year, value.month, value.day)
    else:
        text = str(value).strip()
        try:
            parsed = datetime.strptime(text, HOUR_KEY_FORMAT)
        except ValueError:
            try:
                parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                raise DeclarationError(
                    f"{field}: {value!r} is not a time (YYYY-MM-DD HH:00, in UTC)"
                ) from None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed


def _date(value: object, field: str) -> date:
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        raise DeclarationError(f"{field}: {value!r} is not a date (YYYY-MM-DD)") from None


def _flag(doc: Mapping, key: str, default: bool) -> bool:
    value = doc.get(key, default)
    if not isinstance(value, bool):
        raise DeclarationError(f"{key}: {value!r} is not true or false")
    return value


def _number(doc: Mapping, key: str, default: float) -> float:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise DeclarationError(f"{key}: {value!r} is not a number of at least 0")
    return float(value)


def _fraction(doc: Mapping, key: str, default: float) -> float:
    value = _number(doc, key, default)
    if value > 1:
        raise DeclarationError(f"{key}: {value!r} is not a fraction between 0 and 1")
    return value


def _per_run(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PER_RUN:
        raise DeclarationError(
            f"partitions_per_run: {value!r} is not a whole number from 1 to {MAX_PER_RUN}; "
            "leave it out to size runs from the measured cost of a partition"
        )
    return value


def _days(doc: Mapping, key: str, default: int) -> int:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 36500:
        raise DeclarationError(f"{key}: {value!r} is not a whole number of days (1 to 36500)")
    return value


@dataclass(frozen=True)
class Declaration:
    """One declaration as its strategy reads its own fields from it (``Strategy.read_declaration``),
    with the readers the rest of the declaration uses, so that a strategy's mistakes read like
    any other field's."""

    path: Path
    doc: Mapping
    columns: tuple[Column, ...]
    partition_column: str
    unique_key: tuple[str, ...]
    _known_columns: Callable[[str, list[str]], tuple[str, ...]]

    def known_columns(self, field: str, names: list[str]) -> tuple[str, ...]:
        return self._known_columns(field, names)

    def sql_file(self) -> Path:
        sql_path = self.path.parent / str(self.doc.get("sql") or f"{self.path.stem}.sql")
        if not sql_path.is_file():
            raise DeclarationError(
                f"sql: {sql_path} does not exist; write the SELECT that yields one window's rows "
                "there"
            )
        return sql_path

    @staticmethod
    def mapping(value: object, field: str, allowed) -> Mapping:
        """``value`` as a mapping with only ``allowed`` keys (anything with ``in``)."""
        return _mapping(value, field, allowed)

    @staticmethod
    def required(doc: Mapping, key: str) -> object:
        return _required(doc, key)

    @staticmethod
    def flag(doc: Mapping, key: str, default: bool) -> bool:
        return _flag(doc, key, default)

    @staticmethod
    def duration(
        doc: Mapping, key: str, default_ms: int, low_ms: int, high_ms: int, block: str
    ) -> int:
        """A duration such as ``250ms``, ``5s``, ``2min``, ``1h`` in milliseconds."""
        return _duration(doc, key, default_ms, low_ms, high_ms, block)

    @staticmethod
    def is_name(text: str) -> bool:
        """A plain SQL name (a column's)."""
        return bool(_NAME.match(text))

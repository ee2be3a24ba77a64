"""How one table is partitioned, and the windows (of dates, or of UTC hours) every writer works in.

Each table declares its own partitioning (column, hour, day, week from Monday or month, first
partition, optional end), so a 1990s order-lines table and this year's orders live side by side.
Hours are UTC, as Dagster's hourly keys are (``2024-03-01-13:00``); their column is a ``timestamp``
(read as UTC wall-clock time) or a ``timestamptz``, and their windows are bound as values of that
type (naive, or timezone-aware UTC), so a window holds the same rows whatever the session's
``TimeZone``. Days, weeks and months are windows of ``date``s. This module
knows nothing of Dagster: it turns keys into half-open windows and refuses keys outside the
table's own range, naming that range. The Dagster layer builds the matching partitions definition
from the same object (``defs/partitions.py``), and a test keeps the two in agreement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Literal

from psycopg import sql

Granularity = Literal["hour", "day", "week", "month"]
GRANULARITIES: tuple[Granularity, ...] = ("hour", "day", "week", "month")
STEP_DAYS = {"day": 1, "week": 7}
"""Days from one partition to the next (a month's are counted on the calendar)."""
ADJECTIVES = {"hour": "hourly", "day": "daily", "week": "weekly", "month": "monthly"}
FIRST_DAY = {
    "hour": "the start of an hour (UTC, minutes and seconds 0)",
    "week": "a Monday",
    "month": "the first day of a month",
}
KEY_FORMAT = "%Y-%m-%d"
HOUR_KEY_FORMAT = "%Y-%m-%d-%H:%M"
"""Dagster's ``HourlyPartitionsDefinition`` keys: ``2024-03-01-13:00``, UTC."""


class UnknownPartitionError(ValueError):
    """A partition key outside the table's partitions, or a malformed or reversed range."""


@dataclass(frozen=True)
class PartitionWindow:
    """One partition as a half-open range: ``start <= value < end``, of ``date``s, or for hours
    of ``datetime``s (naive UTC for a ``timestamp`` column, timezone-aware UTC for a
    ``timestamptz`` one): the values bound as ``%(start)s`` and ``%(end)s``."""

    key: str
    start: date
    end: date

    def as_params(self) -> dict[str, date]:
        return {"start": self.start, "end": self.end}

    @property
    def bounds_type(self) -> str:
        """The PostgreSQL type of the bounds as bound: ``date``, or for an hour ``timestamp``
        (naive UTC) or ``timestamptz`` (aware)."""
        if not isinstance(self.start, datetime):
            return "date"
        return "timestamp" if self.start.tzinfo is None else "timestamptz"

    @property
    def tag(self) -> str:
        """The start in a name-safe form (``20240301``, ``2024030113`` for an hour), for the
        names of the tables a write creates."""
        return self.start.strftime("%Y%m%d%H" if isinstance(self.start, datetime) else "%Y%m%d")


def _next(day: date, granularity: Granularity) -> date:
    if granularity == "hour":
        return day + timedelta(hours=1)
    if granularity in STEP_DAYS:
        return date.fromordinal(day.toordinal() + STEP_DAYS[granularity])
    return date(day.year + day.month // 12, day.month % 12 + 1, 1)


def _previous(day: date, granularity: Granularity) -> date:
    if granularity == "hour":
        return day - timedelta(hours=1)
    if granularity in STEP_DAYS:
        return date.fromordinal(day.toordinal() - STEP_DAYS[granularity])
    return date(day.year - (day.month == 1), (day.month - 2) % 12 + 1, 1)


def _floor(day: date, granularity: Granularity) -> date:
    """The first day of the partition holding ``day``: itself, its week's Monday (ISO weeks,
    as PostgreSQL's ``date_trunc('week', ...)``), the 1st of its month; for an hour, the
    start of the hour holding the (naive UTC) datetime ``day``."""
    if granularity == "hour":
        return day.replace(minute=0, second=0, microsecond=0)
    if granularity == "day":
        return day
    if granularity == "week":
        return date.fromordinal(day.toordinal() - day.weekday())
    return day.replace(day=1)


@dataclass(frozen=True)
class Partitioning:
    """Partitions of one table: every ``granularity`` from ``start``, up to ``end`` (exclusive).

    Without ``end`` the range is open and grows with time: the last partition is the last complete
    hour, day, week or month in UTC, as Dagster's time-window partitions count it. For hours,
    ``start`` and ``end`` are naive datetimes in UTC, and ``zoned`` says the column is a
    ``timestamptz`` (its windows are bound as timezone-aware UTC datetimes).
    """

    column: str
    granularity: Granularity
    start: date
    end: date | None = None
    zoned: bool = False

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity {self.granularity!r} is not supported; use one of "
                + ", ".join(GRANULARITIES)
            )
        hourly = self.granularity == "hour"
        for name, value in (("start", self.start), ("end", self.end)):
            if value is None:
                continue
            if hourly and not isinstance(value, datetime):
                value = datetime(value.year, value.month, value.day)
                object.__setattr__(self, name, value)
            elif not hourly and isinstance(value, datetime):
                raise ValueError(
                    f"{name} {value} is a time; {self.adjective} partitions start on a date "
                    f"(e.g. {value.date()})"
                )
            if _floor(value, self.granularity) != value:
                raise ValueError(
                    f"{name} {value} is not {FIRST_DAY[self.granularity]}; "
                    f"{self.adjective} partitions start and end on {FIRST_DAY[self.granularity]} "
                    f"(e.g. {self._shown(_floor(value, self.granularity))})"
                )
        if self.end is not None and self.end <= self.start:
            raise ValueError(
                f"end {self._shown(self.end)} must come after start {self._shown(self.start)}"
            )

    def _shown(self, value: date) -> str:
        return value.strftime(self.key_format)

    @property
    def calendar(self) -> Partitioning:
        """The same partitions without the column: tables (and the dbt models built from them)
        with equal calendars share one Dagster partitions definition and backfill runs."""
        return Partitioning("", self.granularity, self.start, self.end)

    @property
    def adjective(self) -> str:
        return ADJECTIVES[self.granularity]

    @property
    def key_format(self) -> str:
        return HOUR_KEY_FORMAT if self.granularity == "hour" else KEY_FORMAT

    def first_key(self) -> str:
        return self.start.strftime(self.key_format)

    def last_start(self, today: date | None = None) -> date | None:
        """Start of the last partition; None when the range holds none yet."""
        if self.end is not None:
            stop = self.end
        else:
            now = today or datetime.now(UTC).replace(tzinfo=None)
            if self.granularity == "hour":
                if not isinstance(now, datetime):
                    now = datetime(now.year, now.month, now.day)
            elif isinstance(now, datetime):
                now = now.date()
            stop = _floor(now, self.granularity)  # the current period is not complete yet
        last = _previous(stop, self.granularity)
        return last if last >= self.start else None

    def last_key(self) -> str | None:
        last = self.last_start()
        return last.strftime(self.key_format) if last else None

    def describe(self) -> str:
        """``daily partitions from 2024-01-01 to 2024-12-31`` (both included), for messages."""
        last = self.last_key()
        if last is None:
            return f"{self.adjective} partitions from {self.first_key()} (none complete yet)"
        open_end = "" if self.end is not None else ", growing with time"
        return f"{self.adjective} partitions from {self.first_key()} to {last}{open_end}"

    def _parse(self, key: str) -> date | None:
        try:
            start = datetime.strptime(key, self.key_format)
        except (TypeError, ValueError):
            return None
        return start if self.granularity == "hour" else start.date()

    def window(self, key: str) -> PartitionWindow:
        """The window of ``key``; refuses keys outside the range before anything is touched."""
        start = self._parse(key)
        last = self.last_start()
        if (
            start is None
            or _floor(start, self.granularity) != start
            or start < self.start
            or last is None
            or start > last
        ):
            inside = start is not None and self.contains(_floor(start, self.granularity))
            raise UnknownPartitionError(
                f"unknown partition key {key!r}: the table has {self.describe()} "
                f"(keys look like {self.first_key()}); "
                + (
                    f"{key} is inside a partition but not its key: pick "
                    f"{self._shown(_floor(start, self.granularity))}"
                    if inside
                    else "pick a key in that range"
                )
            )
        end = _next(start, self.granularity)
        if self.zoned:
            start, end = start.replace(tzinfo=UTC), end.replace(tzinfo=UTC)
        return PartitionWindow(key=key, start=start, end=end)

    def contains(self, start: date) -> bool:
        """Whether a partition starting on ``start`` is one of this range's."""
        last = self.last_start()
        return last is not None and self.start <= start <= last

    def contains_key(self, key: str) -> bool:
        """Whether ``key`` is one of this range's partition keys."""
        start = self._parse(key)
        return (
            start is not None and _floor(start, self.granularity) == start and self.contains(start)
        )

    def key_of(self, value: date) -> str:
        """The key of the partition holding ``value`` (a date, or a datetime; an aware one is
        read in UTC), whether or not the range holds that partition."""
        if isinstance(value, datetime):
            if value.tzinfo is not None:
                value = value.astimezone(UTC).replace(tzinfo=None)
            if self.granularity != "hour":
                value = value.date()
        elif self.granularity == "hour":
            value = datetime(value.year, value.month, value.day)
        return _floor(value, self.granularity).strftime(self.key_format)

    def start_of(self, column: sql.Composable) -> sql.Composed:
        """SQL for the start of the partition holding ``column``'s value: a ``date`` (as
        PostgreSQL's ``date_trunc`` counts weeks and months), or for hours a ``timestamp`` in
        UTC (a ``timestamptz`` is read in UTC, not in the session's time zone); ``key_of``
        turns either into the partition's key."""
        if self.granularity == "hour":
            utc = sql.SQL("({} AT TIME ZONE 'UTC')").format(column) if self.zoned else column
            return sql.SQL("date_trunc('hour', {})").format(utc)
        return sql.SQL("date_trunc({}, {}::date)::date").format(
            sql.Literal(self.granularity), column
        )

    def windows(self, keys: Sequence[str]) -> list[PartitionWindow]:
        """Windows for ``keys``, all validated before the first one is returned."""
        return [self.window(key) for key in keys]

    def keys_between(self, first: str, last: str) -> list[str]:
        """Every key from ``first`` to ``last``, both included; both must exist, in that order."""
        start, end = self.window(first), self.window(last)
        if start.start > end.start:
            raise UnknownPartitionError(
                f"the range {first}..{last} is reversed: {first} comes after {last}; swap them"
            )
        keys, day = [], self._parse(first)
        stop = self._parse(last)
        while day <= stop:
            keys.append(day.strftime(self.key_format))
            day = _next(day, self.granularity)
        return keys

    def all_keys(self) -> list[str]:
        last = self.last_key()
        return self.keys_between(self.first_key(), last) if last else []

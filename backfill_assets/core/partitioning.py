"""How one table is partitioned, and the date windows every writer works in.

Each table declares its own partitioning (column, day, week from Monday or month, first partition,
optional end), so a 1990s order-lines table and this year's orders live side by side. This module
knows nothing of Dagster: it turns keys into half-open windows and refuses keys outside the
table's own range, naming that range. The Dagster layer builds the matching partitions definition
from the same object (``defs/partitions.py``), and a test keeps the two in agreement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Literal

Granularity = Literal["day", "week", "month"]
GRANULARITIES: tuple[Granularity, ...] = ("day", "week", "month")
STEP_DAYS = {"day": 1, "week": 7}
"""Days from one partition to the next (a month's are counted on the calendar)."""
ADJECTIVES = {"day": "daily", "week": "weekly", "month": "monthly"}
FIRST_DAY = {"week": "a Monday", "month": "the first day of a month"}
KEY_FORMAT = "%Y-%m-%d"


class UnknownPartitionError(ValueError):
    """A partition key outside the table's partitions, or a malformed or reversed range."""


@dataclass(frozen=True)
class PartitionWindow:
    """One partition as a half-open range of days: ``start <= day < end``."""

    key: str
    start: date
    end: date

    def as_params(self) -> dict[str, date]:
        return {"start": self.start, "end": self.end}


def _next(day: date, granularity: Granularity) -> date:
    if granularity in STEP_DAYS:
        return date.fromordinal(day.toordinal() + STEP_DAYS[granularity])
    return date(day.year + day.month // 12, day.month % 12 + 1, 1)


def _previous(day: date, granularity: Granularity) -> date:
    if granularity in STEP_DAYS:
        return date.fromordinal(day.toordinal() - STEP_DAYS[granularity])
    return date(day.year - (day.month == 1), (day.month - 2) % 12 + 1, 1)


def _floor(day: date, granularity: Granularity) -> date:
    """The first day of the partition holding ``day``: itself, its week's Monday (ISO weeks,
    as PostgreSQL's ``date_trunc('week', ...)``), the 1st of its month."""
    if granularity == "day":
        return day
    if granularity == "week":
        return date.fromordinal(day.toordinal() - day.weekday())
    return day.replace(day=1)


@dataclass(frozen=True)
class Partitioning:
    """Partitions of one table: every ``granularity`` from ``start``, up to ``end`` (exclusive).

    Without ``end`` the range is open and grows with time: the last partition is the last complete
    day (or month) in UTC, as Dagster's time-window partitions count it.
    """

    column: str
    granularity: Granularity
    start: date
    end: date | None = None

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity {self.granularity!r} is not supported; use one of "
                + ", ".join(GRANULARITIES)
            )
        for name, value in (("start", self.start), ("end", self.end)):
            if value is not None and _floor(value, self.granularity) != value:
                raise ValueError(
                    f"{name} {value} is not {FIRST_DAY[self.granularity]}; {self.adjective} "
                    f"partitions start and end on {FIRST_DAY[self.granularity]} (e.g. "
                    f"{_floor(value, self.granularity)})"
                )
        if self.end is not None and self.end <= self.start:
            raise ValueError(f"end {self.end} must come after start {self.start}")

    @property
    def calendar(self) -> Partitioning:
        """The same partitions without the column: tables (and the dbt models built from them)
        with equal calendars share one Dagster partitions definition and backfill runs."""
        return Partitioning("", self.granularity, self.start, self.end)

    @property
    def adjective(self) -> str:
        return ADJECTIVES[self.granularity]

    def first_key(self) -> str:
        return self.start.strftime(KEY_FORMAT)

    def last_start(self, today: date | None = None) -> date | None:
        """Start of the last partition; None when the range holds none yet."""
        if self.end is not None:
            stop = self.end
        else:
            today = today or datetime.now(UTC).date()
            stop = _floor(today, self.granularity)  # the current period is not complete yet
        last = _previous(stop, self.granularity)
        return last if last >= self.start else None

    def last_key(self) -> str | None:
        last = self.last_start()
        return last.strftime(KEY_FORMAT) if last else None

    def describe(self) -> str:
        """``daily partitions from 2024-01-01 to 2024-12-31`` (both included), for messages."""
        last = self.last_key()
        if last is None:
            return f"{self.adjective} partitions from {self.first_key()} (none complete yet)"
        open_end = "" if self.end is not None else ", growing with time"
        return f"{self.adjective} partitions from {self.first_key()} to {last}{open_end}"

    def window(self, key: str) -> PartitionWindow:
        """The window of ``key``; refuses keys outside the range before anything is touched."""
        try:
            start = datetime.strptime(key, KEY_FORMAT).date()
        except (TypeError, ValueError):
            start = None
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
                    f"{_floor(start, self.granularity).isoformat()}"
                    if inside
                    else "pick a key in that range"
                )
            )
        return PartitionWindow(key=key, start=start, end=_next(start, self.granularity))

    def contains(self, start: date) -> bool:
        """Whether a partition starting on ``start`` is one of this range's."""
        last = self.last_start()
        return last is not None and self.start <= start <= last

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
        keys, day = [], start.start
        while day <= end.start:
            keys.append(day.strftime(KEY_FORMAT))
            day = _next(day, self.granularity)
        return keys

    def all_keys(self) -> list[str]:
        last = self.last_key()
        return self.keys_between(self.first_key(), last) if last else []

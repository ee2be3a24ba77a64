"""The one daily partitions definition, and the date windows every writer works in.

All partitioned assets import ``daily_partitions`` from here, so the range that the UI offers, the
CLI validates and the writer deletes is the same everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

from dagster import DailyPartitionsDefinition

FIRST_DAY = "2024-01-01"
# Exclusive: the demo domain holds one year of orders.
END_DAY = "2025-01-01"

daily_partitions = DailyPartitionsDefinition(start_date=FIRST_DAY, end_date=END_DAY)


class UnknownPartitionError(ValueError):
    """A partition key that the daily partitions definition does not contain."""


@dataclass(frozen=True)
class PartitionWindow:
    """One partition as a half-open range of days: ``start <= day < end``."""

    key: str
    start: date
    end: date

    def as_params(self) -> dict[str, date]:
        return {"start": self.start, "end": self.end}


def all_keys() -> Sequence[str]:
    return daily_partitions.get_partition_keys()


def window(key: str) -> PartitionWindow:
    """The window of ``key``; refuses keys outside the definition before anything is touched."""
    if not daily_partitions.has_partition_key(key):
        raise UnknownPartitionError(
            f"unknown partition key {key!r}: daily partitions run from {FIRST_DAY} to "
            f"{last_key()} (YYYY-MM-DD); pick a day in that range"
        )
    time_window = daily_partitions.time_window_for_partition_key(key)
    return PartitionWindow(key=key, start=time_window.start.date(), end=time_window.end.date())


def windows(keys: Sequence[str]) -> list[PartitionWindow]:
    """Windows for ``keys``, all validated before the first one is returned."""
    return [window(key) for key in keys]


def keys_between(first: str, last: str) -> list[str]:
    """Every key from ``first`` to ``last``, both included; both must exist, in that order."""
    start, end = window(first), window(last)
    if start.start > end.start:
        raise UnknownPartitionError(
            f"the range {first}..{last} is reversed: {first} comes after {last}; swap them"
        )
    keys = all_keys()
    return list(keys[keys.index(first) : keys.index(last) + 1])


def last_key() -> str:
    return daily_partitions.get_last_partition_key() or FIRST_DAY

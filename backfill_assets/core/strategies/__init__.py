"""The write strategies, by the name a declaration gives them (``strategy:`` in its YAML).

``MODULES`` is the one place that lists them: a new strategy is a module in this folder that
implements ``base.Strategy`` and ends with ``STRATEGY = ...``, plus its line here. Nothing else
asks which strategy a table has; it asks ``strategy_of(table)`` to do the strategy's part.

A strategy's module is imported when it is first asked for, by its name: the strategies build on
the contract, the guards, snapshots and rollback, which in turn ask a table's strategy for its
part, so importing every strategy here would make each of those modules import itself.
"""

from __future__ import annotations

from functools import cache
from importlib import import_module

from backfill_assets.core.strategies.base import (
    PartitionOutcome,
    RollbackResult,
    SnapshotRef,
    Strategy,
    WriteHooks,
)
from backfill_assets.core.tables import TableSpec

__all__ = [
    "DEFAULT",
    "NAMES",
    "PartitionOutcome",
    "RollbackResult",
    "SnapshotRef",
    "Strategy",
    "WriteHooks",
    "all_strategies",
    "get",
    "strategy_of",
]

MODULES = {
    "delete_insert": "delete_insert",
    "batched_update": "batched_update",
    "partition_swap": "partition_swap",
    "merge": "merge",
}
"""Declared name -> module in this package."""
NAMES = tuple(MODULES)
DEFAULT = "delete_insert"


@cache
def get(name: str) -> Strategy:
    """The strategy declared as ``name``."""
    if name not in MODULES:
        raise ValueError(f"strategy: {name!r} is not one of {', '.join(NAMES)}")
    return import_module(f"{__name__}.{MODULES[name]}").STRATEGY


def strategy_of(table: TableSpec) -> Strategy:
    """The strategy ``table`` is declared with."""
    return get(table.strategy)


def all_strategies() -> list[Strategy]:
    return [get(name) for name in NAMES]

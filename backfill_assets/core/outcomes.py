"""What a check found about one partition, independent of how Dagster reports it."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

Severity = Literal["ERROR", "WARN"]


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    metadata: dict[str, object] = field(default_factory=dict)
    severity: Severity = "ERROR"
    message: str = ""


@dataclass(frozen=True)
class CheckDeclaration:
    """A check that every partitioned table gets; declared once in ``checks.CHECKS``."""

    name: str
    description: str
    blocking: bool


@dataclass(frozen=True)
class SourceStats:
    """The source's rows for one window, measured once by the guard and reused by the
    reconciliation."""

    rows: int
    null_keys: int
    sums: dict[str, Decimal]
    null_required: int = 0
    """Rows whose computed value of a required column is NULL (in-place updates only)."""

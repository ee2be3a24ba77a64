"""What a check found about one partition, independent of how Dagster reports it."""

from __future__ import annotations

from dataclasses import dataclass, field
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

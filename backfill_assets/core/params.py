"""Per-backfill parameters, read from run tags.

Tags are the one channel that reaches every run of a backfill from both launchers: the UI's
backfill dialog ("Add tags") and ``dagster job backfill --tags '{...}'``. Each parameter defaults
to its table spec's value; a malformed tag fails the run before anything is written.
"""

from __future__ import annotations

import getpass
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from backfill_assets.core.tables import TableSpec

PREFIX = "backfill_assets/"
ALLOW_SHRINK = PREFIX + "allow_shrink"
MAX_SHRINK = PREFIX + "max_shrink"
DIFF_WARN = PREFIX + "diff_warn"
SNAPSHOTS = PREFIX + "snapshots"
LAUNCHED_BY = PREFIX + "launched_by"
REASON = PREFIX + "reason"
"""Why the backfill runs (a sentence, a ticket): stored with every audit row it leaves."""
FULL_REBUILD = PREFIX + "full_rebuild"
"""A job backfill may select every partition of its job, or more than BACKFILL_MAX_PARTITIONS
(``defs/run_coordinator.py``)."""
KNOWN_TAGS = (ALLOW_SHRINK, MAX_SHRINK, DIFF_WARN, SNAPSHOTS, LAUNCHED_BY, REASON, FULL_REBUILD)
MAX_REASON = 500

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class ParameterError(ValueError):
    """A backfill tag that cannot be used; the message names the tag and the accepted values."""


@dataclass(frozen=True)
class BackfillParams:
    allow_shrink: bool
    max_shrink: float
    diff_warn: float
    snapshots: bool
    launched_by: str
    reason: str | None = None

    def as_json(self) -> dict[str, object]:
        return asdict(self)


def params_for(table: TableSpec, tags: Mapping[str, str]) -> BackfillParams:
    unknown = sorted(k for k in tags if k.startswith(PREFIX) and k not in KNOWN_TAGS)
    if unknown:
        raise ParameterError(
            f"unknown tag(s) {', '.join(unknown)}; known tags: {', '.join(KNOWN_TAGS)}"
        )
    return BackfillParams(
        allow_shrink=_flag(tags, ALLOW_SHRINK, False),
        max_shrink=_fraction(tags, MAX_SHRINK, table.max_shrink),
        diff_warn=_fraction(tags, DIFF_WARN, table.diff_warn),
        snapshots=_flag(tags, SNAPSHOTS, table.snapshots),
        launched_by=launched_by(tags),
        reason=reason(tags),
    )


def full_rebuild(tags: Mapping[str, str]) -> bool:
    return _flag(tags, FULL_REBUILD, False)


def reason(tags: Mapping[str, str]) -> str | None:
    """The ``backfill_assets/reason`` tag, stripped; at most ``MAX_REASON`` characters."""
    text = (tags.get(REASON) or "").strip()
    if len(text) > MAX_REASON:
        raise ParameterError(
            f"{REASON} is {len(text)} characters long; keep it to {MAX_REASON} (a sentence and a "
            "ticket id; link to the details)"
        )
    return text or None


def launched_by(tags: Mapping[str, str]) -> str:
    """Who to name in the audit: the explicit tag, else Dagster's user tag, else the OS user.

    The OS user of a daemon-launched run is the daemon's; set the tag to name a person.
    """
    return tags.get(LAUNCHED_BY) or tags.get("dagster/user") or _os_user()


def _flag(tags: Mapping[str, str], name: str, default: bool) -> bool:
    value = tags.get(name)
    if value is None:
        return default
    if value.strip().lower() in _TRUE:
        return True
    if value.strip().lower() in _FALSE:
        return False
    raise ParameterError(f"tag {name}={value!r} is not a boolean; use true or false")


def _fraction(tags: Mapping[str, str], name: str, default: float) -> float:
    value = tags.get(name)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0.0 <= number <= 1.0:
        raise ParameterError(f"tag {name}={value!r} must be a fraction between 0 and 1, e.g. 0.25")
    return number


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"

"""Progress of a run's partitions, told every few seconds rather than once per partition.

In a Dagster run every log line is an event stored in Dagster's database (a few milliseconds each,
more than writing a small partition): a line per partition made logging a visible share of a
long run. One line every ``every_s`` seconds, plus the first and the last, keeps the run log
readable and the cost flat; each partition's own numbers are in its materialization metadata.
"""

from __future__ import annotations

import time
from collections.abc import Callable

EVERY_S = 5.0


class Progress:
    """Counts written partitions and rows; ``wrote`` logs when a line is due."""

    def __init__(
        self,
        log: Callable[[str], object],
        what: str,
        total: int,
        *,
        every_s: float = EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log, self._what, self._total, self._every_s = log, what, total, every_s
        self._clock = clock
        self._started = self._logged = clock()
        self.done = 0
        self.rows = 0

    def wrote(self, partition: str, rows: int) -> None:
        self.done += 1
        self.rows += rows
        now = self._clock()
        if self.done not in (1, self._total) and now - self._logged < self._every_s:
            return
        self._logged = now
        elapsed = now - self._started
        line = (
            f"[{self.done}/{self._total}] {self._what} through {partition}: "
            f"{self.rows:,} rows in {elapsed:.1f}s"
        )
        if elapsed > 0:
            line += f" ({self.rows / elapsed:,.0f} rows/s)"
        if self.done < self._total:
            left = elapsed / self.done * (self._total - self.done)
            line += f", about {left:.0f}s left"
        self._log(line)

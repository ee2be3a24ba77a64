"""A run's progress lines: the first, the last, and one whenever the interval has passed."""

from __future__ import annotations

from backfill_assets.core.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_logs_the_first_and_last_partition_and_then_every_interval():
    clock, lines = Clock(), []
    progress = Progress(lines.append, "t", 10, every_s=5.0, clock=clock)
    for day in range(1, 11):
        clock.now += 2.0  # a partition every 2 s: a line due every third partition
        progress.wrote(f"d{day}", 100)

    assert [line.split("]")[0] + "]" for line in lines] == ["[1/10]", "[4/10]", "[7/10]", "[10/10]"]
    assert lines[0] == "[1/10] t through d1: 100 rows in 2.0s (50 rows/s), about 18s left"
    assert lines[-1] == "[10/10] t through d10: 1,000 rows in 20.0s (50 rows/s)"
    assert (progress.done, progress.rows) == (10, 1000)

"""Per-task statistics a worker keeps and reports: outcome counts and a duration histogram.

A worker process counts, per task name, what became of each finished attempt and how long it
ran. The numbers are cumulative over the process's life, so a report that is lost (a dropped
heartbeat) loses nothing: the next one carries the sum. The supervisor adds up reports from all
its children, past and present, and serves them as Prometheus metrics.

This is core code: it knows nothing of the supervisor or of Prometheus.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

#: Upper bounds (seconds) of the duration histogram's buckets; one more bucket holds the rest.
#: Spread from 5 ms to an hour: queue tasks range from quick writes to long reports.
DURATION_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)

#: The task name under which messages are counted that never named a runnable task
#: (undecodable, unknown task, bad signature): they are dead-lettered without running.
REJECTED = "<rejected>"


def _zero_buckets() -> list[int]:
    return [0] * (len(DURATION_BUCKETS) + 1)


@dataclass
class TaskStats:
    """One task's outcomes and durations, cumulative.

    Attributes:
        succeeded: attempts that succeeded.
        failed: tasks that failed for good (no retry left, or not retryable).
        retried: retries scheduled (one per failed attempt that will run again).
        dead_lettered: dead-letter copies sent (failed tasks and rejected messages).
        buckets: how many attempts ran within each :data:`DURATION_BUCKETS` bound (not
            cumulative: ``buckets[i]`` counts durations in ``(bound[i-1], bound[i]]``); the
            last entry counts longer ones.
        duration_sum: total seconds of all counted attempts.
    """

    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    buckets: list[int] = field(default_factory=_zero_buckets)
    duration_sum: float = 0.0

    @property
    def duration_count(self) -> int:
        """Attempts whose duration was observed."""
        return sum(self.buckets)

    def observe(self, seconds: float) -> None:
        """Count one attempt's duration."""
        seconds = max(seconds, 0.0)
        self.buckets[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.duration_sum += seconds

    def __add__(self, other: TaskStats) -> TaskStats:
        return TaskStats(
            self.succeeded + other.succeeded,
            self.failed + other.failed,
            self.retried + other.retried,
            self.dead_lettered + other.dead_lettered,
            [a + b for a, b in zip(self.buckets, other.buckets, strict=True)],
            self.duration_sum + other.duration_sum,
        )

    def to_wire(self) -> list[Any]:
        """A compact JSON-able form for heartbeats: counts, sum, then buckets.

        ``[succeeded, failed, retried, dead_lettered, duration_sum, b0, b1, ...]`` with trailing
        zero buckets left out, so a task that always runs fast costs a few bytes.
        """
        buckets = list(self.buckets)
        while buckets and buckets[-1] == 0:
            buckets.pop()
        head = [self.succeeded, self.failed, self.retried, self.dead_lettered]
        return [*head, round(self.duration_sum, 6), *buckets]

    @classmethod
    def from_wire(cls, values: Sequence[Any]) -> TaskStats:
        """The inverse of :meth:`to_wire`.

        Raises:
            ValueError: not a list written by :meth:`to_wire`.
        """
        if len(values) < 5 or len(values) > 5 + len(DURATION_BUCKETS) + 1:
            raise ValueError(f"task stats have {len(values)} fields")
        buckets = [int(v) for v in values[5:]]
        buckets += [0] * (len(DURATION_BUCKETS) + 1 - len(buckets))
        succeeded, failed, retried, dead_lettered = (int(v) for v in values[:4])
        return cls(succeeded, failed, retried, dead_lettered, buckets, float(values[4]))

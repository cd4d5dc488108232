"""Reproducible benchmarks: ``make bench`` (``python -m benchmarks``).

Each benchmark module (``benchmarks/worker.py``, ``supervisor.py``, ``executors.py``) exposes::

    def run(endpoint: str, *, quick: bool = False) -> Sequence[Result]

``endpoint`` is a local SQS server (fauxqs, started by ``__main__``) whose URL is also in this
process's ``AWS_ENDPOINT_URL_SQS``; ``quick`` asks for a smoke-sized run. Results are ratios
against a plain boto3 program run side by side on the same endpoint, not absolute times, which
depend on the machine; absolute figures go in ``detail``.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

#: ``BENCH_VERBOSE=1`` prints every run's absolute figures as it ends.
VERBOSE = os.environ.get("BENCH_VERBOSE", "") not in ("", "0")


@dataclass(frozen=True, slots=True)
class Result:
    """One line of the report.

    Attributes:
        name: what was measured, e.g. "throughput, ebsqs worker / plain loop".
        value: the ratio (or count) measured.
        goal: ``">= 0.9"`` or ``"<= 1.3"``, or None when there is no goal.
        detail: absolute numbers behind the ratio, shown in parentheses.
    """

    name: str
    value: float
    goal: str | None = None
    detail: str = ""

    @property
    def met(self) -> bool | None:
        """Whether the goal is met (None without a goal)."""
        if self.goal is None:
            return None
        operator, bound = self.goal.split()
        if operator == ">=":
            return self.value >= float(bound)
        if operator == "<=":
            return self.value <= float(bound)
        raise ValueError(f"goal {self.goal!r} is neither '>= x' nor '<= x'")


@dataclass(frozen=True, slots=True)
class Drain:
    """Consumers draining a queue, as seen from outside: messages, wall and CPU seconds."""

    messages: int
    seconds: float
    cpu_seconds: float

    @property
    def rate(self) -> float:
        """Messages per second."""
        return self.messages / self.seconds

    @property
    def cpu_per_1000(self) -> float:
        """CPU seconds per 1,000 messages."""
        return self.cpu_seconds * 1000 / self.messages


def report(label: str, drain: Drain) -> None:
    """With :data:`VERBOSE`, print one run's rate and CPU as it ends."""
    if VERBOSE:
        print(
            f"    {label}: {drain.rate:.0f} msg/s, {drain.cpu_per_1000:.3f} CPU s per 1,000",
            flush=True,
        )


def median_drain(drains: Sequence[Drain]) -> Drain:
    """The median wall and CPU seconds of repeated drains of the same size."""
    return Drain(
        drains[0].messages,
        statistics.median(d.seconds for d in drains),
        statistics.median(d.cpu_seconds for d in drains),
    )

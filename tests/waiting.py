"""Waiting on conditions with a deadline: tests never sleep to synchronise."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.02,
    message: str | Callable[[], str] = "condition not met",
) -> T:
    """Call ``predicate`` until it returns something truthy, and return that.

    Args:
        predicate: the condition; called at least once, even with ``timeout=0``.
        timeout: seconds before giving up.
        interval: seconds between calls.
        message: what the failure says, or a callable building it (to show the state at the
            deadline, e.g. ``lambda: f"stats: {broker.stats(q)}"``).

    Raises:
        AssertionError: the deadline passed with the predicate still false.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"{text} (waited {timeout} s)")
        time.sleep(interval)

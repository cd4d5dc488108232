"""The benchmark app: tasks that do nothing, so a run measures the machinery around them."""

from __future__ import annotations

from ebsqs import task


@task
def noop(n: int) -> None:
    """Do nothing."""


@task
def carry(n: int, data: str) -> None:
    """Do nothing with a payload."""

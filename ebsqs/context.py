"""The running attempt's context, kept in a contextvar (never on the shared task object)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TaskContext:
    """What a running task may ask about itself.

    Attributes:
        task_name: the registered name.
        task_id: the task id (the same across retries).
        message_id: the broker's id of the message being run.
        queue: the logical queue it came from.
        attempt: 1 for the first run.
        max_retries: retries allowed in all.
        deadline: epoch seconds of the hard time limit, or None.
    """

    task_name: str
    task_id: str
    message_id: str
    queue: str
    attempt: int
    max_retries: int
    deadline: float | None = None


_current: ContextVar[TaskContext | None] = ContextVar("ebsqs_task_context", default=None)


def current() -> TaskContext:
    """The context of the task running in this thread.

    Raises:
        RuntimeError: no task is running here (the function was called directly).
    """
    ctx = _current.get()
    if ctx is None:
        raise RuntimeError("no ebsqs task is running in this context")
    return ctx


def current_or_none() -> TaskContext | None:
    """The running task's context, or None outside a task."""
    return _current.get()


def enter(ctx: TaskContext) -> Token[TaskContext | None]:
    """Make ``ctx`` current; pass the token to :func:`leave` (cheaper than ``activated``)."""
    return _current.set(ctx)


def leave(token: Token[TaskContext | None]) -> None:
    """Restore the context that was current before :func:`enter`."""
    _current.reset(token)


@contextmanager
def activated(ctx: TaskContext) -> Iterator[TaskContext]:
    """Make ``ctx`` the current context for the duration of a block."""
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)

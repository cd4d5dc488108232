"""The task registry: the only names a worker will run.

A message names a task; the worker looks that name up here and nowhere else. Nothing a message
says is ever imported.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ebsqs.errors import ConfigurationError, UnknownTaskError

if TYPE_CHECKING:
    from ebsqs.task import Task


class TaskRegistry:
    """Maps stable task names to tasks."""

    def __init__(self) -> None:
        self._tasks: dict[str, Task[Any, Any]] = {}

    def register(self, task: Task[Any, Any]) -> None:
        """Add a task. Re-registering the same function (a reload) replaces it.

        Raises:
            ConfigurationError: another function already has that name.
        """
        existing = self._tasks.get(task.name)
        if existing is not None and _origin(existing) != _origin(task):
            raise ConfigurationError(
                f"two tasks are named {task.name!r} ({_origin(existing)} and {_origin(task)}); "
                "give one of them name=..."
            )
        self._tasks[task.name] = task

    def get(self, name: str) -> Task[Any, Any]:
        """The task of that name.

        Raises:
            UnknownTaskError: no such task is registered here.
        """
        try:
            return self._tasks[name]
        except KeyError:
            raise UnknownTaskError(
                f"task {name!r} is not registered in this worker (is its module in --app?)"
            ) from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._tasks)

    def clear(self) -> None:
        """Forget every task (for tests)."""
        self._tasks.clear()

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._tasks)


def _origin(task: Task[Any, Any]) -> str:
    return f"{task.fn.__module__}.{task.fn.__qualname__}"


#: The default registry, filled by ``@task``. Tests may clear it or pass their own.
registry = TaskRegistry()

"""Lifecycle hooks: where integrations (Django's connection hygiene) plug in.

A hook object has any of these methods; each is called where its docstring says. Hooks are a
registry like the task registry: integrations add theirs once (Django's ``AppConfig.ready()``),
tests may clear them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ebsqs.execution import Job, Outcome


class Hooks:
    """No-op base class; override what you need."""

    def before_fork(self) -> None:
        """In the supervisor's master, just before it forks a child."""

    def worker_started(self) -> None:
        """In the process that runs the worker loop, after the fork, before the first receive."""

    def task_started(self, job: Job) -> None:
        """In the thread or process that runs the task, just before it runs."""

    def task_finished(self, job: Job, outcome: Outcome) -> None:
        """In the thread or process that ran the task, just after, whatever happened."""


#: Registered hooks, called in order.
HOOKS: list[Hooks] = []


def add(hooks: Hooks) -> None:
    """Register a hooks object (once; adding the same object again does nothing)."""
    if hooks not in HOOKS:
        HOOKS.append(hooks)


def fire(name: str, *args: Any) -> None:
    """Call ``name`` on every registered hooks object."""
    for hooks in HOOKS:
        getattr(hooks, name)(*args)

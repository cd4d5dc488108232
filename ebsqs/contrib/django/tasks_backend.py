"""A backend for Django's Tasks framework: ``@task`` functions of ``django.tasks`` (Django 6+) or
of the ``django-tasks`` backport (Django 5.2) enqueue onto ebsqs and run under ``ebsqs supervise``.

::

    TASKS = {
        "default": {
            "BACKEND": "ebsqs.contrib.django.tasks_backend.EbsqsBackend",
            "QUEUES": ["default", "emails"],          # ebsqs queue names (the prefix is added)
            "OPTIONS": {"max_retries": 2},            # optional: retries of every Django task
        }
    }

Each Django task becomes an ebsqs task named ``django.tasks:<module path>`` when Django validates
it, which happens when its module is imported (``tasks`` modules are imported at startup). A
worker runs only the Django tasks it registered that way: a message naming anything else is
dead-lettered, and nothing a message names is ever imported.

What the backend supports: ``run_after`` (any delay, past SQS's 15 minutes too), async tasks,
``takes_context`` (``context.attempt`` is ebsqs's attempt number). Not supported: priorities
(SQS has none) and reading results back (``get_result``): ebsqs keeps no result store.
"""

from __future__ import annotations

import functools
import os
import socket
import traceback
from collections.abc import Callable
from importlib import import_module
from importlib.util import find_spec
from typing import Any

from django.utils import timezone

from ebsqs.context import current
from ebsqs.registry import registry
from ebsqs.task import Task

#: Django 6's own tasks framework, or the backport on Django 5.2 (same modules, same names).
_FRAMEWORK = "django.tasks" if find_spec("django.tasks") is not None else "django_tasks"
_base: Any = import_module(f"{_FRAMEWORK}.base")
_signals: Any = import_module(f"{_FRAMEWORK}.signals")
BaseTaskBackend: Any = import_module(f"{_FRAMEWORK}.backends.base").BaseTaskBackend
TaskContext, TaskError, TaskResult, TaskResultStatus = (
    _base.TaskContext,
    _base.TaskError,
    _base.TaskResult,
    _base.TaskResultStatus,
)

#: ebsqs task names of Django tasks start with this, so they never collide with ``@ebsqs.task``.
NAME_PREFIX = "django.tasks:"


class EbsqsBackend(BaseTaskBackend):  # type: ignore[misc]
    """Sends Django tasks as ebsqs messages, which ``ebsqs supervise`` runs."""

    supports_defer = True
    supports_async_task = True
    supports_get_result = False
    supports_priority = False

    def validate_task(self, task: Any) -> None:
        """Django's checks, then register the ebsqs task that runs ``task`` in this process."""
        super().validate_task(task)
        ebsqs_task_for(task, self.options)

    def enqueue(self, task: Any, args: Any, kwargs: Any) -> Any:
        """Send one run of ``task``; return its (READY) result, whose id is the ebsqs task id.

        Inside ``transaction.atomic()`` with ``EBSQS["send_on_commit"]``, the message is sent
        when the transaction commits, like ``.delay()``.
        """
        self.validate_task(task)
        task_id = ebsqs_task_for(task, self.options).apply_async(
            tuple(args), dict(kwargs), queue_name=task.queue_name, eta=task.run_after
        )
        result: Any = TaskResult(
            task=task,
            id=task_id,
            status=TaskResultStatus.READY,
            enqueued_at=timezone.now(),
            started_at=None,
            finished_at=None,
            last_attempted_at=None,
            args=list(args),
            kwargs=dict(kwargs),
            backend=self.alias,
            errors=[],
            worker_ids=[],
        )
        _signals.task_enqueued.send(type(self), task_result=result)
        return result


def ebsqs_task_for(django_task: Any, options: dict[str, Any] | None = None) -> Task[Any, Any]:
    """The registered ebsqs task that runs ``django_task`` (registered now if it is not yet)."""
    name = NAME_PREFIX + django_task.module_path
    if name in registry:
        existing = registry.get(name)
        if getattr(existing.fn, "__wrapped__", None) is django_task.func:
            return existing
    options = options or {}
    runner = Task(
        _runner(django_task),
        name=name,
        queue_name=django_task.queue_name,
        max_retries=options.get("max_retries"),
    )
    registry.register(runner)
    return runner


def _runner(django_task: Any) -> Callable[..., Any]:
    """The function the worker calls: runs the Django task with Django's result bookkeeping."""

    @functools.wraps(django_task.func)
    def run(*args: Any, **kwargs: Any) -> Any:
        ctx = current()
        now = timezone.now()
        result: Any = TaskResult(
            task=django_task,
            id=ctx.task_id,
            status=TaskResultStatus.RUNNING,
            enqueued_at=None,
            started_at=now,
            finished_at=None,
            last_attempted_at=now,
            args=list(args),
            kwargs=dict(kwargs),
            backend=django_task.backend,
            errors=[],
            # One entry per attempt, as Django counts attempts; ebsqs knows only this worker.
            worker_ids=[_worker_id()] * ctx.attempt,
        )
        _signals.task_started.send(EbsqsBackend, task_result=result)
        try:
            if django_task.takes_context:
                value = django_task.call(TaskContext(task_result=result), *args, **kwargs)
            else:
                value = django_task.call(*args, **kwargs)
        except BaseException as exc:
            _finish(result, TaskResultStatus.FAILED, error=exc)
            raise
        _finish(result, TaskResultStatus.SUCCESSFUL, value=value)
        return value

    return run


def _finish(
    result: Any, status: Any, value: Any = None, error: BaseException | None = None
) -> None:
    # Django's results are frozen dataclasses that their backends update in place.
    object.__setattr__(result, "finished_at", timezone.now())
    object.__setattr__(result, "status", status)
    if error is not None:
        kind = type(error)
        result.errors.append(
            TaskError(
                exception_class_path=f"{kind.__module__}.{kind.__qualname__}",
                traceback="".join(traceback.format_exception(error)),
            )
        )
    else:
        object.__setattr__(result, "_return_value", value)
    _signals.task_finished.send(EbsqsBackend, task_result=result)


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"

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

Django's result bookkeeping around each run (a RUNNING result, the ``task_started`` and
``task_finished`` signals, the final status and errors) is a middleware, :class:`DjangoTasks`,
registered with the first Django task: it runs in the thread or process that runs the task.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable
from contextvars import ContextVar, Token
from importlib import import_module
from importlib.util import find_spec
from typing import Any

from django.utils import timezone

from ebsqs import middleware
from ebsqs.executors.execution import Job, Outcome, OutcomeKind
from ebsqs.middleware import Middleware
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
    _DJANGO_TASKS.tasks[name] = django_task
    middleware.add(_DJANGO_TASKS)
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
    """The function the worker calls: the Django task, with its context if it takes one."""

    @functools.wraps(django_task.func)
    def run(*args: Any, **kwargs: Any) -> Any:
        result = _RESULT.get()
        if django_task.takes_context:
            value = django_task.call(TaskContext(task_result=result), *args, **kwargs)
        else:
            value = django_task.call(*args, **kwargs)
        if result is not None:
            object.__setattr__(result, "_return_value", value)
        return value

    return run


#: The result of the Django task running in this thread (set by :class:`DjangoTasks`).
_RESULT: ContextVar[Any] = ContextVar("ebsqs_django_task_result", default=None)


class DjangoTasks(Middleware):
    """Django's result bookkeeping around each run of a Django task."""

    def __init__(self) -> None:
        self.tasks: dict[str, Any] = {}
        self._tokens: ContextVar[Token[Any] | None] = ContextVar("ebsqs_django_token", default=None)

    def task_started(self, job: Job) -> None:
        """A RUNNING result for the task's context and ``task_started`` (in the task's thread)."""
        django_task = self.tasks.get(job.envelope.task)
        if django_task is None:
            return
        now = timezone.now()
        result: Any = TaskResult(
            task=django_task,
            id=job.envelope.id,
            status=TaskResultStatus.RUNNING,
            enqueued_at=None,
            started_at=now,
            finished_at=None,
            last_attempted_at=now,
            args=list(job.envelope.args),
            kwargs=dict(job.envelope.kwargs),
            backend=django_task.backend,
            errors=[],
            # One entry per attempt, as Django counts attempts; ebsqs knows only this worker.
            worker_ids=[_worker_id()] * job.envelope.attempt,
        )
        self._tokens.set(_RESULT.set(result))
        _signals.task_started.send(EbsqsBackend, task_result=result)

    def task_finished(self, job: Job, outcome: Outcome) -> None:
        """The final status, the error if any, and ``task_finished``."""
        token = self._tokens.get()
        if job.envelope.task not in self.tasks or token is None:
            return
        result = _RESULT.get()
        _RESULT.reset(token)
        self._tokens.set(None)
        # Django's results are frozen dataclasses that their backends update in place.
        object.__setattr__(result, "finished_at", timezone.now())
        if outcome.kind is OutcomeKind.SUCCEEDED:
            object.__setattr__(result, "status", TaskResultStatus.SUCCESSFUL)
        else:
            object.__setattr__(result, "status", TaskResultStatus.FAILED)
            result.errors.append(
                TaskError(
                    exception_class_path=outcome.error_type or str(outcome.kind),
                    traceback=outcome.traceback or outcome.error or "",
                )
            )
        _signals.task_finished.send(EbsqsBackend, task_result=result)


#: The one instance, registered with the first Django task.
_DJANGO_TASKS = DjangoTasks()


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"

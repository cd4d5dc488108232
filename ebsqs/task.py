"""``@task`` and :class:`Task`: what application code defines and calls.

Defining a task does no work: no broker, no settings, no client. Those are resolved when a
message is sent (``.delay()``) or run (the worker).
"""

from __future__ import annotations

import datetime as dt
import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Generic, NoReturn, ParamSpec, Protocol, TypeVar, overload

from ebsqs.backoff import Backoff
from ebsqs.context import current_or_none
from ebsqs.envelope import Envelope, encode, new_id
from ebsqs.errors import MaxRetriesReachedException, Retry
from ebsqs.registry import TaskRegistry, registry

P = ParamSpec("P")
R = TypeVar("R")

#: Keywords ``.delay()`` takes as send options, as django-eb-sqs did, unless the function
#: itself has a parameter of that name.
LEGACY_OPTIONS = frozenset({"delay", "queue_name", "max_retries", "group_id", "execute_inline"})


@dataclass(frozen=True, slots=True)
class SendOptions:
    """Per-call options. ``None`` means "the task's default".

    Attributes:
        queue_name: the logical queue to send to.
        delay: seconds before the task may run; any length (past 15 minutes it hops).
        eta: an aware or UTC-naive datetime before which it must not run.
        max_retries: override the task's retries for this call.
        group_id: FIFO message group.
        dedup_id: FIFO deduplication id.
        execute_inline: run now in this process (django-eb-sqs's option).
    """

    queue_name: str | None = None
    delay: float | None = None
    eta: dt.datetime | None = None
    max_retries: int | None = None
    group_id: str | None = None
    dedup_id: str | None = None
    execute_inline: bool | None = None


@dataclass(frozen=True, slots=True)
class Call:
    """One invocation, for :meth:`Task.delay_many`. Build it with :meth:`Task.call`."""

    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    task_id: str | None = None  # chosen up front when the send waits for a commit


class Task(Generic[P, R]):
    """A registered function that can run here (call it) or on a worker (``.delay()``)."""

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        name: str | None = None,
        queue_name: str | None = None,
        max_retries: int | None = None,
        retry_on: tuple[type[BaseException], ...] = (),
        backoff: Backoff | None = None,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        delay: float | None = None,
        options: SendOptions | None = None,
        registry: TaskRegistry = registry,
    ) -> None:
        self.fn = fn
        self.name = name or f"{fn.__module__}.{fn.__qualname__}"
        self.queue_name = queue_name
        self.max_retries = max_retries
        self.retry_on = tuple(retry_on)
        self.backoff = backoff
        self.time_limit = time_limit
        self.soft_time_limit = soft_time_limit
        self.default_delay = delay
        self.options = options or SendOptions()
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function here and now, like a plain call."""
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Task {self.name}>"

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """Send one invocation; return the task id.

        ``delay=``, ``queue_name=``, ``max_retries=``, ``group_id=`` and ``execute_inline=`` are
        taken as send options (django-eb-sqs's keywords) unless the function has a parameter of
        that name. Typed code should prefer ``send_with(delay=300).delay(...)``.

        Raises:
            SerializationError: an argument JSON cannot carry.
            MessageTooLargeError: the body exceeds the broker's limit.
        """
        options, call_kwargs = self._split_options(kwargs)
        return self._send([Call(args, call_kwargs)], options)[0]

    def call(self, *args: P.args, **kwargs: P.kwargs) -> Call:
        """A typed invocation for :meth:`delay_many`."""
        return Call(args, kwargs)

    def delay_many(self, calls: Iterable[Call | tuple[Any, ...] | Mapping[str, Any]]) -> list[str]:
        """Send many invocations, ten per broker request; return their task ids in order.

        Each item is a :class:`Call`, a tuple of positional arguments, or a dict of keyword
        arguments.
        """
        return self._send([_as_call(item) for item in calls], self.options)

    def send_with(self, **options: Any) -> BoundTask[P, R]:
        """The same task with send options fixed, e.g. ``f.send_with(delay=86400).delay(x)``."""
        return BoundTask(self, replace(self.options, **options))

    def apply_async(
        self,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> str:
        """Celery-style send: ``f.apply_async((1,), {"x": 2}, delay=60, queue_name="q")``."""
        return self.send_with(**options)._send_one(Call(args, kwargs or {}))

    def retry(self, delay: float | None = None, reason: str | None = None) -> NoReturn:
        """End this attempt and schedule the next (from inside the running task).

        Raises:
            Retry: always, when retries are left; let it propagate.
            MaxRetriesReachedException: no retries are left (as in django-eb-sqs).
        """
        ctx = current_or_none()
        if ctx is None:
            raise RuntimeError(f"{self.name}.retry() called outside a running task")
        if ctx.attempt > ctx.max_retries:
            raise MaxRetriesReachedException(ctx.max_retries)
        raise Retry(delay, reason)

    def _split_options(self, kwargs: dict[str, Any]) -> tuple[SendOptions, dict[str, Any]]:
        reserved = LEGACY_OPTIONS & kwargs.keys() - _parameters(self.fn)
        if not reserved:
            return self.options, kwargs
        chosen = {key: kwargs.pop(key) for key in reserved}
        return replace(self.options, **chosen), kwargs

    def _send(self, calls: list[Call], options: SendOptions) -> list[str]:
        if COMMIT_HOOKS and COMMIT_HOOKS[-1].delay_waits_for_commit():
            return _send_after_commit(self, calls, options, COMMIT_HOOKS[-1])
        return self._send_now(calls, options)

    def _send_now(self, calls: list[Call], options: SendOptions) -> list[str]:
        from ebsqs.producer import send_calls

        return send_calls(self, calls, options)

    # -- sending after a transaction commits (see COMMIT_HOOKS below) ------------------------

    def delay_on_commit(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """Like :meth:`delay`, but the message is sent once the current transaction commits.

        Nothing is sent if it rolls back. Arguments are checked now (a :class:`SerializationError`
        is raised here, not at commit), and the task id is returned now. Outside a transaction,
        or with no integration that knows transactions (``ebsqs.contrib.django``), it sends at once.
        """
        options, call_kwargs = self._split_options(kwargs)
        return self._send_on_commit([Call(args, call_kwargs)], options)[0]

    def _send_on_commit(self, calls: list[Call], options: SendOptions) -> list[str]:
        if not COMMIT_HOOKS:
            return self._send_now(calls, options)
        return _send_after_commit(self, calls, options, COMMIT_HOOKS[-1])


class BoundTask(Generic[P, R]):
    """A task with send options fixed; see :meth:`Task.send_with`."""

    def __init__(self, task: Task[P, R], options: SendOptions) -> None:
        self.task = task
        self.options = options

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """Send one invocation with these options; return the task id."""
        return self._send_one(Call(args, kwargs))

    def delay_many(self, calls: Iterable[Call | tuple[Any, ...] | Mapping[str, Any]]) -> list[str]:
        """Send many invocations with these options."""
        return self.task._send([_as_call(item) for item in calls], self.options)

    def delay_on_commit(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """Send with these options once the current transaction commits (see
        :meth:`Task.delay_on_commit`)."""
        return self.task._send_on_commit([Call(args, kwargs)], self.options)[0]

    def _send_one(self, call: Call) -> str:
        return self.task._send([call], self.options)[0]


@overload
def task(fn: Callable[P, R], /) -> Task[P, R]: ...


@overload
def task(
    *,
    queue_name: str | None = None,
    max_retries: int | None = None,
    name: str | None = None,
    retry_on: tuple[type[BaseException], ...] = (),
    backoff: Backoff | None = None,
    time_limit: float | None = None,
    soft_time_limit: float | None = None,
    delay: float | None = None,
    options: SendOptions | None = None,
    registry: TaskRegistry = registry,
) -> Callable[[Callable[P, R]], Task[P, R]]: ...


def task(fn: Callable[P, R] | None = None, /, **settings: Any) -> Any:
    """Make a function a task and register it.

    Args:
        fn: the function (when used as ``@task`` without arguments).
        **settings: ``queue_name``, ``max_retries`` (retries, not attempts: 3 means at most 4
            runs; 0 means none), ``name`` (default ``module.qualname``), ``retry_on``
            (exception types that schedule a retry), ``backoff`` (a :class:`Backoff`),
            ``time_limit`` / ``soft_time_limit`` (seconds), ``delay`` (default seconds),
            ``options`` (default :class:`SendOptions`), ``registry``.
    """

    def decorate(function: Callable[P, R]) -> Task[P, R]:
        registered: Task[P, R] = Task(function, **settings)
        settings.get("registry", registry).register(registered)
        return registered

    return decorate(fn) if fn is not None else decorate


def due_time(options: SendOptions, default_delay: float, now: float) -> float:
    """Epoch seconds at which an invocation sent now with ``options`` becomes due."""
    if options.eta is not None:
        eta = options.eta
        if eta.tzinfo is None:
            eta = eta.replace(tzinfo=dt.UTC)
        return eta.timestamp()
    delay = options.delay if options.delay is not None else default_delay
    return now + max(delay, 0)


def new_envelope(task: Task[Any, Any], call: Call, max_retries: int, now: float) -> Envelope:
    """The first attempt's envelope of one call."""
    return Envelope(
        task=task.name,
        args=tuple(call.args),
        kwargs=dict(call.kwargs),
        id=call.task_id or new_id(),
        max_retries=max_retries,
        enqueued_at=now,
    )


def _as_call(item: Call | tuple[Any, ...] | Mapping[str, Any]) -> Call:
    if isinstance(item, Call):
        return item
    if isinstance(item, Mapping):
        return Call((), item)
    if isinstance(item, tuple | list):
        return Call(tuple(item), {})
    return Call((item,), {})


@functools.cache
def _parameters(fn: Callable[..., Any]) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return frozenset()


# -- sending after a transaction commits ------------------------------------------------------
# Frameworks with database transactions plug in here (``ebsqs.contrib.django`` registers
# Django's); the core imports none of them.


class CommitHook(Protocol):
    """How sends wait for a transaction: ``defer`` runs a callback once it commits."""

    def defer(self, send: Callable[[], object]) -> None:
        """Call ``send`` when the current transaction commits (at once outside one; never if it
        rolls back)."""
        ...

    def delay_waits_for_commit(self) -> bool:
        """Whether a plain ``.delay()`` made now should wait for the commit too."""
        ...


#: Registered commit hooks; the last one is used. A registry like the task registry.
COMMIT_HOOKS: list[CommitHook] = []


def _send_after_commit(
    task: Task[Any, Any], calls: list[Call], options: SendOptions, hook: CommitHook
) -> list[str]:
    """Fix the task ids and check the arguments now; send when the transaction commits."""
    calls = [replace(call, task_id=call.task_id or new_id()) for call in calls]
    for call in calls:
        encode(new_envelope(task, call, 0, 0.0))  # raises SerializationError, naming the argument
    hook.defer(functools.partial(task._send_now, calls, options))
    return [call.task_id for call in calls if call.task_id]

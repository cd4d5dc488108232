"""``@task`` and :class:`Task`: what application code defines and calls.

Defining a task does no work: no broker, no settings, no client. Those are resolved when a
message is sent (``.delay()``, which hands the calls to :mod:`ebsqs.producer`) or run (the
worker). Arrows run one way: this module asks the producer to send; the producer knows tasks
only as :class:`~ebsqs.producer.Sendable`.
"""

from __future__ import annotations

import datetime as dt
import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any, Generic, NoReturn, ParamSpec, TypeVar, overload

from ebsqs import middleware, producer
from ebsqs.backoff import Backoff
from ebsqs.context import current_or_none
from ebsqs.errors import ConfigurationError, MaxRetriesReachedException, MessageGroupError, Retry
from ebsqs.flow.spec import FlowSpec, KeyRule, build_spec
from ebsqs.producer import Call, SendOptions
from ebsqs.registry import TaskRegistry, registry

P = ParamSpec("P")
R = TypeVar("R")
#: A function of a call's arguments that names its message group (``group_by=``, ``tenant=``).
GroupRule = Callable[..., object]

#: Keywords ``.delay()`` takes as send options, unless the function itself has a parameter of
#: that name: django-eb-sqs's five, and the per-call message group and deduplication id.
SEND_KEYWORDS = frozenset(
    {
        "delay",
        "queue_name",
        "max_retries",
        "group_id",
        "execute_inline",
        "tenant",
        "deduplication_id",
    }
)


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
        fifo_group: str | None = None,
        group_by: GroupRule | None = None,
        tenant: str | GroupRule | None = None,
        rate_limit: str | tuple[str, KeyRule] | None = None,
        concurrency_limit: int | tuple[int, KeyRule] | None = None,
        unique_for: dt.timedelta | float | None = None,
        unique_key: KeyRule | None = None,
        limit_scope: str = "global",
        options: SendOptions | None = None,
        registry: TaskRegistry = registry,
    ) -> None:
        rules = [rule for rule in (fifo_group, group_by, tenant) if rule is not None]
        if len(rules) > 1:
            raise ConfigurationError(
                "fifo_group=, group_by= and tenant= all set the message group: give one"
            )
        if group_by is not None and not callable(group_by):
            raise ConfigurationError("group_by= takes a function of the task's arguments")
        self.group_rule: str | GroupRule | None = rules[0] if rules else None
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
        #: Flow control (rate and concurrency limits, uniqueness), or None.
        self.flow: FlowSpec | None = build_spec(
            self.name,
            rate_limit=rate_limit,
            concurrency_limit=concurrency_limit,
            unique_for=unique_for,
            unique_key=unique_key,
            limit_scope=limit_scope,
        )
        if self.flow is not None:
            # Imported only by tasks that use it: a process with none loads no store library.
            # Registering the middleware is a registry entry, like the task's own: no store,
            # no settings, no connection until a worker starts one.
            from ebsqs.flow.middleware import flow_control

            middleware.add(flow_control(registry))
        functools.update_wrapper(self, fn)

    def group_for(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str | None:
        """The message group of one call: ``fifo_group``, ``tenant``, or what ``group_by`` (or
        a callable ``tenant``) returns for these arguments; None when none is set.

        Raises:
            MessageGroupError: the function does not take these arguments, or failed.
        """
        rule = self.group_rule
        if rule is None or isinstance(rule, str):
            return rule
        try:
            value = rule(*args, **kwargs)
        except Exception as exc:
            raise MessageGroupError(
                f"task {self.name!r}: its group function failed on this call's arguments "
                f"({type(exc).__name__}: {exc}); write it as `lambda account_id, **_: ...`"
            ) from exc
        return None if value is None else str(value)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function here and now, like a plain call."""
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Task {self.name}>"

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """Send one invocation; return the task id.

        ``delay=``, ``queue_name=``, ``max_retries=``, ``group_id=`` and ``execute_inline=``
        (django-eb-sqs's keywords), ``tenant=`` and ``deduplication_id=`` are taken as send
        options unless the function has a parameter of that name. Typed code should prefer
        ``send_with(delay=300).delay(...)``.

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
        reserved = SEND_KEYWORDS & kwargs.keys() - _parameters(self.fn)
        if not reserved:
            return self.options, kwargs
        chosen = {key: kwargs.pop(key) for key in reserved}
        return replace(self.options, **chosen), kwargs

    def _send(self, calls: list[Call], options: SendOptions) -> list[str]:
        return producer.send(self, calls, options)

    # -- sending after a transaction commits --------------------------------------------------

    def delay_on_commit(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """Like :meth:`delay`, but the message is sent once the current transaction commits.

        Nothing is sent if it rolls back. Arguments are checked now (a :class:`SerializationError`
        is raised here, not at commit), and the task id is returned now. Outside a transaction,
        or with no middleware that knows transactions (``ebsqs.contrib.django``), it sends at
        once.
        """
        options, call_kwargs = self._split_options(kwargs)
        return self._send_on_commit([Call(args, call_kwargs)], options)[0]

    def _send_on_commit(self, calls: list[Call], options: SendOptions) -> list[str]:
        return producer.send(self, calls, options, on_commit=True)


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
    fifo_group: str | None = None,
    group_by: GroupRule | None = None,
    tenant: str | GroupRule | None = None,
    rate_limit: str | tuple[str, KeyRule] | None = None,
    concurrency_limit: int | tuple[int, KeyRule] | None = None,
    unique_for: dt.timedelta | float | None = None,
    unique_key: KeyRule | None = None,
    limit_scope: str = "global",
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
            ``fifo_group`` (the FIFO message group of every call), ``group_by`` (a function of
            the call's arguments naming its group: ``lambda order_id, **_: order_id``),
            ``tenant`` (the fair-queue tenant on a standard queue: a name, or such a
            function), ``options`` (default :class:`SendOptions`), ``registry``.
            Flow control (see the README): ``rate_limit`` (``"100/m"``, or ``("10/s",
            key_function)`` for one limit per key), ``concurrency_limit`` (``5``, or ``(5,
            key_function)``), ``limit_scope`` (``"global"``: counted in the ``flow_store``
            setting's store; ``"host"``: per host, whatever that setting), ``unique_for`` (a
            ``timedelta``: a second send with the same key within it is dropped, and a
            duplicate delivery of a completed task skipped), ``unique_key`` (a function of the
            arguments; default: the arguments themselves).
    """

    def decorate(function: Callable[P, R]) -> Task[P, R]:
        registered: Task[P, R] = Task(function, **settings)
        settings.get("registry", registry).register(registered)
        return registered

    return decorate(fn) if fn is not None else decorate


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

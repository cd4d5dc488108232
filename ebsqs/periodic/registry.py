"""``@periodic`` and the registry of periodic tasks.

``@periodic`` goes above ``@task``: it takes the registered :class:`~ebsqs.task.Task`, records
its schedule here, and returns the task unchanged (``.delay()`` and direct calls still work)::

    @periodic(cron="*/5 * * * *", tz="Europe/Berlin")
    @task(queue_name="reports.fifo")
    def send_report(scheduled_at: str) -> None: ...

The registry holds schedules only; the task registry still decides what may run. Like it, this
registry is filled at import of the app's modules and is the only module-level state here.
"""

from __future__ import annotations

import datetime as dt
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from ebsqs.errors import ConfigurationError
from ebsqs.periodic.schedule import Cron, Every, Schedule
from ebsqs.task import Task

T = TypeVar("T", bound=Task[Any, Any])
#: What happens to ticks that fell while no scheduler ran (see :func:`periodic`).
Missed = Literal["skip", "last", "all"]
MISSED_POLICIES: tuple[Missed, ...] = ("skip", "last", "all")
#: The keyword a task's function declares to be told which tick it runs for.
TICK_KEYWORD = "scheduled_at"
#: Missed ticks ``missed="all"`` sends at most, by default (the latest ones).
DEFAULT_CATCH_UP = 100


@dataclass(frozen=True, slots=True)
class PeriodicTask:
    """A task and when it runs.

    Attributes:
        task: the registered task.
        schedule: its due instants.
        missed: ``skip``, ``last`` or ``all`` (see :func:`periodic`).
        catch_up: the most missed ticks ``all`` sends.
        takes_tick: the function has a ``scheduled_at`` parameter, which gets the tick's time.
    """

    task: Task[Any, Any]
    schedule: Schedule
    missed: Missed = "skip"
    catch_up: int = DEFAULT_CATCH_UP
    takes_tick: bool = False

    @property
    def name(self) -> str:
        """The task's registered name."""
        return self.task.name


class PeriodicRegistry:
    """Periodic tasks by task name."""

    def __init__(self) -> None:
        self._entries: dict[str, PeriodicTask] = {}

    def add(self, entry: PeriodicTask) -> None:
        """Add (or, for a re-imported module, replace) a task's schedule."""
        self._entries[entry.name] = entry

    def entries(self) -> list[PeriodicTask]:
        """Every periodic task, by name."""
        return [self._entries[name] for name in sorted(self._entries)]

    def clear(self) -> None:
        """Forget every schedule (for tests)."""
        self._entries.clear()

    def __iter__(self) -> Iterator[PeriodicTask]:
        return iter(self.entries())

    def __len__(self) -> int:
        return len(self._entries)


#: The default registry, filled by ``@periodic``.
periodic_registry = PeriodicRegistry()


def periodic(
    *,
    cron: str | None = None,
    every: dt.timedelta | None = None,
    tz: str = "UTC",
    offset: dt.timedelta = dt.timedelta(0),
    missed: Missed = "skip",
    catch_up: int = DEFAULT_CATCH_UP,
    registry: PeriodicRegistry = periodic_registry,
) -> Callable[[T], T]:
    """Run a task on a schedule, once per due time across every supervisor of the fleet.

    Args:
        cron: a five-field cron expression (``"*/5 * * * *"``); needs ``ebsqs[cron]``.
        every: an interval instead, due on multiples of it since the Unix epoch (UTC).
        tz: the IANA time zone ``cron`` is read in (DST handled as Debian's cron does).
        offset: with ``every``, shifts each due time.
        missed: ticks that fell while no scheduler ran: ``"skip"`` them (the default),
            send the ``"last"`` one, or send ``"all"`` of them (at most ``catch_up``, the latest).
        catch_up: the cap of ``missed="all"``.
        registry: where to record it.

    The task's function may take a ``scheduled_at`` argument: it gets the tick's due time as
    an ISO 8601 UTC string (``2026-12-03T15:50:00Z``), the same on every retry and every host.
    It must take no other required argument.

    Raises:
        ConfigurationError: neither or both of ``cron`` and ``every``, a bad expression or zone,
            cronsim missing, a function that needs arguments, or not put above ``@task``.
    """
    if (cron is None) == (every is None):
        raise ConfigurationError("@periodic takes one of cron= or every=")
    if missed not in MISSED_POLICIES:
        raise ConfigurationError(f"missed={missed!r}: one of {', '.join(MISSED_POLICIES)}")
    if catch_up < 1:
        raise ConfigurationError(f"catch_up={catch_up!r} must be at least 1")
    schedule: Schedule
    if cron is not None:
        schedule = Cron(cron, tz)
    else:
        assert every is not None
        if tz != "UTC":
            raise ConfigurationError("tz= applies to cron=; every= counts in UTC")
        schedule = Every(every, offset)

    def decorate(task: T) -> T:
        if not isinstance(task, Task):
            raise ConfigurationError(
                f"@periodic goes above @task: {task!r} is not a task (write @periodic(...) "
                "on the line above @task(...))"
            )
        takes_tick = _check_signature(task)
        registry.add(PeriodicTask(task, schedule, missed, catch_up, takes_tick))
        return task

    return decorate


def _check_signature(task: Task[Any, Any]) -> bool:
    """Whether the function takes ``scheduled_at``; refuse one that needs other arguments."""
    signature = inspect.signature(task.fn)
    takes_tick = TICK_KEYWORD in signature.parameters
    try:
        signature.bind(**({TICK_KEYWORD: ""} if takes_tick else {}))
    except TypeError:
        raise ConfigurationError(
            f"periodic task {task.name!r} is sent with no arguments (and {TICK_KEYWORD}= if it "
            "takes it): give its other parameters defaults"
        ) from None
    return takes_tick

"""When a periodic task is due: a cron expression in a time zone, or a fixed interval.

Every time here is an aware UTC :class:`~datetime.datetime` at whole seconds, so every host
computes the same instants from the same schedule (they name the ticks: see
:mod:`ebsqs.periodic.ticks`). Cron expressions are read by cronsim (the ``cron`` extra), which
follows Debian's cron across DST changes: a time skipped when clocks go forward runs at the first
minute after the jump, a fixed time repeated when clocks go back runs once, and an expression
with a wildcard hour (``*/30 * * * *``) runs in both repeated hours.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ebsqs.errors import ConfigurationError

#: What ``@periodic(cron=...)`` needs beyond ebsqs itself.
CRON_EXTRA = "pip install ebsqs[cron]"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class Schedule(Protocol):
    """The instants a periodic task is due."""

    def next_after(self, moment: dt.datetime) -> dt.datetime:
        """The first due instant strictly after ``moment`` (aware), in UTC."""
        ...

    def previous_before(self, moment: dt.datetime) -> dt.datetime:
        """The last due instant strictly before ``moment`` (aware), in UTC."""
        ...

    def describe(self) -> str:
        """The schedule as written (``*/5 * * * *``, ``every 0:05:00``)."""
        ...

    @property
    def tz(self) -> str:
        """The time zone the schedule is read in."""
        ...


@dataclass(frozen=True, slots=True)
class Every:
    """Every ``interval``, on multiples of it counted from the Unix epoch (UTC), so every host
    picks the same instants: ``every=timedelta(minutes=5)`` is due at :00, :05, :10...

    Attributes:
        interval: the period, a whole number of seconds, at least one.
        offset: shifts every instant (``timedelta(minutes=2)``: :02, :07, ...).
    """

    interval: dt.timedelta
    offset: dt.timedelta = dt.timedelta(0)

    def __post_init__(self) -> None:
        seconds = self.interval.total_seconds()
        if seconds < 1 or seconds != int(seconds):
            raise ConfigurationError(
                f"every={self.interval!r}: the interval must be a whole number of seconds, "
                "at least one"
            )
        if self.offset.total_seconds() != int(self.offset.total_seconds()):
            raise ConfigurationError(f"offset={self.offset!r} must be whole seconds")

    @property
    def tz(self) -> str:
        return "UTC"

    def next_after(self, moment: dt.datetime) -> dt.datetime:
        period = int(self.interval.total_seconds())
        since = (moment.astimezone(dt.UTC) - _EPOCH - self.offset).total_seconds()
        count = int(since // period) + 1
        return _EPOCH + self.offset + dt.timedelta(seconds=count * period)

    def previous_before(self, moment: dt.datetime) -> dt.datetime:
        period = int(self.interval.total_seconds())
        since = (moment.astimezone(dt.UTC) - _EPOCH - self.offset).total_seconds()
        count = math.ceil(since / period) - 1
        return _EPOCH + self.offset + dt.timedelta(seconds=count * period)

    def describe(self) -> str:
        text = f"every {self.interval}"
        return f"{text} + {self.offset}" if self.offset else text


@dataclass(frozen=True, slots=True)
class Cron:
    """A five-field cron expression read in a time zone (an IANA name, ``UTC`` by default).

    Raises:
        ConfigurationError: the expression is not valid, the zone is unknown, or cronsim is not
            installed.
    """

    expression: str
    zone: str = "UTC"

    def __post_init__(self) -> None:
        _zone(self.zone)
        self._iterate(dt.datetime.now(dt.UTC))  # parses it: a bad expression fails here

    @property
    def tz(self) -> str:
        return self.zone

    def next_after(self, moment: dt.datetime) -> dt.datetime:
        found = next(self._iterate(moment), None)
        if found is None:
            raise ConfigurationError(f"cron {self.expression!r} has no run in the next 50 years")
        return found.astimezone(dt.UTC)

    def previous_before(self, moment: dt.datetime) -> dt.datetime:
        found = next(self._iterate(moment, reverse=True), None)
        if found is None:
            raise ConfigurationError(f"cron {self.expression!r} had no run in the last 50 years")
        return found.astimezone(dt.UTC)

    def describe(self) -> str:
        return self.expression

    def _iterate(self, moment: dt.datetime, *, reverse: bool = False) -> _CronIterator:
        try:
            from cronsim import CronSim, CronSimError
        except ImportError:
            raise ConfigurationError(
                f"@periodic(cron=...) needs the cronsim library: {CRON_EXTRA}"
            ) from None
        local = moment.astimezone(_zone(self.zone))
        if reverse and local.microsecond:  # cronsim reads whole seconds: keep "strictly before"
            local += dt.timedelta(seconds=1)
        try:
            return CronSim(self.expression, local.replace(microsecond=0), reverse=reverse)
        except CronSimError as exc:
            raise ConfigurationError(f"cron expression {self.expression!r}: {exc}") from None


class _CronIterator(Protocol):
    def __next__(self) -> dt.datetime: ...

    def __iter__(self) -> _CronIterator: ...


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigurationError(
            f"time zone {name!r} is unknown (an IANA name such as 'Europe/Berlin' or 'UTC')"
        ) from None


def upcoming(schedule: Schedule, after: dt.datetime, count: int) -> list[dt.datetime]:
    """The next ``count`` due instants after ``after``, in UTC."""
    found: list[dt.datetime] = []
    moment = after
    for _ in range(count):
        moment = schedule.next_after(moment)
        found.append(moment)
    return found

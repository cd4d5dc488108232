"""What one task asks of flow control: its limits, its uniqueness, and the keys they are kept by.

A :class:`FlowSpec` is built when ``@task(rate_limit=..., ...)`` is defined (validation only: no
store, no settings) and read by the worker's middleware and the producer.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ebsqs.errors import ConfigurationError, EbsqsError
from ebsqs.flow.rate import Rate, parse_rate

#: A function of a call's arguments naming its limit's or its uniqueness's key
#: (``lambda account_id, **_: account_id``), as ``group_by`` names a message group.
KeyRule = Callable[..., object]


class FlowKeyError(EbsqsError):
    """A key function failed on a call's arguments (raised at ``.delay()``; a message that
    reaches a worker anyway is dead-lettered with this reason, since it can never run)."""


class Scope(enum.StrEnum):
    """Where a task's limits are counted."""

    HOST = "host"  # every worker process of this host together (the host store)
    GLOBAL = "global"  # every process that uses the configured ``flow_store``


@dataclass(frozen=True, slots=True)
class FlowSpec:
    """One task's flow control.

    Attributes:
        task: the task's registered name (every key starts with it).
        rate: starts per period, or None.
        rate_key: the rate's per-call key (one limit per value), or None for one limit.
        concurrency: tasks running at once, or None.
        concurrency_key: the concurrency limit's per-call key, or None.
        unique_for: seconds during which a second send with the same unique key is dropped
            (and a duplicate delivery of a completed task skipped), or None.
        unique_key: the per-call unique key; None means the call's arguments.
        scope: where the limits are counted (uniqueness always uses ``flow_store``).
    """

    task: str
    rate: Rate | None = None
    rate_key: KeyRule | None = None
    concurrency: int | None = None
    concurrency_key: KeyRule | None = None
    unique_for: float | None = None
    unique_key: KeyRule | None = None
    scope: Scope = Scope.GLOBAL

    def rate_name(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
        """The store key of this call's rate limit."""
        return self._keyed("rate", self.rate_key, args, kwargs)

    def concurrency_name(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
        """The store key of this call's concurrency limit."""
        return self._keyed("running", self.concurrency_key, args, kwargs)

    def unique_name(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
        """The store key of this call's uniqueness (a digest: keys may be long or personal)."""
        if self.unique_key is None:
            value = json.dumps([list(args), dict(kwargs)], sort_keys=True, default=str)
        else:
            value = _call(self.task, "unique_key", self.unique_key, args, kwargs)
        return f"unique:{self.task}:{_digest(value)}"

    def check_keys(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        """Evaluate every key function on a call (at ``.delay()``, so bad input fails there).

        Raises:
            FlowKeyError: a key function failed on these arguments.
        """
        if self.rate_key is not None:
            self.rate_name(args, kwargs)
        if self.concurrency_key is not None:
            self.concurrency_name(args, kwargs)
        if self.unique_for is not None:
            self.unique_name(args, kwargs)

    def _keyed(
        self, kind: str, rule: KeyRule | None, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> str:
        if rule is None:
            return f"{kind}:{self.task}"
        return f"{kind}:{self.task}:{_digest(_call(self.task, kind, rule, args, kwargs))}"


def build_spec(
    task: str,
    *,
    rate_limit: str | tuple[str, KeyRule] | None = None,
    concurrency_limit: int | tuple[int, KeyRule] | None = None,
    unique_for: dt.timedelta | float | None = None,
    unique_key: KeyRule | None = None,
    limit_scope: str = "global",
) -> FlowSpec | None:
    """The :class:`FlowSpec` of ``@task``'s flow keywords, or None when none is set.

    Raises:
        ConfigurationError: a malformed rate, a limit that is not a positive integer, a window
            that is not positive, a key that is not a function, an unknown scope.
    """
    if rate_limit is None and concurrency_limit is None and unique_for is None:
        if unique_key is not None:
            raise ConfigurationError(f"task {task!r}: unique_key= needs unique_for=")
        return None
    rate, rate_key = _split(task, "rate_limit", rate_limit)
    limit, limit_key = _split(task, "concurrency_limit", concurrency_limit)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigurationError(f"task {task!r}: concurrency_limit must be an integer >= 1")
    window = unique_for.total_seconds() if isinstance(unique_for, dt.timedelta) else unique_for
    if window is not None and not window > 0:
        raise ConfigurationError(f"task {task!r}: unique_for must be a positive timedelta")
    if unique_key is not None and not callable(unique_key):
        raise ConfigurationError(f"task {task!r}: unique_key takes a function of the arguments")
    if unique_key is not None and window is None:
        raise ConfigurationError(f"task {task!r}: unique_key= needs unique_for=")
    try:
        scope = Scope(limit_scope)
    except ValueError:
        raise ConfigurationError(
            f"task {task!r}: limit_scope must be 'host' or 'global', got {limit_scope!r}"
        ) from None
    return FlowSpec(
        task=task,
        rate=parse_rate(rate) if isinstance(rate, str) else None,
        rate_key=rate_key,
        concurrency=limit,
        concurrency_key=limit_key,
        unique_for=window,
        unique_key=unique_key,
        scope=scope,
    )


def _split(task: str, name: str, value: Any) -> tuple[Any, KeyRule | None]:
    """``value`` or ``(value, key_function)`` as the two parts."""
    if not isinstance(value, tuple):
        return value, None
    if len(value) != 2 or not callable(value[1]):
        raise ConfigurationError(
            f"task {task!r}: {name} takes a value or (value, key function), such as "
            f"('10/s', lambda account_id, **_: account_id)"
        )
    return value[0], value[1]


def _call(
    task: str, kind: str, rule: KeyRule, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> str:
    try:
        return str(rule(*args, **kwargs))
    except Exception as exc:
        raise FlowKeyError(
            f"task {task!r}: its {kind} key function failed on this call's arguments "
            f"({type(exc).__name__}: {exc}); write it as `lambda account_id, **_: account_id`"
        ) from exc


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:32]

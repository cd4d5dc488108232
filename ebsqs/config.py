"""Settings: one frozen object, read when needed, never at import.

Precedence, lowest first: defaults, registered sources (Django's ``EBSQS`` dict and the
django-eb-sqs ``EB_SQS_*`` names, added by ``ebsqs.contrib.django``), ``EBSQS_*`` environment
variables, then explicit overrides (CLI flags).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from ebsqs.errors import ConfigurationError

SettingsSource = Callable[[], Mapping[str, Any]]

#: Settings sources beyond the environment; the Django app registers one. A registry, like the
#: task registry: the only other module-level state, and tests can clear it.
SOURCES: list[SettingsSource] = []

DEFAULT_BROKER_URL = "sqlite:///ebsqs.sqlite3"
#: Seconds a draining worker may finish its running tasks before it is killed.
DEFAULT_GRACEFUL_TIMEOUT = 30.0
#: Seconds of heartbeat silence after which a supervisor counts a child as hung.
DEFAULT_HEARTBEAT_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a producer or a worker needs to know.

    Attributes:
        broker_url: ``sqs://``, ``sqlite:///path`` or ``memory://``.
        queue_prefix: prepended to every queue name, on the producer and the worker side.
        default_queue: the queue of tasks that name none.
        default_delay: seconds ``.delay()`` waits when the task and the call name no delay.
        default_max_retries: retries of tasks that name no ``max_retries``.
        eager: run ``.delay()`` in-process through the full serialisation path (tests).
        accept_pickle: let workers run pickled (legacy) bodies; off, since pickle runs code.
        signing_key: HMAC key; when set, producers sign and workers refuse unsigned bodies.
            The one-key form of ``signing_keys``; after construction it is the signing key.
        signing_keys: HMAC keys for rotation (``EBSQS_SIGNING_KEYS=new,old``): the first signs,
            workers accept any of them. When set, ``signing_key`` is set to its first key.
        signature_max_age: seconds after signing past which workers refuse a signed body
            (replays); None for no limit. A message's time in the queue counts.
        dead_letter_suffix: ``<queue><suffix>`` is a queue's dead-letter queue.
        auto_create_queues: workers create missing queues (and their DLQ) at start.
        visibility_timeout: seconds a received message stays invisible (extended while running).
        wait_seconds: long-poll wait of one receive, 1..20.
        max_receive_count: receives before the broker itself dead-letters a message (crashes).
        legacy_producer: write django-eb-sqs bodies, for fleets that still run its workers.
        log_arguments: include task arguments in log lines (off: they may hold personal data).
        backoff_base: first retry delay in seconds (doubled each attempt, full jitter).
        backoff_cap: the longest retry delay in seconds.
        ack_wait: the longest a finished message's delete waits to fill a batch of ten, in
            seconds: a crash repeats at most the work finished in that time.
        time_limit: default hard limit of tasks that set none: seconds (``"300"``), or per
            queue (``"emails=60,reports=600"``; ``*=`` for the other queues); empty for none.
        soft_time_limit: default soft limit, in the same form.
        large_payload_bucket: an S3 bucket: bodies over ``large_payload_over`` are written
            there and a pointer is sent instead (the SQS Extended Client's format). None: a body
            over the queue's limit is refused at ``.delay()``.
        large_payload_over: bytes past which a body goes through S3; None means the queue's own
            limit (``MaximumMessageSize``), so only what SQS would refuse pays for S3.
        large_payload_prefix: the S3 key prefix of offloaded payloads (a lifecycle rule on it
            is the backstop for objects whose messages were never settled).
        compress_over: bytes past which a body is zlib-compressed before the limits above are
            checked; None (the default) never compresses. Every ebsqs worker reads both forms.
        max_payload_bytes: the largest payload a worker fetches from S3 or inflates, in bytes;
            larger ones are dead-lettered unread (a hostile pointer or a zip bomb).
        park_delays: a message received before it is due is kept invisible until then, 12
            hours at a time (a 24-hour delay costs about 6 requests); off, it is sent on again
            15 minutes at a time (288 requests a day). Parked messages count toward
            SQS's 120,000 in-flight messages per standard queue.
        flow_store: where flow control (rate and concurrency limits of ``limit_scope="global"``
            tasks, unique tasks) keeps its state: ``host`` (the host store, shared by every
            process of this host), ``sqlite:///path`` (a host store at that path),
            ``redis://host:6379/0`` (shared by every host; the ``redis`` extra) or ``django``
            / ``django:<alias>`` (the Django database; ``ebsqs.contrib.django`` migrated).
        flow_host_store: the host store's SQLite file; empty for one per user in the
            temporary directory.
    """

    broker_url: str = DEFAULT_BROKER_URL
    queue_prefix: str = ""
    default_queue: str = "default"
    default_delay: int = 0
    default_max_retries: int = 0
    eager: bool = False
    accept_pickle: bool = False
    signing_key: str | None = None
    signing_keys: tuple[str, ...] = ()
    signature_max_age: float | None = None
    dead_letter_suffix: str = "-dlq"
    auto_create_queues: bool = True
    visibility_timeout: int = 30
    wait_seconds: int = 20
    max_receive_count: int = 10
    legacy_producer: bool = False
    log_arguments: bool = False
    backoff_base: float = 1.0
    backoff_cap: float = 3600.0
    ack_wait: float = 0.1
    park_delays: bool = True
    time_limit: str = ""
    soft_time_limit: str = ""
    large_payload_bucket: str | None = None
    large_payload_over: int | None = None
    large_payload_prefix: str = "ebsqs-payloads/"
    compress_over: int | None = None
    max_payload_bytes: int = 64 * 1024 * 1024
    flow_store: str = "host"
    flow_host_store: str = ""

    def __post_init__(self) -> None:
        problem = soft_over_hard(self.time_limit, self.soft_time_limit)
        if problem is not None:
            raise ConfigurationError(problem)
        keys = _signing_keys(self.signing_key, self.signing_keys)
        # Both fields always agree, so code that reads the one-key form signs and checks too.
        object.__setattr__(self, "signing_keys", keys)
        object.__setattr__(self, "signing_key", keys[0] if keys else None)
        if not 0 <= self.ack_wait <= 10:
            raise ConfigurationError(
                f"ack_wait must be seconds from 0 to 10, got {self.ack_wait!r}"
            )
        if self.signature_max_age is not None and not self.signature_max_age > 0:
            raise ConfigurationError(
                f"signature_max_age must be seconds > 0, got {self.signature_max_age!r}; "
                "leave it unset for no limit"
            )

    def time_limits_for(self, queue: str) -> tuple[float | None, float | None]:
        """The default (hard, soft) time limits of tasks from a logical queue."""
        hard = queue_limits(self.time_limit, "time_limit")
        soft = queue_limits(self.soft_time_limit, "soft_time_limit")
        return hard.get(queue, hard.get("*")), soft.get(queue, soft.get("*"))

    def physical_queue(self, queue: str) -> str:
        """The broker-side name of a logical queue: the prefix, applied exactly once here."""
        return f"{self.queue_prefix}{queue}"

    def dead_letter_queue(self, queue: str) -> str:
        """The broker-side name of a logical queue's dead-letter queue."""
        return self.dead_letter_queue_of_physical(self.physical_queue(queue))

    def dead_letter_queue_of_physical(self, name: str) -> str:
        """The dead-letter queue of a broker-side queue name (FIFO names keep ``.fifo`` last)."""
        if name.endswith(".fifo"):
            return f"{name[: -len('.fifo')]}{self.dead_letter_suffix}.fifo"
        return f"{name}{self.dead_letter_suffix}"

    def is_dead_letter_queue(self, name: str) -> bool:
        """Whether a broker-side queue name is some queue's dead-letter queue (by its suffix)."""
        base = name[: -len(".fifo")] if name.endswith(".fifo") else name
        return bool(self.dead_letter_suffix) and base.endswith(self.dead_letter_suffix)

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (unknown names are an error)."""
        changes = _coerce_all(changes, origin="override")
        # The two key fields mirror each other: a change to one replaces both.
        if "signing_keys" in changes and "signing_key" not in changes:
            changes["signing_key"] = None
        elif "signing_key" in changes and "signing_keys" not in changes:
            changes["signing_keys"] = ()
        return dataclasses.replace(self, **changes)


@functools.cache
def queue_limits(spec: str, name: str = "time limit") -> dict[str, float]:
    """``"300"`` as ``{"*": 300.0}``; ``"a=60, b=600"`` as ``{"a": 60.0, "b": 600.0}``.

    Raises:
        ConfigurationError: a part is not ``seconds`` or ``queue=seconds`` with seconds > 0.
    """
    limits: dict[str, float] = {}  # cached: callers must not change it
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        queue, _, seconds = part.rpartition("=")
        try:
            value = float(seconds)
        except ValueError:
            value = 0.0
        if value <= 0:
            raise ConfigurationError(
                f"{name} {spec!r}: use seconds (300) or queue=seconds pairs (emails=60,*=600)"
            )
        limits[queue.strip() or "*"] = value
    return limits


def soft_over_hard(
    hard_spec: str, soft_spec: str, names: tuple[str, str] = ("time_limit", "soft_time_limit")
) -> str | None:
    """Why a soft time limit is over its hard one (one line), or None when none is.

    Both are ``time_limit`` forms: seconds (every queue) or ``queue=seconds`` pairs, ``*``
    standing for the other queues; each queue is compared with what applies to it. ``names``
    are the setting (or flag) names the message uses.

    Raises:
        ConfigurationError: either spec is malformed.
    """
    hard_name, soft_name = names
    hard = queue_limits(hard_spec, hard_name)
    soft = queue_limits(soft_spec, soft_name)
    for queue in sorted(hard.keys() | soft.keys()):
        hard_limit, soft_limit = hard.get(queue, hard.get("*")), soft.get(queue, soft.get("*"))
        if hard_limit is not None and soft_limit is not None and soft_limit > hard_limit:
            where = "" if queue == "*" else f" for queue {queue}"
            return (
                f"the soft limit{where} ({soft_limit:g} s) is over the hard limit "
                f"({hard_limit:g} s, {hard_name}): the soft one must come first"
            )
    return None


def _signing_keys(key: str | None, keys: Sequence[str] | str) -> tuple[str, ...]:
    """The accepted keys, the signing one first, from the one-key and the list form.

    Raises:
        ConfigurationError: both forms are set and the single key is not among the list.
    """
    if isinstance(keys, str):
        keys = _split_keys(keys)
    if not all(isinstance(k, str) for k in keys):
        raise ConfigurationError("signing_keys must be strings (EBSQS_SIGNING_KEYS=new,old)")
    listed = tuple(k for k in keys if k)
    if not listed:
        return (key,) if key else ()
    if key and key not in listed:
        # Never guess which of two disagreeing settings signs; and never print a key.
        raise ConfigurationError(
            "signing_key is set and is not one of signing_keys: set signing_keys alone "
            "(the first key signs, every key is accepted)"
        )
    return listed


def _split_keys(text: str) -> tuple[str, ...]:
    """``"new, old"`` as ``("new", "old")``: comma-separated, spaces around keys ignored."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def load_settings(**overrides: Any) -> Settings:
    """Read settings now, from every source, ``overrides`` winning."""
    values: dict[str, Any] = {}
    for source in SOURCES:
        values.update(_coerce_all(source(), origin="settings source"))
    values.update(_from_env(os.environ))
    values.update(_coerce_all({k: v for k, v in overrides.items() if v is not None}, "override"))
    return Settings(**values)


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    found = {}
    for field in fields(Settings):
        raw = environ.get(f"EBSQS_{field.name.upper()}")
        if raw is not None and raw != "":
            found[field.name] = raw
    return _coerce_all(found, origin="environment")


def _coerce_all(values: Mapping[str, Any], origin: str) -> dict[str, Any]:
    types = {field.name: field.type for field in fields(Settings)}
    coerced = {}
    for name, value in values.items():
        if name not in types:
            raise ConfigurationError(f"unknown ebsqs setting {name!r} (from the {origin})")
        coerced[name] = _coerce(name, str(types[name]), value, origin)
    return coerced


def _coerce(name: str, type_name: str, value: Any, origin: str) -> Any:
    if type_name.startswith("tuple[str") and isinstance(value, list | tuple):
        return tuple(value)
    if value is None or not isinstance(value, str) or type_name.startswith("str"):
        return value
    type_name = type_name.removesuffix(" | None")
    try:
        if type_name == "bool":
            return _parse_bool(value)
        if type_name == "int":
            return int(value)
        if type_name == "float":
            return float(value)
        if type_name.startswith("tuple[str"):
            return _split_keys(value)
    except ValueError:
        raise ConfigurationError(
            f"setting {name} from the {origin} must be a {type_name}, got {value!r}"
        ) from None
    return value


def _parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(value)

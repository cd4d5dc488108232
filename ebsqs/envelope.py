"""The wire format: what a task message's body says, and how it is checked.

A body is JSON (``"v": 1``). Decoding never imports or calls anything: it yields a task *name*
that the worker looks up in the registry. Bodies written by django-eb-sqs are read too, so a
fleet can move while old producers still send; their pickled form is refused unless the worker
was told to accept pickle, because unpickling runs code chosen by whoever wrote the body.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import pickle
import random
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ebsqs.errors import EnvelopeError, SerializationError

VERSION = 1

#: One encoder for every body: json.dumps with options builds a new encoder on each call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True, slots=True)
class Envelope:
    """One task invocation as it travels.

    Attributes:
        task: the registered task name.
        args: positional arguments.
        kwargs: keyword arguments.
        id: the task id; stays the same across retries.
        attempt: 1 for the first run, 2 for the first retry, and so on.
        max_retries: retries allowed, fixed when the task was sent.
        due: epoch seconds before which it must not run (delays past SQS's 15 minutes).
        enqueued_at: epoch seconds when the first attempt was sent.
        trace: optional tracing context (W3C ``traceparent`` and the like).
        legacy: the body was written by django-eb-sqs.
    """

    task: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: new_id())
    attempt: int = 1
    max_retries: int = 0
    due: float | None = None
    enqueued_at: float = field(default_factory=time.time)
    trace: Mapping[str, str] | None = None
    legacy: bool = False

    def next_attempt(self, due: float | None) -> Envelope:
        """The envelope of the retry that follows this attempt."""
        return _replace(self, attempt=self.attempt + 1, due=due)

    def with_due(self, due: float | None) -> Envelope:
        """The same attempt, due at another time (a long delay hopping through the queue)."""
        return _replace(self, due=due)

    @property
    def retries_left(self) -> int:
        """How many more attempts may follow this one."""
        return max(self.max_retries - (self.attempt - 1), 0)


def new_id() -> str:
    """A random version-4 UUID string: a task's id.

    Drawn from ``random`` (reseeded in every forked child) rather than ``uuid.uuid4()``'s
    ``os.urandom``: ids need to be unique, not secret, and this is three times faster on the
    ``delay_many`` path.
    """
    h = f"{random.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


#: The RFC 4122 variant puts 10 in the top bits of the clock-sequence nibble.
_VARIANT = {digit: "89ab"[int(digit, 16) % 4] for digit in "0123456789abcdef"}


def _replace(envelope: Envelope, **changes: Any) -> Envelope:
    values = {name: getattr(envelope, name) for name in Envelope.__slots__}
    values.update(changes)
    return Envelope(**values)


def encode(
    envelope: Envelope,
    *,
    signing_key: str | None = None,
    legacy: bool = False,
    queue: str | None = None,
) -> str:
    """The body for an envelope.

    Raises:
        SerializationError: an argument JSON cannot carry, named.
    """
    payload = _legacy_payload(envelope, queue) if legacy else _payload(envelope)
    try:
        text = _ENCODER.encode(payload)
    except (TypeError, ValueError) as exc:
        raise _explain(envelope, exc) from None
    if signing_key and not legacy:
        payload["sig"] = _sign(payload, signing_key)
        text = _ENCODER.encode(payload)
    return text


def _payload(envelope: Envelope) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "v": VERSION,
        "id": envelope.id,
        "task": envelope.task,
        "args": list(envelope.args),
        "kwargs": dict(envelope.kwargs),
        "attempt": envelope.attempt,
        "max_retries": envelope.max_retries,
        "enqueued_at": envelope.enqueued_at,
    }
    if envelope.due is not None:
        payload["due"] = envelope.due
    if envelope.trace:
        payload["trace"] = dict(envelope.trace)
    return payload


def _legacy_payload(envelope: Envelope, queue: str | None) -> dict[str, Any]:
    """django-eb-sqs's body. Its ``maxRetries`` counts attempts and ``retry`` counts from 0.

    ``queue`` is the logical (unprefixed) queue: a django-eb-sqs worker sends its retries there.
    """
    if envelope.due is not None:
        raise SerializationError(
            f"task {envelope.task!r}: django-eb-sqs bodies (legacy_producer) cannot carry a delay "
            "over 15 minutes; turn legacy_producer off once no django-eb-sqs worker consumes"
        )
    return {
        "id": envelope.id,
        "groupId": None,
        "queue": queue,
        "func": envelope.task,
        "args": list(envelope.args),
        "kwargs": dict(envelope.kwargs),
        "maxRetries": envelope.max_retries + 1,
        "retry": envelope.attempt - 1,
        "retryId": str(uuid.uuid4()) if envelope.attempt > 1 else None,
        "pickle": False,
    }


def _explain(envelope: Envelope, exc: Exception) -> SerializationError:
    """Name the argument that JSON could not carry."""
    named = [(f"positional argument {i}", value) for i, value in enumerate(envelope.args)]
    named += [(f"argument {key!r}", value) for key, value in envelope.kwargs.items()]
    for label, value in named:
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as inner:
            return SerializationError(
                f"task {envelope.task!r}: {label} cannot be sent as JSON ({inner}); pass plain "
                "data (str, int, float, bool, None, list, dict), e.g. an ISO date string or an id"
            )
    return SerializationError(f"task {envelope.task!r}: cannot be sent as JSON ({exc})")


def _sign(payload: Mapping[str, Any], key: str) -> str:
    canonical = json.dumps(
        {k: v for k, v in payload.items() if k != "sig"}, sort_keys=True, separators=(",", ":")
    )
    return hmac.new(key.encode(), canonical.encode(), hashlib.sha256).hexdigest()


def decode(body: str, *, signing_key: str | None = None, accept_pickle: bool = False) -> Envelope:
    """The envelope a body carries, checked.

    Raises:
        EnvelopeError: the body is not JSON, not an ebsqs or django-eb-sqs body, badly signed,
            or asks for pickle that this worker refuses. Such messages are dead-lettered.
    """
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise EnvelopeError(f"body is not JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise EnvelopeError(f"body is JSON {type(payload).__name__}, not an object")
    if signing_key:
        _verify(payload, signing_key)
    if "func" in payload and "v" not in payload:
        return _decode_legacy(payload, accept_pickle)
    if payload.get("v") != VERSION:
        raise EnvelopeError(f"unsupported envelope version {payload.get('v')!r}")
    try:
        return Envelope(
            task=_text(payload, "task"),
            args=tuple(_typed(payload, "args", list, [])),
            kwargs=_typed(payload, "kwargs", dict, {}),
            id=_text(payload, "id"),
            attempt=_typed(payload, "attempt", int, 1),
            max_retries=_typed(payload, "max_retries", int, 0),
            due=_number_or_none(payload, "due"),
            enqueued_at=float(_typed(payload, "enqueued_at", (int, float), 0.0)),
            trace=_typed(payload, "trace", dict, None),
        )
    except (TypeError, ValueError) as exc:
        raise EnvelopeError(f"malformed envelope: {exc}") from None


def _verify(payload: dict[str, Any], key: str) -> None:
    signature = payload.get("sig")
    if not isinstance(signature, str):
        raise EnvelopeError("body is not signed, and this worker requires signed bodies")
    if not hmac.compare_digest(signature, _sign(payload, key)):
        raise EnvelopeError("body's signature does not match: refused")


def _decode_legacy(payload: dict[str, Any], accept_pickle: bool) -> Envelope:
    args: Any = payload.get("args", [])
    kwargs: Any = payload.get("kwargs", {})
    if payload.get("pickle"):
        if not accept_pickle:
            raise EnvelopeError(
                "body is pickled (django-eb-sqs use_pickle=True); pickle is refused because "
                "unpickling runs code chosen by the sender; set accept_pickle only if every "
                "producer is trusted"
            )
        args, kwargs = _unpickle(args), _unpickle(kwargs)
    try:
        max_attempts = int(payload.get("maxRetries") or 0)
        return Envelope(
            task=_text(payload, "func"),
            args=tuple(_check(args, (list, tuple), "args")),
            kwargs=_check(kwargs, dict, "kwargs"),
            id=str(payload.get("id") or uuid.uuid4()),
            attempt=int(payload.get("retry") or 0) + 1,
            # django-eb-sqs's maxRetries counts attempts: 3 means three runs in all.
            max_retries=max(max_attempts - 1, 0),
            legacy=True,
        )
    except (TypeError, ValueError) as exc:
        raise EnvelopeError(f"malformed django-eb-sqs body: {exc}") from None


def _unpickle(value: Any) -> Any:
    if not isinstance(value, str):
        raise EnvelopeError("pickled field is not base64 text")
    try:
        return pickle.loads(base64.b64decode(value))
    except Exception as exc:  # noqa: BLE001 - any failure of foreign data is a bad body
        raise EnvelopeError(f"pickled field cannot be loaded ({type(exc).__name__})") from None


def _text(payload: Mapping[str, Any], key: str) -> str:
    value = payload.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key!r} must be a non-empty string")
    return value


def _typed(payload: Mapping[str, Any], key: str, kind: Any, default: Any) -> Any:
    value = payload.get(key, default)
    if value is default:
        return value
    return _check(value, kind, key)


def _check(value: Any, kind: Any, key: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise TypeError(f"{key!r} has the wrong type ({type(value).__name__})")
    return value


def _number_or_none(payload: Mapping[str, Any], key: str) -> float | None:
    value = payload.get(key)
    if value is None:
        return None
    return float(_check(value, (int, float), key))

"""The wire format: what a task message's body says, and how it is checked.

A body is JSON (``"v": 1``), written compactly with non-ASCII text as UTF-8, so that sizes
are what SQS counts: UTF-8 bytes. Decoding never imports or calls anything: it yields a task
*name* that the worker looks up in the registry. Decoding is total: whatever a body holds, it
either decodes or raises :class:`~ebsqs.errors.EnvelopeError` (so one hostile body is
dead-lettered alone, and never takes its batch or its process down). Bodies written by
django-eb-sqs are read too, so a fleet can move while old producers still send; their pickled
form is refused unless the worker was told to accept pickle, because unpickling runs code
chosen by whoever wrote the body.

A signed body is ``{"sig":"<hex>",`` followed by the rest of the JSON object that was signed:
the HMAC-SHA256 covers those exact bytes, and the object carries its signing time
(``signed_at``) for workers that refuse old signatures.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import pickle
import random
import re
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

from ebsqs.errors import EnvelopeError, SerializationError

VERSION = 1

#: The largest body decoded: SQS's largest message (1 MiB). Larger ones are refused unparsed.
MAX_BODY_BYTES = 1024 * 1024
#: The deepest nesting of arrays and objects decoded. Task arguments are a few levels deep;
#: the parser recurses once per level, so deeper bodies are refused before parsing.
MAX_DEPTH = 100
#: The longest integer literal decoded, in digits (Python's own default limit). Converting
#: digits to an int takes time quadratic in their number, so the check comes first.
MAX_INT_DIGITS = 4300

#: One encoder for every body: json.dumps with options builds a new encoder on each call.
#: ``ensure_ascii=False``: "€" is 3 bytes of UTF-8 on the wire, not a 6-byte escape.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False)

_SIGNED_PREFIX = '{"sig":"'
_DIGEST_CHARS = 64  # hex digits of an HMAC-SHA256
#: Code points no UTF-8 text holds (and SQS refuses): lone surrogates.
_SURROGATE = re.compile("[\ud800-\udfff]")
#: Characters SQS refuses raw although they are valid text; escaped on the wire.
_NONCHARACTER = re.compile("[\ufffe\uffff]")
#: A JSON escape of a surrogate (a pair is fine; a lone one is looked for after parsing).
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")
#: A JSON string, or an unterminated one up to the end: every match attempt succeeds at once,
#: so removing strings stays linear whatever the body holds.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\[\s\S]?[^"\\]*)*(?:"|\Z)')
_LONG_DIGITS = re.compile(f"[0-9]{{{MAX_INT_DIGITS + 1}}}")
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
#: How Python words its refusal of a digit string past ``sys.get_int_max_str_digits()``.
_INT_LIMIT_MESSAGE = re.compile(r"integer string conversion: value has (\d+) digits")
_BRACKET_DEPTH = {"[": 1, "{": 1, "]": -1, "}": -1}


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

    def at_attempt(self, attempt: int) -> Envelope:
        """The same message counted as another attempt (a FIFO retry keeps its message)."""
        return _replace(self, attempt=attempt)

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
    signing_key: str | Sequence[str] | None = None,
    legacy: bool = False,
    queue: str | None = None,
) -> str:
    """The body for an envelope: compact JSON, non-ASCII text as UTF-8 (not ``\\u`` escapes).

    Args:
        envelope: what to send.
        signing_key: one key, or the accepted keys of a rotation (the first signs). A signed
            body also carries the time it was signed, for workers that cap a signature's age.
        legacy: write django-eb-sqs's body (never signed: django-eb-sqs cannot check it).
        queue: the logical queue, written into django-eb-sqs bodies.

    Raises:
        SerializationError: an argument JSON cannot carry, or text that is not valid Unicode
            (a lone surrogate), named.
    """
    keys = signing_keys(signing_key)
    payload = _legacy_payload(envelope, queue) if legacy else _payload(envelope)
    if keys and not legacy:
        payload["signed_at"] = time.time()
    try:
        text = _ENCODER.encode(payload)
    except (TypeError, ValueError) as exc:
        raise _explain(envelope, exc) from None
    if not text.isascii():
        text = _sqs_text(text, envelope)
    if keys and not legacy:
        return sign(text, keys[0])
    return text


def signing_keys(keys: str | Sequence[str] | None) -> tuple[str, ...]:
    """Keys as a tuple, the signing one first; empty keys mean none."""
    if keys is None:
        return ()
    if isinstance(keys, str):
        keys = (keys,)
    return tuple(key for key in keys if key)


def sign(text: str, key: str) -> str:
    """A JSON object's text, signed: ``{"sig":"<hex>",`` then the rest of ``text``.

    The HMAC-SHA256 covers the exact UTF-8 bytes of ``text``, which the body carries unchanged
    after the signature, so a worker checks the bytes that were sent, never a re-encoding of
    what it parsed (which differs whenever JSON changed a value: an int key becomes a string).
    """
    if not text.startswith("{") or text == "{}":
        raise ValueError("only a non-empty JSON object can be signed")
    return f'{_SIGNED_PREFIX}{_digest(text.encode(), key)}",{text[1:]}'


def _digest(data: bytes, key: str) -> str:
    return hmac.new(key.encode(), data, hashlib.sha256).hexdigest()


def _sqs_text(text: str, envelope: Envelope) -> str:
    """Non-ASCII JSON text made safe for SQS, which refuses U+FFFE, U+FFFF and surrogates.

    Inside JSON such a character can only be part of a string, where its escape means the same.
    A lone surrogate is refused instead: it is not text, and no UTF-8 encoder writes it.
    """
    if _SURROGATE.search(text):
        raise _explain_surrogate(envelope)
    return _NONCHARACTER.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


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
    for label, value in _named_arguments(envelope):
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as inner:
            return SerializationError(
                f"task {envelope.task!r}: {label} cannot be sent as JSON ({inner}); pass plain "
                "data (str, int, float, bool, None, list, dict), e.g. an ISO date string or an id"
            )
    return SerializationError(f"task {envelope.task!r}: cannot be sent as JSON ({exc})")


def _named_arguments(envelope: Envelope) -> list[tuple[str, Any]]:
    named = [(f"positional argument {i}", value) for i, value in enumerate(envelope.args)]
    return named + [(f"argument {key!r}", value) for key, value in envelope.kwargs.items()]


def _explain_surrogate(envelope: Envelope) -> SerializationError:
    """Name the argument that holds a lone surrogate."""
    for label, value in _named_arguments(envelope):
        if _SURROGATE.search(json.dumps(value, ensure_ascii=False)):
            return SerializationError(
                f"task {envelope.task!r}: {label} holds a lone surrogate, which is not valid "
                "Unicode text (often bytes decoded with errors='surrogateescape'); decode the "
                "bytes properly, or send them as base64"
            )
    return SerializationError(f"task {envelope.task!r}: the message holds a lone surrogate")


def decode(
    body: str | bytes,
    *,
    signing_key: str | Sequence[str] | None = None,
    accept_pickle: bool = False,
    max_signature_age: float | None = None,
    max_bytes: int = MAX_BODY_BYTES,
) -> Envelope:
    """The envelope a body carries, checked. Total: any body either decodes or raises
    :class:`~ebsqs.errors.EnvelopeError` saying what is wrong with it.

    Size and nesting depth are checked before the body is parsed, and numbers while it is, so
    no body can exhaust the stack, the CPU or the memory.

    Args:
        body: the message body.
        signing_key: the accepted key, or keys (any of them may have signed). When given,
            unsigned and badly signed bodies are refused.
        accept_pickle: read pickled django-eb-sqs bodies (unpickling runs the sender's code).
        max_signature_age: refuse signed bodies signed longer ago than this (seconds).
        max_bytes: refuse bodies larger than this (UTF-8 bytes).

    Raises:
        EnvelopeError: the body is too large or too deep, not JSON, not an ebsqs or
            django-eb-sqs body, has a field of the wrong type, is unsigned, badly signed or
            signed too long ago, or asks for pickle that this worker refuses. Such messages are
            dead-lettered, never retried.
    """
    keys = signing_keys(signing_key)
    try:
        text = _bounded_text(body, max_bytes)
        payload = _authenticated(text, keys, max_signature_age) if keys else _parse(text)
        return _envelope_of(payload, accept_pickle)
    except EnvelopeError:
        raise
    # The checks above should leave nothing to catch here; this is the guarantee that a body
    # never takes its batch (or its process) down with it, whatever was missed.
    except (ArithmeticError, LookupError, RecursionError, TypeError, ValueError) as exc:
        raise EnvelopeError(
            f"body cannot be decoded ({type(exc).__name__}: {_short(exc)})"
        ) from None


def _bounded_text(body: str | bytes, max_bytes: int) -> str:
    """The body as valid text within ``max_bytes`` and :data:`MAX_DEPTH`, not yet parsed."""
    if isinstance(body, bytes):
        if len(body) > max_bytes:
            raise EnvelopeError(f"body is {len(body)} bytes, over the limit of {max_bytes}")
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EnvelopeError(f"body is not valid UTF-8 ({exc})") from None
    if not isinstance(body, str):
        raise EnvelopeError(f"body is {type(body).__name__}, not text")
    # Characters never outnumber bytes: the cheap test first, then the exact count.
    if len(body) > max_bytes:
        raise EnvelopeError(f"body is over {max_bytes} bytes ({len(body)} characters)")
    if not body.isascii():  # ASCII (most bodies) has no surrogates and a byte per character
        _refuse_raw_surrogate(body)
        size = len(body.encode())
        if size > max_bytes:
            raise EnvelopeError(f"body is {size} bytes, over the limit of {max_bytes}")
    _check_depth(body)
    return body


def _refuse_raw_surrogate(text: str) -> None:
    found = _SURROGATE.search(text)
    if found:
        raise EnvelopeError(
            f"body holds a lone surrogate (U+{ord(found.group()):04X}) at character "
            f"{found.start()}: not valid Unicode text"
        )


def _check_depth(text: str) -> None:
    """Refuse text nested deeper than :data:`MAX_DEPTH`, without parsing it."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return  # too few brackets to nest that deep: every ordinary body stops here
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    depth = max(accumulate(map(_BRACKET_DEPTH.__getitem__, brackets)), default=0)
    if depth > MAX_DEPTH:
        raise EnvelopeError(
            f"body nests arrays or objects {depth} levels deep, over the limit of {MAX_DEPTH} "
            "(ebsqs.envelope.MAX_DEPTH): refused unparsed"
        )


def _parse(text: str) -> dict[str, Any]:
    """The JSON object ``text`` holds (size and depth already checked)."""
    # Python refuses to convert longer digit strings itself (ValueError, before the quadratic
    # work) unless an application raised or lifted that limit; only then is a scan needed.
    if 0 < sys.get_int_max_str_digits() <= MAX_INT_DIGITS or not _LONG_DIGITS.search(text):
        decoder = _DECODER
    else:
        decoder = _INT_CHECKING_DECODER
    try:
        payload = decoder.decode(text)
    except ValueError as exc:
        digits = _INT_LIMIT_MESSAGE.search(str(exc))
        if digits:  # Python's own digit limit: say it as the int-checking decoder would
            raise EnvelopeError(
                f"body holds an integer of {digits.group(1)} digits, over the limit of "
                f"{MAX_INT_DIGITS}: refused"
            ) from None
        raise EnvelopeError(f"body is not JSON ({_short(exc)})") from None
    if not isinstance(payload, dict):
        raise EnvelopeError(f"body is JSON {_json_kind(payload)}, not an object")
    if "\\u" in text and _ESCAPED_SURROGATE.search(text):
        _refuse_lone_surrogates(payload)
    return payload


def _refuse_lone_surrogates(payload: dict[str, Any]) -> None:
    """Refuse a payload where an escape left a lone surrogate (escaped pairs are fine)."""
    try:
        json.dumps(payload, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise EnvelopeError(
            "body holds an escaped lone surrogate (\\ud800-\\udfff without its pair): "
            "not valid Unicode text"
        ) from None


def _json_int(digits: str) -> int:
    # Called before conversion, which takes time quadratic in the number of digits.
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise EnvelopeError(
            f"body holds an integer of {len(digits.lstrip('-'))} digits, over the limit of "
            f"{MAX_INT_DIGITS}: refused"
        )
    return int(digits)


def _json_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise EnvelopeError(f"body holds the number {literal[:40]}, out of a float's range")
    return value


def _json_constant(name: str) -> float:
    raise EnvelopeError(f"body holds {name}, which is not JSON and not a number ebsqs sends")


_DECODER = json.JSONDecoder(parse_float=_json_float, parse_constant=_json_constant)
#: Checks every integer literal too: a Python call per integer, so only for bodies that hold a
#: run of digits too long for one (:data:`_LONG_DIGITS`).
_INT_CHECKING_DECODER = json.JSONDecoder(
    parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant
)


def _authenticated(text: str, keys: Sequence[str], max_age: float | None) -> dict[str, Any]:
    """The payload of a body signed by one of ``keys``, checked before it is parsed."""
    if not text.startswith(_SIGNED_PREFIX):
        return _verified_whole_payload(_parse(text), keys, max_age)
    end = len(_SIGNED_PREFIX) + _DIGEST_CHARS
    signature, signed = text[len(_SIGNED_PREFIX) : end], "{" + text[end + 2 :]
    data = signed.encode()
    if text[end : end + 2] != '",' or not any(
        hmac.compare_digest(signature, _digest(data, key)) for key in keys
    ):
        raise EnvelopeError("body's signature does not match any accepted signing key: refused")
    payload = _parse(signed)
    if max_age is not None:
        _check_age(payload.get("signed_at"), max_age)
    return payload


def _check_age(signed_at: Any, max_age: float) -> None:
    if not isinstance(signed_at, int | float) or isinstance(signed_at, bool):
        raise EnvelopeError("signed body carries no signing time ('signed_at'): refused")
    age = time.time() - signed_at
    if age > max_age:
        raise EnvelopeError(
            f"body was signed {age:.0f} s ago, over signature_max_age ({max_age:g} s): refused "
            "as a replay or a message that waited too long"
        )


def _verified_whole_payload(
    payload: dict[str, Any], keys: Sequence[str], max_age: float | None
) -> dict[str, Any]:
    """Check the signature of a body signed before signatures covered the exact bytes.

    Such producers signed the sorted re-encoding of the payload. Reading that form lets the
    workers of a fleet be upgraded before its producers; it carries no signing time.
    """
    signature = payload.get("sig")
    if not isinstance(signature, str):
        raise EnvelopeError("body is not signed, and this worker requires signed bodies")
    if max_age is not None:
        raise EnvelopeError(
            "body is signed in the older whole-payload form, which carries no signing time: "
            "refused because signature_max_age is set"
        )
    canonical = json.dumps(
        {k: v for k, v in payload.items() if k != "sig"}, sort_keys=True, separators=(",", ":")
    ).encode()
    if not any(hmac.compare_digest(signature, _digest(canonical, key)) for key in keys):
        raise EnvelopeError("body's signature does not match any accepted signing key: refused")
    return payload


def _envelope_of(payload: dict[str, Any], accept_pickle: bool) -> Envelope:
    if "func" in payload and "v" not in payload:
        return _decode_legacy(payload, accept_pickle)
    version = payload.get("v")
    if type(version) is not int or version != VERSION:
        raise EnvelopeError(f"unsupported envelope version {_short(repr(version))}")
    try:
        return Envelope(
            task=_text(payload, "task"),
            args=tuple(_typed(payload, "args", list, [])),
            kwargs=_typed(payload, "kwargs", dict, {}),
            id=_text(payload, "id"),
            attempt=_count(payload, "attempt", 1, minimum=1),
            max_retries=_count(payload, "max_retries", 0, minimum=0),
            due=_number_or_none(payload, "due"),
            enqueued_at=float(_typed(payload, "enqueued_at", (int, float), 0.0)),
            trace=_trace(payload),
        )
    except (TypeError, ValueError) as exc:
        raise EnvelopeError(f"malformed envelope: {exc}") from None


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
        # django-eb-sqs writes null for absent counts; its maxRetries counts attempts.
        max_attempts = _count({"maxRetries": payload.get("maxRetries") or 0}, "maxRetries", 0)
        retry = _count({"retry": payload.get("retry") or 0}, "retry", 0)
        task_id = payload.get("id")
        return Envelope(
            task=_text(payload, "func"),
            args=tuple(_check(args, (list, tuple), "args")),
            kwargs=_check(kwargs, dict, "kwargs"),
            id=_text(payload, "id") if task_id else str(uuid.uuid4()),
            attempt=retry + 1,
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
        raise ValueError(f"{key!r} must be a non-empty string, got {_json_kind(value)}")
    return value


def _typed(payload: Mapping[str, Any], key: str, kind: Any, default: Any) -> Any:
    value = payload.get(key, default)
    if value is default:
        return value
    return _check(value, kind, key)


def _check(value: Any, kind: Any, key: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise TypeError(f"{key!r} has the wrong type ({_json_kind(value)})")
    return value


def _count(payload: Mapping[str, Any], key: str, default: int, minimum: int = 0) -> int:
    value: int = _typed(payload, key, int, default)
    if value < minimum:
        raise ValueError(f"{key!r} must be at least {minimum}, got {value}")
    return value


def _number_or_none(payload: Mapping[str, Any], key: str) -> float | None:
    value = payload.get(key)
    if value is None:
        return None
    return float(_check(value, (int, float), key))


def _trace(payload: Mapping[str, Any]) -> dict[str, str] | None:
    trace: dict[str, Any] | None = _typed(payload, "trace", dict, None)
    if trace is not None and not all(isinstance(value, str) for value in trace.values()):
        raise TypeError("'trace' must map names to strings")
    return trace


def _json_kind(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    kinds = {
        bool: "boolean",
        int: "integer",
        float: "float",
        str: "string",
        list: "array",
    }
    if value is None:
        return "null"
    return kinds.get(type(value), "object" if isinstance(value, dict) else type(value).__name__)


def _short(value: object, limit: int = 200) -> str:
    """Text of a value for a message, cut: the body may be a megabyte of hostile data."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}..."

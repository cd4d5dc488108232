"""Logging: ebsqs emits through Python's ``logging``, the structlog way; entry points configure it.

- Modules log with :func:`get_logger` (structlog over ``logging.getLogger(__name__)``): nothing
  is configured at import or on ``.delay()``. A process that configured no logging prints
  nothing from ebsqs (a ``NullHandler`` on ``ebsqs`` keeps even warnings from logging's
  last-resort handler); one that did gets ebsqs's lines as plain records (message: the event's
  name; fields: attributes), like any library's.
- :func:`configure` (``ebsqs worker``, ``supervise``, each child after the fork) puts one handler
  on the root logger, so the application's own lines come out in the same console or JSON
  format. Every line inside a task carries ``task``, ``task_id``, ``message_id``, ``queue`` and
  ``attempt`` from :mod:`ebsqs.context`, which every executor sets around each attempt (in the
  process executor, in the pool process).
- ``EBSQS_LOG_HANDLERS=keep`` leaves ``logging``'s handlers and levels to the application (the
  Django commands set it when ``LOGGING`` configures the root or ``ebsqs`` logger).

A log line that cannot be written never stops the process: a full disk, a closed pipe (journald
restarting, a ``| head`` that exited), a terminal that went away. The line is dropped and
counted (:func:`dropped_lines`), and work carries on.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import EventDict

from ebsqs.context import TaskContext, current_or_none

LogFormat = Literal["auto", "console", "json"]
LEVELS = ("debug", "info", "warning", "error", "critical")
#: ``keep``: :func:`configure` leaves ``logging``'s handlers and levels to whoever set them.
HANDLERS_ENV = "EBSQS_LOG_HANDLERS"


def configure(log_format: LogFormat = "auto", level: str = "info", **bound: Any) -> None:
    """Configure this process's logging: structlog through ``logging``, one handler on the root.

    The root logger gets one handler writing to stderr through :class:`Output` (replacing the
    one a previous call added, as in a child after the fork) and the level, so the
    application's own ``logging`` lines come out in the same format as ebsqs's, with the same
    context. structlog is configured to hand its events to ``logging`` as plain records.

    With ``EBSQS_LOG_HANDLERS=keep`` in the environment (set by the Django commands when
    ``LOGGING`` configures the root or ``ebsqs`` logger), ``logging``'s handlers and levels are
    left as they are: only structlog and the bound context are set.

    Args:
        log_format: ``console`` (readable), ``json`` (one object per line with a timestamp), or
            ``auto``: console on a terminal, JSON otherwise.
        level: the lowest level written.
        **bound: context every line of this process carries (``role``, ``queue``, ``pid``).
    """
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    structlog.configure(
        processors=_LIBRARY_CHAIN.copy(),
        wrapper_class=BoundLogger,
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    if os.environ.get(HANDLERS_ENV, "ebsqs") != "keep":
        root = logging.getLogger()
        for old in [h for h in root.handlers if isinstance(h, OutputHandler)]:
            root.removeHandler(old)
        root.addHandler(handler(log_format))
        root.setLevel(level.upper())
    if bound:
        structlog.contextvars.bind_contextvars(**bound)


def handler(log_format: LogFormat = "auto", stream: TextIO | None = None) -> OutputHandler:
    """A ``logging`` handler writing ebsqs's format to ``stream`` (stderr), dropping on failure.

    For ``LOGGING`` (``"()": "ebsqs.log.handler"``) or :func:`configure`.
    """
    stream = sys.stderr if stream is None else stream
    if log_format == "auto":
        log_format = "console" if _isatty(stream) else "json"
    render: Callable[[str, EventDict], str] = (
        _render_json
        if log_format == "json"
        else _console_renderer(structlog.dev.ConsoleRenderer(colors=_isatty(stream)))
    )
    out = OutputHandler(Output(stream))
    out.setFormatter(Formatter(render))
    return out


def get_logger(name: str) -> Any:
    """The logger an ebsqs module logs with: structlog over ``logging.getLogger(name)``.

    Nothing is configured here or at import: events go to Python's ``logging`` under ``name``
    (``ebsqs.*``), where the application's handlers, ``LOGGING`` or :func:`configure` decide
    what is written. See :class:`_Chain` for the processors.
    """
    return BoundLogger(logging.getLogger(name), processors=_CHAIN, context={})


def dropped_lines() -> int:
    """Log lines this process could not write (and dropped) since logging was configured.

    Each process counts its own: a supervisor's child starts again from 0 when it configures
    logging after the fork. 0 when logging was configured by someone other than
    :func:`configure`.
    """
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, OutputHandler)]
    return sum(h.output.dropped for h in handlers)


class Output:
    """Where :class:`OutputHandler` writes: each rendered line whole, or dropped and counted.

    Lines go straight to the stream's file descriptor, bypassing Python's buffer: a write that
    fails then leaves nothing behind to fail again at the next line, or at interpreter exit. A
    stream without a descriptor (a test's capture) is written and flushed as a stream.

    Thread-safe. The lock only keeps a line longer than a pipe's atomic size from interleaving
    with another thread's; a process forked while another thread held it takes a fresh one.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._fd = _fileno(stream)
        self._encoding = getattr(stream, "encoding", None) or "utf-8"
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.dropped = 0

    def write(self, message: str) -> None:
        """Write one rendered line; on any failure to write, drop it and count it."""
        if self._pid != os.getpid():
            self._lock, self._pid = threading.Lock(), os.getpid()
        with self._lock:
            try:
                self._write(message + "\n")
            except (OSError, ValueError):  # ENOSPC, EPIPE, EIO, EAGAIN, EBADF; a closed file
                self.dropped += 1

    def _write(self, line: str) -> None:
        if self._fd is None:
            self._stream.write(line)
            self._stream.flush()
            return
        data = memoryview(line.encode(self._encoding, "backslashreplace"))
        while data:  # a pipe may take a long line in parts
            data = data[os.write(self._fd, data) :]


class OutputHandler(logging.Handler):
    """A ``logging`` handler whose formatted lines go to an :class:`Output`: never raises."""

    def __init__(self, output: Output) -> None:
        super().__init__()
        self.output = output

    def handle(self, record: logging.LogRecord) -> Any:
        """Filter and emit, without ``logging``'s handler lock: :class:`Output` has its own,
        and a line is formatted outside any lock."""
        passed = self.filter(record)
        if passed:
            self.emit(passed if isinstance(passed, logging.LogRecord) else record)
        return passed

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is dropped too
            self.output.dropped += 1
            return
        self.output.write(line)


def _fileno(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    except (OSError, ValueError, AttributeError):  # no descriptor, or closed
        return None


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError, AttributeError):  # closed: certainly not a terminal
        return False


class BoundLogger(structlog.stdlib.BoundLogger):
    """structlog's stdlib logger, with a short way to ``logging`` for ebsqs's own chain.

    When the processors are ebsqs's own (:func:`configure`, or nobody configured structlog), a
    line below the logger's level costs one level check, and one above it goes straight to a
    ``logging`` record, as the chain would make it, without running the chain: a worker writes
    a line per task. Any other chain (``capture_logs()``, an application's own structlog
    setup) and positional arguments take structlog's usual way.
    """

    def is_enabled_for(self, level: int) -> bool:
        """Whether a line at ``level`` would reach a handler (or a test's capture).

        A chain without ``filter_by_level`` (``capture_logs()``, an application's own
        structlog setup) passes every level on; otherwise the stdlib logger's level decides.
        """
        if structlog.stdlib.filter_by_level not in self._processors:
            return True
        return super().is_enabled_for(level)

    def _proxy_to_logger(
        self, method_name: str, event: str | None = None, *event_args: str, **event_kw: Any
    ) -> Any:
        level = _LEVELS_BY_METHOD.get(method_name)
        if level is None or event_args or not _is_library_chain(self._processors):
            return super()._proxy_to_logger(method_name, event, *event_args, **event_kw)
        logger: logging.Logger = self._logger
        if logger.isEnabledFor(level):
            fields = {**self._context, **event_kw} if self._context else event_kw
            # Two frames up: the caller of .info() (or .log()), as logging's findCaller says.
            _emit(logger, level, "" if event is None else event, fields, sys._getframe(2))
        return None


def _emit(
    logger: logging.Logger, level: int, event: str, fields: dict[str, Any], caller: FrameType
) -> None:
    """What :func:`_to_record` and ``logging.Logger._log`` do for a line, the caller known.

    ``exc_info``, ``stack_info`` and ``stacklevel`` mean what they mean to ``logging``.
    """
    exc_info = fields.pop("exc_info", None)
    stack_info = fields.pop("stack_info", False)
    for _ in range(fields.pop("stacklevel", 1) - 1):
        caller = caller.f_back or caller
    extra = {key: value for key, value in fields.items() if key not in _RECORD_ATTRS}
    extra[_FIELDS] = fields
    if isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    elif exc_info and not isinstance(exc_info, tuple):
        exc_info = sys.exc_info()
    if getattr(logging, "_srcfile", None) is None:  # caller lookup turned off, as logging allows
        path, line, function = "(unknown file)", 0, "(unknown function)"
    else:
        code = caller.f_code
        path, line, function = code.co_filename, caller.f_lineno, code.co_name
    record = logger.makeRecord(
        logger.name, level, path, line, event, (), exc_info or None, function, extra,
        _stack(caller) if stack_info else None,
    )  # fmt: skip
    logger.handle(record)


def _stack(frame: FrameType) -> str:
    """``logging``'s ``stack_info`` text, from ``frame`` up."""
    text = "".join(traceback.format_stack(frame))
    return "Stack (most recent call last):\n" + text.removesuffix("\n")


def _is_library_chain(processors: Any) -> bool:
    if processors is _CHAIN:
        processors = _CHAIN.current()
    return bool(processors == _LIBRARY_CHAIN)


class _Chain:
    """ebsqs's processors: structlog's configured ones if someone configured structlog, else ours.

    Read at each bind, not at import: an entry point (:func:`configure`) or an application that
    configured structlog (or a test's ``structlog.testing.capture_logs()``) is followed; an
    unconfigured process (a web process calling ``.delay()``) gets a plain stdlib record, rendered
    by whatever handlers its ``logging`` has, and nothing at all below the logger's level.
    """

    def __iter__(self) -> Iterator[Any]:
        return iter(self.current())

    def current(self) -> Any:
        """The processors in effect now."""
        if structlog.is_configured():
            return structlog.get_config()["processors"]
        return _LIBRARY_CHAIN


def add_task_context(_: Any, __: str, event: EventDict) -> EventDict:
    """structlog processor: the running task's ``task``, ``task_id``, ``message_id``, ``queue``
    and ``attempt`` (from :mod:`ebsqs.context`, set around each attempt in every executor)."""
    ctx = current_or_none()
    if ctx is not None:
        for key, value in _task_fields(ctx).items():
            event.setdefault(key, value)
    return event


class TaskContextFilter(logging.Filter):
    """A ``logging`` filter giving each record inside a task the same fields as attributes.

    For handlers of one's own (``LOGGING``'s ``"filters"``: ``{"()":
    "ebsqs.log.TaskContextFilter"}``); ebsqs's handler adds them without it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = current_or_none()
        if ctx is not None:
            for key, value in _task_fields(ctx).items():
                if not hasattr(record, key):
                    setattr(record, key, value)
        return True


def _task_fields(ctx: TaskContext) -> dict[str, Any]:
    return {
        "task": ctx.task_name,
        "task_id": ctx.task_id,
        "message_id": ctx.message_id,
        "queue": ctx.queue,
        "attempt": ctx.attempt,
    }


#: What a LogRecord has of its own: an event's field by one of these names travels only whole.
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_FIELDS = "_ebsqs_fields"  # a leading underscore: Sentry leaves it out of an event's extra
_LOG_KWARGS = ("exc_info", "stack_info", "stacklevel")


def _to_record(_: Any, __: str, event: EventDict) -> dict[str, Any]:
    """structlog's last processor: an event becomes a plain stdlib record.

    The message is the event's name and each field an attribute (``extra``), as any ``logging``
    handler (Sentry's, Django's) expects; the whole event also rides along for
    :func:`_record_fields`, so a field named like a record attribute is kept, not refused.
    """
    kwargs = {key: event.pop(key) for key in _LOG_KWARGS if key in event}
    name = event.pop("event", "")
    extra = {key: value for key, value in event.items() if key not in _RECORD_ATTRS}
    extra[_FIELDS] = event
    return {"msg": name, "extra": extra, **kwargs}


class Formatter(logging.Formatter):
    """ebsqs's line for any record: its event, its fields, the task's context, level and time.

    An ebsqs event's own fields, or the ``extra`` attributes of the application's records; then
    the running task's fields (:func:`add_task_context`), structlog's contextvars (``role``,
    ``pid``), ``level`` and ``timestamp`` (UTC, ISO 8601, to the microsecond), and the formatted
    ``exception``; rendered by ``render`` (JSON, or structlog's console renderer). Built
    directly rather than by structlog's ``ProcessorFormatter``: a worker writes one per task.
    """

    def __init__(self, render: Callable[[str, EventDict], str]) -> None:
        super().__init__()
        self._render = render
        self._second: tuple[int, str] = (-1, "")  # the last second formatted, as text

    def format(self, record: logging.LogRecord) -> str:
        event: EventDict = {"event": record.getMessage()}
        if record.stack_info:
            event["stack_info"] = record.stack_info
        fields = getattr(record, _FIELDS, None)
        if fields is None:
            fields = {
                key: value
                for key, value in vars(record).items()
                if key not in _RECORD_ATTRS and not key.startswith("_")
            }
        event.update(fields)
        add_task_context(None, "", event)
        structlog.contextvars.merge_contextvars(None, "", event)
        level = record.levelname.lower()
        event["level"] = level
        event["timestamp"] = self._timestamp(record.created)
        if record.exc_info:
            event["exc_info"] = record.exc_info
            event = structlog.processors.format_exc_info(None, level, event)
        return self._render(level, event)

    def _timestamp(self, created: float) -> str:
        second, micros = divmod(int(created * 1_000_000), 1_000_000)
        cached, text = self._second  # one tuple: a thread never sees half of another's update
        if second != cached:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, text)
        return f"{text}.{micros:06d}Z"


def _render_json(_: str, event: EventDict) -> str:
    return "".join(_JSON(event, 0))


def _console_renderer(renderer: structlog.dev.ConsoleRenderer) -> Callable[[str, EventDict], str]:
    def render(level: str, event: EventDict) -> str:
        return str(renderer(None, level, event))

    return render


def _json_fallback(value: Any) -> Any:
    """structlog's JSONRenderer's: ``__structlog__()`` if a value has it, else its ``repr``."""
    try:
        return value.__structlog__()
    except AttributeError:
        return repr(value)


def _json_encoder() -> Callable[[Any, int], Any]:
    """``json.dumps``'s C encoder, made once rather than at every line, as ``json.dumps``
    would: the same text (``default=`` as structlog's JSONRenderer). No check for circular
    values: one recurses until ``RecursionError``, and the line is dropped and counted."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # an interpreter without the C accelerator
        encoder = json.JSONEncoder(default=_json_fallback, check_circular=False)
        return lambda value, _: (encoder.encode(value),)
    return make(  # type: ignore[no-any-return]
        None, _json_fallback, json.encoder.encode_basestring_ascii, None, ": ", ", ",
        False, False, True,
    )  # fmt: skip


_JSON = _json_encoder()
_LEVELS_BY_METHOD = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "exception": logging.ERROR,  # structlog's exception() has set exc_info
}
# The first processor drops a line below its logger's level before any work is done on it.
_LIBRARY_CHAIN: list[Any] = [structlog.stdlib.filter_by_level, _to_record]
_CHAIN = _Chain()

# Python's advice to libraries: without it, a process that configured no logging would get
# ebsqs's warnings on stderr from logging's last-resort handler. Silent unless configured.
logging.getLogger("ebsqs").addHandler(logging.NullHandler())

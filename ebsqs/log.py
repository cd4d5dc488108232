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

import logging
import os
import sys
import threading
from collections.abc import Iterator
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
    context. structlog is configured for the stdlib (``ProcessorFormatter``).

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
        wrapper_class=structlog.stdlib.BoundLogger,
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
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=_isatty(stream))
    )
    out = OutputHandler(Output(stream))
    out.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                _record_fields,
                add_task_context,
                structlog.contextvars.merge_contextvars,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    return out


def get_logger(name: str) -> Any:
    """The logger an ebsqs module logs with: structlog over ``logging.getLogger(name)``.

    Nothing is configured here or at import: events go to Python's ``logging`` under ``name``
    (``ebsqs.*``), where the application's handlers, ``LOGGING`` or :func:`configure` decide
    what is written. See :class:`_Chain` for the processors.
    """
    return structlog.wrap_logger(
        logging.getLogger(name), processors=_CHAIN, wrapper_class=BoundLogger
    )


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
    """structlog's stdlib logger, enabled for a level when its processors would pass it on."""

    def is_enabled_for(self, level: int) -> bool:
        """Whether a line at ``level`` would reach a handler (or a test's capture).

        A chain without ``filter_by_level`` (``capture_logs()``, an application's own
        structlog setup) passes every level on; otherwise the stdlib logger's level decides.
        """
        if structlog.stdlib.filter_by_level not in self._processors:
            return True
        return super().is_enabled_for(level)


class _Chain:
    """ebsqs's processors: structlog's configured ones if someone configured structlog, else ours.

    Read at each bind, not at import: an entry point (:func:`configure`) or an application that
    configured structlog (or a test's ``structlog.testing.capture_logs()``) is followed; an
    unconfigured process (a web process calling ``.delay()``) gets a plain stdlib record, rendered
    by whatever handlers its ``logging`` has, and nothing at all below the logger's level.
    """

    def __iter__(self) -> Iterator[Any]:
        if structlog.is_configured():
            return iter(structlog.get_config()["processors"])
        return iter(_LIBRARY_CHAIN)


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


def _record_fields(_: Any, __: str, event: EventDict) -> EventDict:
    """``ProcessorFormatter``'s first processor: a record's fields back into the event.

    An ebsqs event's own fields, or the ``extra`` attributes of the application's records.
    """
    record: logging.LogRecord = event["_record"]
    fields = getattr(record, _FIELDS, None)
    if fields is None:
        fields = {
            key: value
            for key, value in vars(record).items()
            if key not in _RECORD_ATTRS and not key.startswith("_")
        }
    event.update(fields)
    return event


# The first processor drops a line below its logger's level before any work is done on it.
_LIBRARY_CHAIN: list[Any] = [structlog.stdlib.filter_by_level, _to_record]
_CHAIN = _Chain()

# Python's advice to libraries: without it, a process that configured no logging would get
# ebsqs's warnings on stderr from logging's last-resort handler. Silent unless configured.
logging.getLogger("ebsqs").addHandler(logging.NullHandler())

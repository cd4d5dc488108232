"""structlog configuration, called only by entry points (and again in each child after fork).

A log line that cannot be written never stops the process: a full disk, a closed pipe (journald
restarting, a ``| head`` that exited), a terminal that went away. The line is dropped and
counted (:func:`dropped_lines`), and work carries on.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, Literal, TextIO

import structlog

LogFormat = Literal["auto", "console", "json"]
LEVELS = ("debug", "info", "warning", "error", "critical")


def configure(log_format: LogFormat = "auto", level: str = "info", **bound: Any) -> None:
    """Configure structlog for this process.

    Args:
        log_format: ``console`` (readable), ``json`` (one object per line with a timestamp), or
            ``auto``: console on a terminal, JSON otherwise.
        level: the lowest level written.
        **bound: context every line of this process carries (``role``, ``queue``, ``pid``).
    """
    if log_format == "auto":
        log_format = "console" if _isatty(sys.stderr) else "json"
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=_isatty(sys.stderr))
    )
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=OutputFactory(Output(sys.stderr)),
        cache_logger_on_first_use=False,
    )
    if bound:
        structlog.contextvars.bind_contextvars(**bound)


def dropped_lines() -> int:
    """Log lines this process could not write (and dropped) since logging was configured.

    Each process counts its own: a supervisor's child starts again from 0 when it configures
    logging after the fork. 0 when logging was configured by someone other than
    :func:`configure`.
    """
    factory = structlog.get_config().get("logger_factory")
    return factory.output.dropped if isinstance(factory, OutputFactory) else 0


class Output:
    """The end of structlog's chain: writes each rendered line whole, or drops and counts it.

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

    def msg(self, message: str) -> None:
        """Write one rendered line; on any failure to write, drop it and count it."""
        if self._pid != os.getpid():
            self._lock, self._pid = threading.Lock(), os.getpid()
        with self._lock:
            try:
                self._write(message + "\n")
            except (OSError, ValueError):  # ENOSPC, EPIPE, EIO, EAGAIN, EBADF; a closed file
                self.dropped += 1

    # structlog calls the method named after the level; every level is one line.
    debug = info = warning = warn = error = err = critical = exception = fatal = failure = msg
    log = msg

    def _write(self, line: str) -> None:
        if self._fd is None:
            self._stream.write(line)
            self._stream.flush()
            return
        data = memoryview(line.encode(self._encoding, "backslashreplace"))
        while data:  # a pipe may take a long line in parts
            data = data[os.write(self._fd, data) :]


class OutputFactory:
    """structlog's logger factory: every logger of this process writes to one :class:`Output`."""

    def __init__(self, output: Output) -> None:
        self.output = output

    def __call__(self, *args: Any) -> Output:
        return self.output


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

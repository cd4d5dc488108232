"""structlog configuration, called only by entry points (and again in each child after fork)."""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

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
        log_format = "console" if sys.stderr.isatty() else "json"
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
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
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    if bound:
        structlog.contextvars.bind_contextvars(**bound)

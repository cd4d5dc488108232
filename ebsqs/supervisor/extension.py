"""Extension points of the master: typed no-op methods that integrations override.

sd_notify, ``ebsqs status``, health checks and metrics build on these and on
:meth:`Master.snapshot() <ebsqs.supervisor.master.Master.snapshot>`. Every method runs in the
master's loop, between its decisions: keep it quick and never block (no network calls without
a short timeout). An exception is logged and does not stop the master.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from ebsqs.supervisor.heartbeat import Beat
    from ebsqs.supervisor.master import Master
    from ebsqs.supervisor.process import ExitStatus
    from ebsqs.supervisor.table import ChildRecord, Verdict

log = structlog.get_logger(__name__)


class Extension:
    """No-op base class; override what you need."""

    def on_starting(self, master: Master) -> None:
        """The app is imported and the first children are about to be forked."""

    def on_ready(self, master: Master) -> None:
        """Every slot has a consuming child for the first time (sd_notify ``READY=1``)."""

    def on_tick(self, master: Master) -> None:
        """Once per loop iteration, at least once a second (``WATCHDOG=1``, ``STATUS=``)."""

    def on_reload(self, master: Master) -> None:
        """A HUP started a rolling restart (``RELOADING=1``)."""

    def on_reloaded(self, master: Master) -> None:
        """Every child now runs the code imported after the last HUP (``READY=1``)."""

    def on_stopping(self, master: Master, graceful: bool) -> None:
        """A stop began: a graceful drain, or a fast stop (``STOPPING=1``,
        ``EXTEND_TIMEOUT_USEC`` during a long drain)."""

    def on_stopped(self, master: Master, exit_code: int) -> None:
        """Every child is gone; the master is about to exit with ``exit_code``."""

    def on_heartbeat(self, master: Master, child: ChildRecord, beat: Beat) -> None:
        """A heartbeat from ``child`` was recorded (metrics: its cumulative counters)."""

    def on_child_exited(
        self, master: Master, child: ChildRecord, status: ExitStatus, verdict: Verdict
    ) -> None:
        """``child`` was reaped, after its last heartbeats were read (metrics: retire its
        counters; count crashes and kills)."""


class Extensions(Extension):
    """Several extensions called in order; one failing does not stop the others."""

    def __init__(self, extensions: Sequence[Extension] = ()) -> None:
        self.items = list(extensions)

    def _each(self, event: str, call: Callable[[Extension], None]) -> None:
        for extension in self.items:
            try:
                call(extension)
            except Exception as exc:  # noqa: BLE001 - an extension must not take the master down
                log.error(
                    "extension_failed",
                    extension=type(extension).__name__,
                    hook=event,
                    error=repr(exc),
                )

    def on_starting(self, master: Master) -> None:
        self._each("on_starting", lambda e: e.on_starting(master))

    def on_ready(self, master: Master) -> None:
        self._each("on_ready", lambda e: e.on_ready(master))

    def on_tick(self, master: Master) -> None:
        self._each("on_tick", lambda e: e.on_tick(master))

    def on_reload(self, master: Master) -> None:
        self._each("on_reload", lambda e: e.on_reload(master))

    def on_reloaded(self, master: Master) -> None:
        self._each("on_reloaded", lambda e: e.on_reloaded(master))

    def on_stopping(self, master: Master, graceful: bool) -> None:
        self._each("on_stopping", lambda e: e.on_stopping(master, graceful))

    def on_stopped(self, master: Master, exit_code: int) -> None:
        self._each("on_stopped", lambda e: e.on_stopped(master, exit_code))

    def on_heartbeat(self, master: Master, child: ChildRecord, beat: Beat) -> None:
        self._each("on_heartbeat", lambda e: e.on_heartbeat(master, child, beat))

    def on_child_exited(
        self, master: Master, child: ChildRecord, status: ExitStatus, verdict: Verdict
    ) -> None:
        self._each("on_child_exited", lambda e: e.on_child_exited(master, child, status, verdict))

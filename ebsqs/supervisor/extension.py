"""Extension points of the master: typed no-op methods that integrations override.

sd_notify, ``ebsqs status``, health checks and metrics (:mod:`ebsqs.ops`) build on these. An
extension sees the master only through frozen snapshots (:class:`SupervisorSnapshot`,
:class:`ChildSnapshot`): it can report on the supervisor, never change it. Every method runs in
the master's loop, between its decisions: keep it quick and never block (no network calls
without a short timeout). An exception is logged and does not stop the master.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ebsqs.errors import ConfigurationError
from ebsqs.log import get_logger
from ebsqs.supervisor.config import SupervisorConfig
from ebsqs.supervisor.process import ExitStatus
from ebsqs.supervisor.snapshot import ChildSnapshot, SupervisorSnapshot
from ebsqs.supervisor.table import Verdict

log = get_logger(__name__)


class Extension:
    """No-op base class; override what you need."""

    def on_starting(self, snapshot: SupervisorSnapshot) -> None:
        """The app is imported and the first children are about to be forked.

        Raises:
            ConfigurationError: what the app asks of this extension cannot run; the master
                stops before its first fork with exit code 3 (``master_boot_failed``), as for
                an app that fails to import. The only exception an extension may raise.
        """

    def on_ready(self, snapshot: SupervisorSnapshot) -> None:
        """Every slot has a consuming child for the first time (sd_notify ``READY=1``)."""

    def on_tick(self, snapshot: SupervisorSnapshot) -> None:
        """About once a second, and at once when the master's state changes (``WATCHDOG=1``,
        ``STATUS=``, the status file, metrics)."""

    def on_reload(self, snapshot: SupervisorSnapshot) -> None:
        """A HUP started a rolling restart (``RELOADING=1``)."""

    def on_reloaded(self, snapshot: SupervisorSnapshot) -> None:
        """Every child now runs the code imported after the last HUP (``READY=1``)."""

    def on_stopping(self, snapshot: SupervisorSnapshot, graceful: bool) -> None:
        """A stop began: a graceful drain, or a fast stop (``STOPPING=1``,
        ``EXTEND_TIMEOUT_USEC`` during a long drain)."""

    def on_stopped(self, snapshot: SupervisorSnapshot, exit_code: int) -> None:
        """Every child is gone; the master is about to exit with ``exit_code``."""

    def on_child_exited(self, child: ChildSnapshot, status: ExitStatus, verdict: Verdict) -> None:
        """A child was reaped (after its last heartbeats were read); ``child`` is as it was."""


class Extensions(Extension):
    """Several extensions called in order; one failing does not stop the others."""

    def __init__(self, extensions: Sequence[Extension] = ()) -> None:
        self.items = list(extensions)

    def _each(
        self,
        event: str,
        call: Callable[[Extension], None],
        passing: type[Exception] | None = None,
    ) -> None:
        for extension in self.items:
            try:
                call(extension)
            except Exception as exc:
                if passing is not None and isinstance(exc, passing):
                    raise
                log.error(
                    "extension_failed",
                    extension=type(extension).__name__,
                    hook=event,
                    error=repr(exc),
                )

    def on_starting(self, snapshot: SupervisorSnapshot) -> None:
        # A refusal stops the start (see the base class); any other error is logged.
        self._each("on_starting", lambda e: e.on_starting(snapshot), passing=ConfigurationError)

    def on_ready(self, snapshot: SupervisorSnapshot) -> None:
        self._each("on_ready", lambda e: e.on_ready(snapshot))

    def on_tick(self, snapshot: SupervisorSnapshot) -> None:
        self._each("on_tick", lambda e: e.on_tick(snapshot))

    def on_reload(self, snapshot: SupervisorSnapshot) -> None:
        self._each("on_reload", lambda e: e.on_reload(snapshot))

    def on_reloaded(self, snapshot: SupervisorSnapshot) -> None:
        self._each("on_reloaded", lambda e: e.on_reloaded(snapshot))

    def on_stopping(self, snapshot: SupervisorSnapshot, graceful: bool) -> None:
        self._each("on_stopping", lambda e: e.on_stopping(snapshot, graceful))

    def on_stopped(self, snapshot: SupervisorSnapshot, exit_code: int) -> None:
        self._each("on_stopped", lambda e: e.on_stopped(snapshot, exit_code))

    def on_child_exited(self, child: ChildSnapshot, status: ExitStatus, verdict: Verdict) -> None:
        self._each("on_child_exited", lambda e: e.on_child_exited(child, status, verdict))


#: Master extensions integrations add to every master (Django's ``AppConfig.ready()`` adds the
#: outbox's relay): each a function of the master's configuration that returns the extensions
#: to run, possibly none. A registry like the middleware list, which tests may replace.
SERVICES: list[Callable[[SupervisorConfig], list[Extension]]] = []


def add_service(factory: Callable[[SupervisorConfig], list[Extension]]) -> None:
    """Have every master built from here on run ``factory(config)``'s extensions (once; adding
    the same function again does nothing)."""
    if factory not in SERVICES:
        SERVICES.append(factory)

"""Liveness: the loop's own progress, and the heartbeat thread that reports it.

Two facts make a worker look alive to its supervisor, and neither may depend on the network:

- **The loop's progress.** The loop's thread marks each iteration (:meth:`Pulse.beat`). Where it
  legitimately blocks (a long poll, a task it runs itself, a drain) it says so
  (:meth:`Pulse.blocked`), and its age is then not counted: a frozen loop is one that neither
  iterates nor says why. Heartbeats carry the age, and the master replaces a child whose loop
  made no progress for the heartbeat timeout while its keeper still beats.
- **The heartbeat.** :class:`Heartbeat` is a thread of its own that only builds a status and
  writes it to the master's pipe: no broker call, so a network blackhole that stalls deletes and
  visibility changes (the keeper's work) cannot make a healthy child look hung.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Callable, Iterator

from ebsqs.log import get_logger

log = get_logger(__name__)

#: Seconds between heartbeats.
HEARTBEAT_INTERVAL = 1.0


class Pulse:
    """The loop's progress, written by the loop's thread and read by the heartbeat's."""

    def __init__(self) -> None:
        self._at = time.monotonic()
        self._blocked = 0  # nested blocked() sections; an int write is atomic under the GIL
        self._owner: int | None = None  # the loop's thread, from its first beat

    def beat(self) -> None:
        """The loop made progress (called by the loop's thread each iteration)."""
        self._at = time.monotonic()
        self._owner = threading.get_ident()

    @contextlib.contextmanager
    def blocked(self) -> Iterator[None]:
        """The loop's thread blocks here on purpose (a broker call, a task it runs, a drain).

        From any other thread (the keeper shares the settler's broker calls) it does nothing.
        """
        if threading.get_ident() != self._owner:
            yield
            return
        self.enter()
        try:
            yield
        finally:
            self.leave()

    def enter(self) -> None:
        """:meth:`blocked` without a context manager, for the loop's own thread on its per-task
        path (an inline task): :meth:`leave` must follow, in a ``finally``."""
        self._blocked += 1

    def leave(self) -> None:
        """End what :meth:`enter` began."""
        self._blocked -= 1
        self._at = time.monotonic()

    def block(self) -> None:
        """The loop's thread blocks from now on (a drain that ends the process)."""
        self._blocked += 1

    def age(self) -> float | None:
        """Seconds since the loop last made progress; None while it blocks on purpose."""
        if self._blocked:
            return None
        return max(time.monotonic() - self._at, 0.0)


class Periodic:
    """A daemon thread beside the loop that calls :meth:`tick` until stopped, waiting
    :meth:`wait` seconds before each call; a failing tick is logged and the next one runs."""

    #: The thread's name, and the prefix of its failure event (``<event>_failed``).
    thread_name = "ebsqs-periodic"
    event = "periodic"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread, in a copy of the caller's context: its log lines carry the same
        bound values (role, queue, slot, pid) as the loop's."""
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._run,), name=self.thread_name, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end after its current tick."""
        self._stop.set()

    def wait(self) -> float:
        """Seconds until the next tick."""
        return HEARTBEAT_INTERVAL

    def tick(self) -> None:
        """One round of the thread's work."""

    def _run(self) -> None:
        while not self._stop.wait(self.wait()):
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - one bad round must not end the thread
                log.error(f"{self.event}_failed", error=repr(exc))


class Heartbeat(Periodic):
    """Calls ``send`` every :data:`HEARTBEAT_INTERVAL` seconds until stopped.

    ``send`` must not touch the network (it builds the worker's status and writes it to a pipe).
    """

    thread_name = "ebsqs-heartbeat"
    event = "heartbeat"

    def __init__(self, send: Callable[[], None]) -> None:
        super().__init__()
        self.send = send

    def tick(self) -> None:
        """Send one beat."""
        self.send()

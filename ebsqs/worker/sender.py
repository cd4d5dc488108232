"""Background threads for the settler's deletes: the loop never waits on a delete's round trip.

A delete that goes out after its task finished is what makes that task's success final; until it
does, a crash repeats the task (at-least-once). So the loop hands batches of deletes to
:class:`Sender` and moves on, and waits for them only where order matters: before the next
message of a FIFO group starts, and when the worker stops. At most :data:`MAX_PENDING` batches
are under way at once; past that the loop waits for a thread (the deletes' pace is the worker's).
For a broker on the same host the loop sends its deletes itself (``submit(here=True)``).
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Callable

from ebsqs.log import get_logger

log = get_logger(__name__)

#: Threads sending; two keep a 15 ms round trip from capping deletes at 33 batches a second.
SENDER_THREADS = 2
#: Batches that may be under way or waiting before :meth:`Sender.submit` blocks: one per thread,
#: so finished messages whose delete is not yet done stay few (they count as in flight on SQS).
MAX_PENDING = SENDER_THREADS


class Sender:
    """Runs calls on :data:`SENDER_THREADS` daemon threads, started on first use."""

    def __init__(self, threads: int = SENDER_THREADS, max_pending: int = MAX_PENDING) -> None:
        self._count = threads
        self._calls: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._slots = threading.BoundedSemaphore(max_pending)
        self._idle = threading.Condition()
        self._unfinished = 0  # guarded by _idle
        self._threads: list[threading.Thread] = []

    def submit(self, call: Callable[[], None], here: bool = False) -> None:
        """Run ``call`` on a sender thread; block while :data:`MAX_PENDING` calls wait.

        ``here``: run it in the caller's thread instead, now. For a broker a few milliseconds
        away, the round trip costs less than handing the call over: with two threads taking
        turns with the GIL on two cores, a delete costs half as much CPU again.
        """
        if here:
            self._run(call)
            return
        if not self._threads:
            self._start()
        self._slots.acquire()
        with self._idle:
            self._unfinished += 1
        self._calls.put(call)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every call submitted so far has run; False if ``timeout`` passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._unfinished == 0, timeout=timeout)

    def close(self) -> None:
        """End the threads once what was submitted has run."""
        for _ in self._threads:
            self._calls.put(None)
        self._threads = []

    @staticmethod
    def _run(call: Callable[[], None]) -> None:
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - one failed batch must not end the thread
            log.error("send_crashed", error=repr(exc))

    def _start(self) -> None:
        # In the worker's own process (never before a fork), in the caller's context so the
        # threads' log lines carry the worker's bound fields.
        for number in range(self._count):
            context = contextvars.copy_context()
            thread = threading.Thread(
                target=context.run, args=(self._serve,), name=f"ebsqs-send-{number}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            try:
                self._run(call)
            finally:
                self._slots.release()
                with self._idle:
                    self._unfinished -= 1
                    self._idle.notify_all()

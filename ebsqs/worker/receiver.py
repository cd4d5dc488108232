"""Receives on threads of their own, so the loop never waits on a round trip.

At SQS's 10-20 ms a request, a loop that receives, runs and deletes one after the other spends
most of its time waiting. The loop asks for messages (:meth:`Receiver.request`) and goes on
running what it holds; a receiver thread makes the call and hands back a :class:`Receipt`,
waking the loop (its ``wake`` callback). Two threads let one receive be in flight while the
other's messages are being run, and a long poll wait for new work without holding up the
outcomes of running tasks.

What may be asked for is bounded by the loop (what its executor can run plus one batch, less
what it holds and what is asked for already): :attr:`Receiver.reserved`.

A broker on the same host answers faster than two thread hand-offs: for it, the loop makes its
short receives itself (:meth:`Receiver.receive_here`).

With a :class:`~ebsqs.worker.idle.PollToken`, a long poll of a queue is made only by the one
process of the host that holds the queue's token; the others wait for it without a request,
and the holder gives it up as soon as a receive brings messages (:meth:`Receiver._poll`).
"""

from __future__ import annotations

import contextvars
import queue as queues
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ebsqs.brokers import Broker, ReceivedMessage
from ebsqs.errors import BrokerError
from ebsqs.log import get_logger
from ebsqs.worker.held import Held, HeldMessages
from ebsqs.worker.idle import PollToken

log = get_logger(__name__)

#: Receive requests that may be in flight at once, per process.
RECEIVE_THREADS = 2


@dataclass(frozen=True, slots=True)
class Request:
    """One receive to make: from ``physical`` (the logical ``queue``), up to ``count``."""

    queue: str
    physical: str
    count: int
    wait_seconds: float


@dataclass(slots=True)
class Receipt:
    """What one request brought: messages, or the error that stopped it."""

    request: Request
    messages: list[ReceivedMessage] = field(default_factory=list)
    #: The messages as held by the worker since they came (so the keeper extends them).
    held: list[Held] = field(default_factory=list)
    error: BrokerError | None = None
    #: False when no request was made (the poll token stayed with a sibling).
    polled: bool = True
    at: float = 0.0  # time.monotonic() when it came back
    took: float = 0.0  # seconds the request took (a round trip, when messages were waiting)


class Receiver:
    """Makes the loop's receives on :data:`RECEIVE_THREADS` daemon threads."""

    def __init__(
        self,
        broker: Broker,
        held: HeldMessages,
        visibility_timeout: int,
        wake: Callable[[], None],
        token: PollToken | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        """
        Args:
            broker: where to receive from (thread-safe, as every broker is).
            held: the worker's held messages: what comes is held at once, so its visibility is
                kept even while the loop's thread is busy in a task.
            visibility_timeout: what each receive asks for.
            wake: called from a receiver thread when a receipt is ready (the executor's wake).
            token: shared with sibling processes: only its holder long-polls (None: all do).
            stop: set when the worker stops: a wait for the token ends at once.
        """
        self.broker = broker
        self.held = held
        self.visibility_timeout = visibility_timeout
        self.wake = wake
        self.token = token
        self._stop = stop or threading.Event()
        self._requests: queues.SimpleQueue[Request | None] = queues.SimpleQueue()
        self._receipts: queues.SimpleQueue[Receipt] = queues.SimpleQueue()
        self._lock = threading.Lock()
        self._in_flight = 0  # requests made and not yet taken; guarded by _lock
        self._reserved = 0  # messages they may bring; guarded by _lock
        self._threads: list[threading.Thread] = []
        self._backlog: set[str] = set()  # queues whose last receive here brought messages

    def start(self) -> None:
        """Start the threads, in a copy of the caller's context (its bound log fields)."""
        for number in range(RECEIVE_THREADS):
            context = contextvars.copy_context()
            thread = threading.Thread(
                target=context.run, args=(self._serve,), name=f"ebsqs-receive-{number}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    @property
    def in_flight(self) -> int:
        """Requests asked for and not yet taken back."""
        return self._in_flight

    @property
    def reserved(self) -> int:
        """Messages the requests in flight may still bring."""
        return self._reserved

    def ready(self) -> bool:
        """True when a receipt waits to be taken."""
        return not self._receipts.empty()

    def can_request(self) -> bool:
        """True when a receiver thread is free for another request."""
        return self._in_flight < len(self._threads)

    def request(self, request: Request) -> None:
        """Ask for a receive; its receipt comes back through :meth:`take`."""
        with self._lock:
            self._in_flight += 1
            self._reserved += request.count
        self._requests.put(request)

    def take(self, timeout: float = 0.0) -> list[Receipt]:
        """The receipts that came back, waiting up to ``timeout`` s for the first."""
        taken: list[Receipt] = []
        try:
            if timeout > 0:
                taken.append(self._receipts.get(timeout=timeout))
            while True:
                taken.append(self._receipts.get_nowait())
        except queues.Empty:
            pass
        if taken:
            with self._lock:
                self._in_flight -= len(taken)
                self._reserved -= sum(receipt.request.count for receipt in taken)
        return taken

    def finish(self, deadline: float) -> list[Receipt]:
        """Wait for every request in flight (until ``deadline``, monotonic); their receipts.

        A request cut short would have its messages handed out to nobody: they would wait out
        their whole visibility timeout. So a stopping worker lets them come back, then releases
        what they bring.
        """
        taken: list[Receipt] = []
        while self._in_flight and (left := deadline - time.monotonic()) > 0:
            taken += self.take(min(left, 0.5))
        return taken

    def close(self) -> None:
        """End the threads after their current request, and give the poll token up."""
        for _ in self._threads:
            self._requests.put(None)
        if self.token is not None:
            self.token.close()

    def receive_here(self, request: Request) -> Receipt:
        """Make a short receive in the caller's thread, and its receipt.

        For a broker a few milliseconds away: handing the call to a receiver thread and the
        answer back costs more CPU than the round trip it would overlap.
        """
        return self._answer(replace(request, wait_seconds=0))

    def _serve(self) -> None:
        while (request := self._requests.get()) is not None:
            self._receipts.put(self._answer(request))
            self.wake()

    def _answer(self, request: Request) -> Receipt:
        asked = time.monotonic()
        receipt = self._poll(request)
        receipt.at = now = time.monotonic()
        receipt.took = now - asked
        until = now + self.visibility_timeout
        receipt.held = [Held(m, request.queue, visible_until=until) for m in receipt.messages]
        for held in receipt.held:
            self.held.add(held)
        return receipt

    def _poll(self, request: Request) -> Receipt:
        """Make one request; a long poll only with the queue's poll token, where there is one.

        Without the token, a process whose last receive brought messages (a backlog) makes a
        short poll; one whose last receive was empty waits up to the poll's length for the
        token without a request, and polls as its holder once it has it.
        """
        token, physical = self.token, request.physical
        if token is None or request.wait_seconds <= 0:
            return self._receive(request, request.wait_seconds)
        if token.acquire(physical):
            return self._held_poll(token, request)
        if physical in self._backlog:
            receipt = self._receive(request, 0)
            if receipt.messages or receipt.error:
                return receipt
        if token.wait(physical, request.wait_seconds, self._stop):
            return self._held_poll(token, request)
        return Receipt(request, polled=False)

    def _held_poll(self, token: PollToken, request: Request) -> Receipt:
        """Long-poll as the token's holder; a receive that brings messages gives it up."""
        receipt = self._receive(request, request.wait_seconds)
        if receipt.messages or receipt.error:
            token.release(request.physical)
        return receipt

    def _receive(self, request: Request, wait_seconds: float) -> Receipt:
        try:
            messages = self.broker.receive(
                request.physical,
                request.count,
                wait_seconds=wait_seconds,
                visibility_timeout=self.visibility_timeout,
                metadata=False,
            )
        except BrokerError as exc:
            return Receipt(request, error=exc)
        except Exception as exc:  # noqa: BLE001 - a bug here must not end the thread
            log.error("receive_crashed", queue=request.queue, error=repr(exc))
            return Receipt(request, error=BrokerError(f"receive failed: {exc!r}"))
        if messages:
            self._backlog.add(request.physical)
        else:
            self._backlog.discard(request.physical)
        return Receipt(request, messages)

"""An in-process broker with SQS semantics, for unit tests and eager mode.

Nothing leaves the process: a forked child gets a copy, not a share. Use the SQLite broker
for anything with more than one process.

It follows :class:`~ebsqs.brokers.sqlite.SQLiteBroker` (whose docstring lists the deliberate
differences from SQS): strict order, exact counts, no retention period, ``ensure_queue`` keeps
an existing queue's settings, and a message due for redrive whose dead-letter queue was deleted
is dropped. Each queue has its own size limit (``QueueSettings.max_body_bytes``), capped by the
broker's ``max_body_bytes``; a message's size counts its attributes, as on SQS.

FIFO queues, the same subset as the SQLite broker:
    - Queue names end in ``.fifo`` (and only FIFO queues' do); sends need a ``group_id``;
      per-message delays are refused, as SQS refuses them.
    - A group's messages are delivered one at a time in send order: the next one only after
      the previous one was deleted or moved to the dead-letter queue, so a receive returns at
      most one message per group (SQS can return several of a group, in order).
    - A ``dedup_id`` deduplicates for :data:`~ebsqs.brokers.base.DEDUP_WINDOW_SECONDS` after
      the first send, returning the first message's id. A send without one deduplicates on
      the SHA-256 of its body, as SQS does on the queues ebsqs creates (content-based
      deduplication), and that hash is the ``dedup_id`` the message is received with.

Standard queues keep a message's ``group_id`` (the tenant of SQS's fair queues) and return it
on receive; fairness between tenants is not modelled.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar
from urllib.parse import urlsplit

from ebsqs.brokers.base import (
    DEDUP_WINDOW_SECONDS,
    DEFAULT_MAX_BODY_BYTES,
    BodyLimit,
    OutgoingMessage,
    QueueSettings,
    QueueStats,
    ReceivedMessage,
)
from ebsqs.brokers.checks import (
    check_batch,
    check_fifo_names,
    check_messages,
    check_receive,
    content_dedup_id,
    embedded_body_limit,
)
from ebsqs.errors import QueueDoesNotExist


@dataclass
class _Stored:
    message_id: str
    body: str
    attributes: dict[str, str]
    visible_at: float
    sent_at: float
    group_id: str | None = None
    dedup_id: str | None = None
    receive_count: int = 0
    receipt: str | None = None
    delayed: bool = False


@dataclass
class _Queue:
    settings: QueueSettings
    # In send order (a dict keeps insertion order): a FIFO group is served from its oldest.
    messages: dict[str, _Stored] = field(default_factory=dict)
    # FIFO deduplication ids, oldest first: {dedup id: (first message id, expires at)}.
    dedup: dict[str, tuple[str, float]] = field(default_factory=dict)

    def is_poison(self, stored: _Stored) -> bool:
        """Whether the message moves to the dead-letter queue instead of its next receive."""
        return (
            self.settings.dead_letter_queue is not None
            and stored.receive_count >= self.settings.max_receive_count
        )

    def deduplicated(self, dedup_id: str, now: float) -> str | None:
        """The id of the message sent with ``dedup_id`` within the window, if any."""
        while self.dedup:
            oldest = next(iter(self.dedup))
            if self.dedup[oldest][1] > now:
                break
            del self.dedup[oldest]
        first = self.dedup.get(dedup_id)
        return first[0] if first is not None and first[1] > now else None

    def ready(self, now: float, taken: Iterable[str]) -> list[_Stored]:
        """The messages a receive may hand out now, in delivery order.

        On a FIFO queue only the oldest message of each group: while it is in flight the
        group is blocked, which keeps the group in order.
        """
        skip = set(taken)
        blocked: set[str] = set()
        ready = []
        for stored in self.messages.values():
            if self.settings.fifo and stored.group_id is not None:
                if stored.group_id in blocked:
                    continue
                blocked.add(stored.group_id)
            if stored.visible_at <= now and stored.message_id not in skip:
                ready.append(stored)
        return sorted(ready, key=lambda m: m.visible_at)


class MemoryBroker:
    """A thread-safe, in-process broker. ``MemoryBroker.named(n)`` shares one store per name."""

    # Named stores let `memory://x` in two places of one process mean the same queues.
    # Tests replace them with `MemoryBroker.reset()`.
    _named: ClassVar[dict[str, MemoryBroker]] = {}

    def __init__(
        self,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_body_bytes = max_body_bytes
        self._clock = clock
        self._queues: dict[str, _Queue] = {}
        self._changed = threading.Condition()

    @classmethod
    def from_url(cls, url: str) -> MemoryBroker:
        """``memory://`` or ``memory://name``: the process-wide store of that name."""
        return cls.named(urlsplit(url).netloc or "default")

    @classmethod
    def named(cls, name: str) -> MemoryBroker:
        """The process-wide broker for ``memory://name``."""
        if name not in cls._named:
            cls._named[name] = cls()
        return cls._named[name]

    @classmethod
    def reset(cls) -> None:
        """Empty every named store (for tests); objects handed out stay valid."""
        for broker in cls._named.values():
            with broker._changed:
                broker._queues.clear()

    def _queue(self, name: str) -> _Queue:
        try:
            return self._queues[name]
        except KeyError:
            raise QueueDoesNotExist(name) from None

    def body_limit(self, queue: str) -> BodyLimit:
        """The queue's ``max_body_bytes``, capped by the broker's (the broker's if missing)."""
        with self._changed:
            q = self._queues.get(queue)
        return self._limit(queue, q)

    def _limit(self, queue: str, q: _Queue | None) -> BodyLimit:
        queue_bytes = q.settings.max_body_bytes if q is not None else None
        return embedded_body_limit(queue, queue_bytes, self.max_body_bytes, "memory")

    def ensure_queue(self, queue: str, settings: QueueSettings | None = None) -> None:
        """Create the queue, and its dead-letter queue, if missing; existing ones are kept.

        Raises:
            ConfigurationError: a FIFO queue (or its dead-letter queue) not named ``*.fifo``,
                or a standard one that is.
        """
        settings = settings or QueueSettings()
        check_fifo_names(queue, settings)
        with self._changed:
            dlq = settings.dead_letter_queue
            if dlq and dlq not in self._queues:
                dlq_settings = QueueSettings(
                    fifo=settings.fifo, max_body_bytes=settings.max_body_bytes
                )
                self._queues[dlq] = _Queue(dlq_settings)
            if queue not in self._queues:
                self._queues[queue] = _Queue(settings)

    def list_queues(self, prefix: str = "") -> list[str]:
        with self._changed:
            return sorted(name for name in self._queues if name.startswith(prefix))

    def delete_queue(self, queue: str) -> None:
        with self._changed:
            self._queue(queue)
            del self._queues[queue]

    def send(self, queue: str, message: OutgoingMessage) -> str:
        return self.send_batch(queue, [message])[0]

    def send_batch(self, queue: str, messages: Sequence[OutgoingMessage]) -> list[str]:
        """Send 1..10 messages; return their ids in order (a FIFO duplicate: the first's id).

        Raises:
            QueueDoesNotExist: there is no such queue.
            MessageTooLargeError: a message is over the queue's :meth:`body_limit`.
            BrokerError: a bad batch size, delay or attribute, or a FIFO rule broken.
        """
        check_batch(messages)
        now = self._clock()
        with self._changed:
            q = self._queue(queue)
            check_messages(queue, messages, self._limit(queue, q), fifo=q.settings.fifo)
            ids = [self._store(q, message, now) for message in messages]
            self._changed.notify_all()
        return ids

    def _store(self, q: _Queue, message: OutgoingMessage, now: float) -> str:
        dedup_id = message.dedup_id
        if q.settings.fifo:
            dedup_id = dedup_id or content_dedup_id(message.body)
            first = q.deduplicated(dedup_id, now)
            if first is not None:
                return first
        stored = _Stored(
            message_id=str(uuid.uuid4()),
            body=message.body,
            attributes={name: str(value) for name, value in message.attributes.items()},
            visible_at=now + message.delay,
            sent_at=now,
            group_id=message.group_id,
            dedup_id=dedup_id,
            delayed=message.delay > 0,
        )
        q.messages[stored.message_id] = stored
        if q.settings.fifo and dedup_id is not None:
            q.dedup[dedup_id] = (stored.message_id, now + DEDUP_WINDOW_SECONDS)
        return stored.message_id

    def receive(
        self,
        queue: str,
        max_messages: int,
        wait_seconds: float,
        visibility_timeout: int | None = None,
        *,
        metadata: bool = True,
    ) -> list[ReceivedMessage]:
        """Receive up to ``max_messages``, waiting up to ``wait_seconds`` for the first one.

        Everything is at hand, so ``metadata=False`` returns the same as ``metadata=True``.
        """
        check_receive(max_messages, wait_seconds, visibility_timeout)
        deadline = time.monotonic() + wait_seconds
        with self._changed:
            while True:
                received = self._take(queue, max_messages, visibility_timeout)
                remaining = deadline - time.monotonic()
                if received or remaining <= 0:
                    return received
                # Wake at least every 50 ms: delayed and expired messages become visible by
                # the clock, not by a notification.
                self._changed.wait(min(remaining, 0.05))

    def _take(
        self, queue: str, max_messages: int, visibility_timeout: int | None
    ) -> list[ReceivedMessage]:
        q = self._queue(queue)
        now = self._clock()
        timeout = (
            q.settings.visibility_timeout if visibility_timeout is None else visibility_timeout
        )
        taken: dict[str, ReceivedMessage] = {}
        while len(taken) < max_messages:
            redriven = False
            for stored in q.ready(now, taken):
                if len(taken) == max_messages:
                    break
                if q.is_poison(stored):
                    self._redrive(q, stored)
                    redriven = True
                else:
                    taken[stored.message_id] = self._claim(queue, stored, now + timeout)
            # A redriven FIFO message unblocks the next one of its group: look again.
            if not redriven:
                break
        return list(taken.values())

    @staticmethod
    def _claim(queue: str, stored: _Stored, visible_at: float) -> ReceivedMessage:
        stored.receive_count += 1
        stored.receipt = str(uuid.uuid4())
        stored.visible_at = visible_at
        stored.delayed = False
        return ReceivedMessage(
            queue=queue,
            message_id=stored.message_id,
            receipt=stored.receipt,
            body=stored.body,
            receive_count=stored.receive_count,
            attributes=dict(stored.attributes),
            sent_at=stored.sent_at,
            group_id=stored.group_id,
            dedup_id=stored.dedup_id,
        )

    def _redrive(self, q: _Queue, stored: _Stored) -> None:
        """Move a message received too often to the dead-letter queue, as SQS does (it is
        dropped if that queue was deleted)."""
        del q.messages[stored.message_id]
        target = self._queues.get(q.settings.dead_letter_queue or "")
        if target is not None:
            stored.receipt = None
            target.messages[stored.message_id] = stored

    def ack(self, messages: Sequence[ReceivedMessage]) -> dict[str, str]:
        failed = {}
        with self._changed:
            for message in messages:
                stored = self._find(message)
                if stored is None:
                    failed[message.message_id] = "receipt handle is no longer valid"
                else:
                    del self._queues[message.queue].messages[stored.message_id]
        return failed

    def change_visibility(
        self, messages: Sequence[ReceivedMessage], timeout: int
    ) -> dict[str, str]:
        failed = {}
        now = self._clock()
        with self._changed:
            for message in messages:
                stored = self._find(message)
                if stored is None:
                    failed[message.message_id] = "receipt handle is no longer valid"
                else:
                    stored.visible_at = now + timeout
            self._changed.notify_all()
        return failed

    def _find(self, message: ReceivedMessage) -> _Stored | None:
        q = self._queues.get(message.queue)
        stored = q.messages.get(message.message_id) if q else None
        if stored is None or stored.receipt != message.receipt:
            return None
        return stored

    def stats(self, queue: str) -> QueueStats:
        now = self._clock()
        with self._changed:
            messages = list(self._queue(queue).messages.values())
        delayed = sum(1 for m in messages if m.delayed and m.visible_at > now)
        in_flight = sum(1 for m in messages if not m.delayed and m.visible_at > now)
        return QueueStats(queue, len(messages) - delayed - in_flight, in_flight, delayed)

    def purge(self, queue: str) -> None:
        with self._changed:
            self._queue(queue).messages.clear()

    def close(self) -> None:
        """Nothing to release: the store lives as long as the object."""

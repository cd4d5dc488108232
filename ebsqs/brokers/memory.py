"""An in-process broker with SQS semantics, for unit tests and eager mode.

Nothing leaves the process: a forked child gets a copy, not a share. Use the SQLite broker
for anything with more than one process.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar
from urllib.parse import urlsplit

from ebsqs.brokers.base import (
    DEFAULT_MAX_BODY_BYTES,
    OutgoingMessage,
    QueueSettings,
    QueueStats,
    ReceivedMessage,
)
from ebsqs.brokers.checks import check_batch, check_message, check_receive
from ebsqs.errors import QueueDoesNotExist


@dataclass
class _Stored:
    message_id: str
    body: str
    attributes: dict[str, str]
    visible_at: float
    sent_at: float
    receive_count: int = 0
    receipt: str | None = None
    delayed: bool = False


@dataclass
class _Queue:
    settings: QueueSettings
    messages: dict[str, _Stored] = field(default_factory=dict)


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

    def ensure_queue(self, queue: str, settings: QueueSettings | None = None) -> None:
        settings = settings or QueueSettings()
        with self._changed:
            if settings.dead_letter_queue and settings.dead_letter_queue not in self._queues:
                self._queues[settings.dead_letter_queue] = _Queue(QueueSettings())
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
        check_batch(messages)
        for message in messages:
            check_message(message, self.max_body_bytes)
        now = self._clock()
        ids = []
        with self._changed:
            q = self._queue(queue)
            for message in messages:
                stored = _Stored(
                    message_id=str(uuid.uuid4()),
                    body=message.body,
                    attributes=dict(message.attributes),
                    visible_at=now + message.delay,
                    sent_at=now,
                    delayed=message.delay > 0,
                )
                q.messages[stored.message_id] = stored
                ids.append(stored.message_id)
            self._changed.notify_all()
        return ids

    def receive(
        self,
        queue: str,
        max_messages: int,
        wait_seconds: float,
        visibility_timeout: int | None = None,
        *,
        metadata: bool = True,
    ) -> list[ReceivedMessage]:
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
        ready = sorted(
            (m for m in q.messages.values() if m.visible_at <= now), key=lambda m: m.visible_at
        )
        taken: list[ReceivedMessage] = []
        for stored in ready:
            if len(taken) == max_messages:
                break
            if self._redrive(q, stored):
                continue
            stored.receive_count += 1
            stored.receipt = str(uuid.uuid4())
            stored.visible_at = now + timeout
            stored.delayed = False
            taken.append(
                ReceivedMessage(
                    queue=queue,
                    message_id=stored.message_id,
                    receipt=stored.receipt,
                    body=stored.body,
                    receive_count=stored.receive_count,
                    attributes=dict(stored.attributes),
                    sent_at=stored.sent_at,
                )
            )
        return taken

    def _redrive(self, q: _Queue, stored: _Stored) -> bool:
        """Move a message received too often to the dead-letter queue, as SQS does."""
        dlq = q.settings.dead_letter_queue
        if not dlq or stored.receive_count < q.settings.max_receive_count:
            return False
        del q.messages[stored.message_id]
        target = self._queues.get(dlq)
        if target is not None:
            stored.receipt = None
            target.messages[stored.message_id] = stored
        return True

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

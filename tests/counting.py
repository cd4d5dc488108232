"""A memory broker that counts the requests a real queue would bill, by kind."""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

from ebsqs.brokers import OutgoingMessage, ReceivedMessage
from ebsqs.brokers.memory import MemoryBroker


class CountingBroker(MemoryBroker):
    """The memory broker, counting the requests that concern messages: every send (``send``
    goes through ``send_batch``), visibility change and delete, and every receive that brought
    a message (an idle poll is the idle cost, counted elsewhere)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(clock=clock)
        self.requests: collections.Counter[str] = collections.Counter()

    def send_batch(self, queue: str, messages: Sequence[OutgoingMessage]) -> list[str]:
        self.requests["send"] += 1
        return super().send_batch(queue, messages)

    def receive(self, *args: Any, **kwargs: Any) -> list[ReceivedMessage]:
        got = super().receive(*args, **kwargs)
        self.requests["receive"] += bool(got)
        return got

    def change_visibility(
        self, messages: Sequence[ReceivedMessage], timeout: int
    ) -> dict[str, str]:
        self.requests["change_visibility"] += 1
        return super().change_visibility(messages, timeout)

    def ack(self, messages: Sequence[ReceivedMessage]) -> dict[str, str]:
        self.requests["delete"] += 1
        return super().ack(messages)

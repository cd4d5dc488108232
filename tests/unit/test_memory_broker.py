"""The memory broker's own rules, driven by a fake clock: FIFO groups, deduplication, limits.

What every broker shares is in ``tests/integration/test_broker_conformance.py``.
"""

from __future__ import annotations

import hashlib

import pytest

from ebsqs.brokers.base import (
    DEDUP_WINDOW_SECONDS,
    BodyLimit,
    OutgoingMessage,
    QueueSettings,
    QueueStats,
)
from ebsqs.brokers.memory import MemoryBroker
from ebsqs.errors import BrokerError, ConfigurationError, MessageTooLargeError
from tests.clock import FakeClock

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def broker(clock: FakeClock) -> MemoryBroker:
    broker = MemoryBroker(clock=clock)
    broker.ensure_queue("jobs.fifo", QueueSettings(fifo=True))
    return broker


def fifo(body: str, group: str = "g", dedup: str | None = None) -> OutgoingMessage:
    return OutgoingMessage(body, group_id=group, dedup_id=dedup)


# -- FIFO groups -------------------------------------------------------------------------------


def test_a_group_is_delivered_in_order_one_at_a_time(broker: MemoryBroker) -> None:
    broker.send_batch("jobs.fifo", [fifo("a1", "a"), fifo("a2", "a"), fifo("b1", "b")])

    first = broker.receive("jobs.fifo", 10, 0)
    assert [m.body for m in first] == ["a1", "b1"]
    assert broker.receive("jobs.fifo", 10, 0) == []
    broker.change_visibility([first[0]], 0)
    [retry] = broker.receive("jobs.fifo", 10, 0)
    assert (retry.body, retry.receive_count) == ("a1", 2)
    broker.ack([retry])
    assert [m.body for m in broker.receive("jobs.fifo", 10, 0)] == ["a2"]


def test_a_group_delayed_by_visibility_waits_for_it(broker: MemoryBroker, clock: FakeClock) -> None:
    broker.send_batch("jobs.fifo", [fifo("a1", "a", "1"), fifo("a2", "a", "2")])
    held = broker.receive("jobs.fifo", 10, 0)
    broker.change_visibility(held, 60)

    clock.advance(59)
    assert broker.receive("jobs.fifo", 10, 0) == []
    clock.advance(1)
    assert [m.body for m in broker.receive("jobs.fifo", 10, 0)] == ["a1"]


def test_a_zero_visibility_receive_hands_a_message_out_once(broker: MemoryBroker) -> None:
    broker.send_batch("jobs.fifo", [fifo("a1", "a", "1"), fifo("a2", "a", "2")])

    received = broker.receive("jobs.fifo", 10, 0, visibility_timeout=0)

    assert [m.body for m in received] == ["a1"]


def test_redriving_a_groups_head_releases_the_next(clock: FakeClock) -> None:
    broker = MemoryBroker(clock=clock)
    broker.ensure_queue(
        "jobs.fifo", QueueSettings(fifo=True, dead_letter_queue="dlq.fifo", max_receive_count=1)
    )
    broker.send_batch("jobs.fifo", [fifo("a1", "a", "1"), fifo("a2", "a", "2")])
    broker.change_visibility(broker.receive("jobs.fifo", 10, 0), 0)

    [received] = broker.receive("jobs.fifo", 10, 0)

    assert received.body == "a2"
    [dead] = broker.receive("dlq.fifo", 10, 0)
    assert (dead.body, dead.group_id, dead.dedup_id) == ("a1", "a", "1")


def test_fifo_rules(broker: MemoryBroker) -> None:
    for name, settings in [
        ("jobs", QueueSettings(fifo=True)),
        ("other.fifo", QueueSettings()),
        ("other.fifo", QueueSettings(fifo=True, dead_letter_queue="plain")),
    ]:
        with pytest.raises(ConfigurationError, match=r"\.fifo"):
            broker.ensure_queue(name, settings)
    with pytest.raises(BrokerError, match="group_id"):
        broker.send("jobs.fifo", OutgoingMessage("x"))
    with pytest.raises(BrokerError, match="FIFO queues take no per-message delay"):
        broker.send_batch("jobs.fifo", [fifo("ok"), OutgoingMessage("x", delay=5, group_id="g")])

    assert broker.list_queues() == ["jobs.fifo"]
    assert broker.stats("jobs.fifo") == QueueStats("jobs.fifo", 0, 0, 0)


# -- deduplication -----------------------------------------------------------------------------


def test_dedup_id_holds_for_the_window_after_the_first_send(
    broker: MemoryBroker, clock: FakeClock
) -> None:
    first = broker.send("jobs.fifo", fifo("x", dedup="d"))
    clock.advance(DEDUP_WINDOW_SECONDS - 1)

    assert broker.send_batch("jobs.fifo", [fifo("y", dedup="d"), fifo("z", dedup="d")]) == [
        first,
        first,
    ]
    clock.advance(1)
    later = broker.send("jobs.fifo", fifo("x", dedup="d"))

    assert later != first
    assert broker.stats("jobs.fifo").visible == 2


def test_without_dedup_id_the_body_deduplicates(broker: MemoryBroker, clock: FakeClock) -> None:
    first = broker.send("jobs.fifo", fifo("same", "a"))

    assert broker.send("jobs.fifo", fifo("same", "b")) == first
    assert broker.send("jobs.fifo", fifo("same", dedup="explicit")) != first
    clock.advance(DEDUP_WINDOW_SECONDS)
    assert broker.send("jobs.fifo", fifo("same", "a")) != first

    received = broker.receive("jobs.fifo", 10, 0)
    assert [m.dedup_id for m in received] == [hashlib.sha256(b"same").hexdigest(), "explicit"]


def test_a_standard_queue_does_not_deduplicate_but_keeps_the_ids(broker: MemoryBroker) -> None:
    broker.ensure_queue("std")

    ids = broker.send_batch("std", [OutgoingMessage("x", group_id="t")] * 2)

    assert ids[0] != ids[1]
    received = broker.receive("std", 10, 0, metadata=False)
    assert [(m.group_id, m.dedup_id) for m in received] == [("t", None), ("t", None)]


# -- sizes and attributes ----------------------------------------------------------------------


def test_body_limit_is_the_queues_capped_by_the_brokers() -> None:
    broker = MemoryBroker(max_body_bytes=4096)
    broker.ensure_queue("small", QueueSettings(max_body_bytes=2048, dead_letter_queue="dlq"))
    broker.ensure_queue("default")

    assert broker.body_limit("small") == BodyLimit(2048, "max_body_bytes of memory queue 'small'")
    assert broker.body_limit("dlq").bytes == 2048
    assert broker.body_limit("default") == BodyLimit(4096, "the memory broker's limit")
    missing = broker.body_limit("missing")
    assert missing.bytes == 4096 and "'missing' does not exist" in missing.source


def test_a_message_over_its_queues_limit_is_refused_counting_attributes() -> None:
    broker = MemoryBroker()
    broker.ensure_queue("tight", QueueSettings(max_body_bytes=20))
    broker.send("tight", OutgoingMessage("body", attributes={"n": 123456789}))  # 4 + 1 + 6 + 9

    with pytest.raises(MessageTooLargeError) as error:
        broker.send("tight", OutgoingMessage("body", attributes={"n": 1234567890}))

    assert (error.value.size, error.value.limit) == (21, 20)
    assert error.value.source == "max_body_bytes of memory queue 'tight'"
    [received] = broker.receive("tight", 10, 0)
    assert received.attributes == {"n": "123456789"}


def test_attributes_must_be_text_or_whole_numbers() -> None:
    broker = MemoryBroker()
    broker.ensure_queue("q")

    with pytest.raises(BrokerError, match="'flag' must be a str or an int"):
        broker.send("q", OutgoingMessage("x", attributes={"flag": True}))

    assert broker.receive("q", 10, 0) == []


def test_the_dead_letter_queue_is_fifo_too() -> None:
    broker = MemoryBroker()
    broker.ensure_queue("jobs.fifo", QueueSettings(fifo=True, dead_letter_queue="dlq.fifo"))

    with pytest.raises(BrokerError, match="group_id"):
        broker.send("dlq.fifo", OutgoingMessage("x"))

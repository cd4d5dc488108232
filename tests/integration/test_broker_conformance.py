"""One conformance suite, run against every broker: memory, SQLite, and SQS on moto and fauxqs.

What a broker must do is what SQS does (see ``ebsqs/brokers/base.py``). Where a test server
differs from SQS, the test says so with a strict ``xfail`` naming the server's behaviour, so a
server that gets fixed shows up as an unexpected pass rather than being silently tolerated.
Queues are kept small: moto's server slows down with queue depth (every send rescans the queue).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from ebsqs.brokers.base import Broker, OutgoingMessage, QueueSettings, ReceivedMessage
from ebsqs.brokers.memory import MemoryBroker
from ebsqs.errors import BrokerError, MessageTooLargeError, QueueDoesNotExist
from tests import servers
from tests.waiting import wait_until

KINDS = ["memory", "sqlite", "sqs-moto", "sqs-fauxqs"]

#: How test servers differ from SQS, by broker kind.
FAUXQS_ASTRAL = (
    "fauxqs refuses characters outside the Basic Multilingual Plane (its check omits SQS's "
    "#x10000-#x10FFFF range) with InvalidMessageContents"
)
MOTO_STALE_RECEIPTS = (
    "moto accepts any receipt handle a message ever had: a stale handle still deletes the "
    "message or changes its visibility"
)


@pytest.fixture(params=KINDS)
def broker_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def broker(
    broker_kind: str,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Broker]:
    """A fresh broker of the parametrized kind (SQS brokers share a session-wide server)."""
    broker: Broker
    if broker_kind == "memory":
        broker = MemoryBroker()
    elif broker_kind == "sqlite":
        try:
            from ebsqs.brokers.sqlite import SQLiteBroker
        except ImportError as exc:
            pytest.skip(f"the SQLite broker is not importable yet: {exc}")
        broker = SQLiteBroker(str(tmp_path_factory.mktemp("sqlite") / "b.db"))
    else:
        from ebsqs.brokers.sqs import SQSBroker

        server = broker_kind.removeprefix("sqs-")
        servers.apply_sqs_env(monkeypatch, request.getfixturevalue(f"{server}_server"))
        broker = SQSBroker()
    yield broker
    broker.close()


@pytest.fixture
def make_queue(broker: Broker, unique_queue: Callable[..., str]) -> Callable[..., str]:
    """``make_queue(**settings)`` creates a fresh queue and returns its name."""

    def make(**settings: object) -> str:
        name = unique_queue()
        broker.ensure_queue(name, QueueSettings(**settings))  # type: ignore[arg-type]
        return name

    return make


@pytest.fixture
def queue(make_queue: Callable[..., str]) -> str:
    """A fresh queue with a 30 s visibility timeout."""
    return make_queue(visibility_timeout=30)


def receive_all(
    broker: Broker, queue: str, count: int, timeout: float = 10
) -> list[ReceivedMessage]:
    """Receive until ``count`` messages came back (SQS may return fewer per call)."""
    received: list[ReceivedMessage] = []

    def got_all() -> bool:
        received.extend(broker.receive(queue, 10, 0.5))
        return len(received) >= count

    wait_until(got_all, timeout, message=lambda: f"received {len(received)} of {count}")
    return received


def xfail_on(request: pytest.FixtureRequest, kind: str, reasons: dict[str, str]) -> None:
    """Expect this test to fail on the brokers named in ``reasons`` (strictly)."""
    if kind in reasons:
        request.applymarker(pytest.mark.xfail(reason=reasons[kind], strict=True))


@pytest.mark.timeout(30)
def test_round_trip_keeps_body_attributes_and_ids(broker: Broker, queue: str) -> None:
    body = 'héllo wörld ✓ 日本語\n{"json": [1, 2]}\t<xml/>'
    attributes = {"reason": "ünïcode reason", "ebsqs-task": "app.tasks.add"}
    before = time.time()

    message_id = broker.send(queue, OutgoingMessage(body, attributes=attributes))
    [received] = broker.receive(queue, 10, 2)

    assert received.queue == queue
    assert received.message_id == message_id
    assert received.body == body
    assert dict(received.attributes) == attributes
    assert received.receive_count == 1
    assert received.receipt
    assert received.sent_at is not None
    assert before - 5 <= received.sent_at <= time.time() + 5


@pytest.mark.timeout(30)
def test_receive_without_metadata_still_hands_out_acknowledgeable_messages(
    broker: Broker, queue: str
) -> None:
    message_id = broker.send(queue, OutgoingMessage("body", attributes={"a": "b"}))
    [received] = broker.receive(queue, 10, 2, metadata=False)

    assert (received.message_id, received.body) == (message_id, "body")
    assert broker.ack([received]) == {}
    assert broker.stats(queue).in_flight + broker.stats(queue).visible == 0


@pytest.mark.timeout(30)
def test_characters_outside_the_bmp_round_trip(
    broker: Broker, broker_kind: str, queue: str, request: pytest.FixtureRequest
) -> None:
    xfail_on(request, broker_kind, {"sqs-fauxqs": FAUXQS_ASTRAL})
    body = "emoji 🎉 and 𝄞"

    broker.send(queue, OutgoingMessage(body, attributes={"emoji": "🎉"}))

    [received] = broker.receive(queue, 10, 2)
    assert (received.body, dict(received.attributes)) == (body, {"emoji": "🎉"})


@pytest.mark.timeout(30)
def test_batch_of_ten_returns_ids_in_order(broker: Broker, queue: str) -> None:
    ids = broker.send_batch(queue, [OutgoingMessage(f"m{i}") for i in range(10)])

    assert len(ids) == len(set(ids)) == 10
    received = receive_all(broker, queue, 10)
    assert {m.message_id: m.body for m in received} == {ids[i]: f"m{i}" for i in range(10)}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("size", [0, 11])
def test_batch_outside_one_to_ten_is_refused(broker: Broker, queue: str, size: int) -> None:
    with pytest.raises(BrokerError, match="1 to 10"):
        broker.send_batch(queue, [OutgoingMessage(f"m{i}") for i in range(size)])

    assert broker.receive(queue, 10, 0) == []


@pytest.mark.timeout(30)
def test_receive_returns_at_most_max_messages(broker: Broker, queue: str) -> None:
    broker.send_batch(queue, [OutgoingMessage(f"m{i}") for i in range(5)])

    first = broker.receive(queue, 2, 2)
    rest = receive_all(broker, queue, 5 - len(first))

    assert 1 <= len(first) <= 2
    assert sorted(m.body for m in first + rest) == [f"m{i}" for i in range(5)]


@pytest.mark.timeout(30)
def test_received_message_is_invisible_until_released(broker: Broker, queue: str) -> None:
    message_id = broker.send(queue, OutgoingMessage("once"))
    [first] = broker.receive(queue, 10, 2)

    assert broker.receive(queue, 10, 0) == []
    assert broker.change_visibility([first], 0) == {}
    [again] = broker.receive(queue, 10, 2)

    assert again.message_id == message_id
    assert again.receive_count == 2
    assert again.receipt != first.receipt


@pytest.mark.timeout(30)
def test_receive_visibility_timeout_overrides_the_queue_default(broker: Broker, queue: str) -> None:
    broker.send(queue, OutgoingMessage("short"))
    [first] = broker.receive(queue, 10, 2, visibility_timeout=1)

    [again] = wait_until(lambda: broker.receive(queue, 10, 0.5), 10, message="never came back")

    assert again.message_id == first.message_id
    assert again.receive_count == 2


@pytest.mark.timeout(30)
def test_ack_deletes(broker: Broker, queue: str) -> None:
    broker.send_batch(queue, [OutgoingMessage("a"), OutgoingMessage("b")])
    received = receive_all(broker, queue, 2)

    assert broker.ack(received) == {}

    stats = broker.stats(queue)
    assert (stats.visible, stats.in_flight, stats.delayed) == (0, 0, 0)
    assert broker.receive(queue, 10, 0) == []


@pytest.mark.timeout(30)
def test_ack_with_a_stale_receipt_keeps_the_message(
    broker: Broker, broker_kind: str, queue: str, request: pytest.FixtureRequest
) -> None:
    """A receipt from an earlier receive must not delete the message someone now holds.

    Reporting differs: memory and SQLite return the failure; SQS (and fauxqs, like the AWS
    documentation says) answers "success" and keeps the message, so only the effect is common.
    """
    xfail_on(request, broker_kind, {"sqs-moto": MOTO_STALE_RECEIPTS})
    broker.send(queue, OutgoingMessage("held"))
    [stale] = broker.receive(queue, 10, 2)
    broker.change_visibility([stale], 0)
    [current] = broker.receive(queue, 10, 2)

    failed = broker.ack([stale])

    if broker_kind in ("memory", "sqlite"):
        assert set(failed) == {stale.message_id}
    assert broker.stats(queue).in_flight == 1
    assert broker.ack([current]) == {}
    assert broker.stats(queue).in_flight == 0


@pytest.mark.timeout(30)
def test_change_visibility_with_a_stale_receipt_is_reported(
    broker: Broker, broker_kind: str, queue: str, request: pytest.FixtureRequest
) -> None:
    xfail_on(request, broker_kind, {"sqs-moto": MOTO_STALE_RECEIPTS})
    broker.send(queue, OutgoingMessage("held"))
    [stale] = broker.receive(queue, 10, 2)
    broker.change_visibility([stale], 0)
    [current] = broker.receive(queue, 10, 2)

    failed = broker.change_visibility([stale], 0)

    assert set(failed) == {stale.message_id}
    assert failed[stale.message_id]
    assert broker.receive(queue, 10, 0) == []  # still held by the current receipt
    assert broker.change_visibility([current], 0) == {}


@pytest.mark.timeout(30)
def test_delayed_message_arrives_after_its_delay(broker: Broker, queue: str) -> None:
    sent = time.monotonic()
    message_id = broker.send(queue, OutgoingMessage("later", delay=1))

    assert broker.receive(queue, 10, 0) == []
    [received] = wait_until(lambda: broker.receive(queue, 10, 0.5), 10, message="never arrived")

    assert received.message_id == message_id
    assert time.monotonic() - sent >= 0.9


@pytest.mark.timeout(30)
def test_long_poll_on_an_empty_queue_waits(broker: Broker, queue: str) -> None:
    started = time.monotonic()

    assert broker.receive(queue, 10, 2) == []

    assert 1.5 <= time.monotonic() - started < 10


@pytest.mark.timeout(30)
def test_long_poll_returns_when_a_message_arrives(broker: Broker, queue: str) -> None:
    # The send is scheduled half a second out so the receive below is already waiting.
    sender = threading.Timer(0.5, broker.send, (queue, OutgoingMessage("wake up")))
    started = time.monotonic()
    sender.start()
    try:
        received = broker.receive(queue, 10, 10)
    finally:
        sender.join()

    assert [m.body for m in received] == ["wake up"]
    assert 0.4 <= time.monotonic() - started < 5


@pytest.mark.timeout(30)
def test_message_received_too_often_moves_to_the_dead_letter_queue(
    broker: Broker, make_queue: Callable[..., str], unique_queue: Callable[..., str]
) -> None:
    dlq = unique_queue()
    queue = make_queue(visibility_timeout=30, dead_letter_queue=dlq, max_receive_count=2)
    message_id = broker.send(queue, OutgoingMessage("poison", attributes={"k": "v"}))

    for attempt in (1, 2):
        [received] = broker.receive(queue, 10, 2)
        assert received.receive_count == attempt
        assert broker.change_visibility([received], 0) == {}

    assert broker.receive(queue, 10, 0) == []  # the third receive moves it instead
    [dead] = wait_until(lambda: broker.receive(dlq, 10, 0.5), 10, message="not in the DLQ")
    assert (dead.message_id, dead.body, dict(dead.attributes)) == (message_id, "poison", {"k": "v"})
    assert dlq in broker.list_queues(dlq)


@pytest.mark.timeout(30)
def test_stats_count_visible_in_flight_and_delayed(broker: Broker, queue: str) -> None:
    broker.send_batch(
        queue, [OutgoingMessage("a"), OutgoingMessage("b"), OutgoingMessage("c", delay=60)]
    )
    [held] = broker.receive(queue, 1, 2)

    stats = broker.stats(queue)

    assert stats.queue == queue
    assert (stats.visible, stats.in_flight, stats.delayed) == (1, 1, 1)
    assert held.body in {"a", "b"}


@pytest.mark.timeout(30)
def test_purge_empties_the_queue(broker: Broker, queue: str) -> None:
    broker.send_batch(queue, [OutgoingMessage(f"m{i}") for i in range(3)])
    broker.receive(queue, 1, 2)

    broker.purge(queue)

    stats = broker.stats(queue)
    assert (stats.visible, stats.in_flight, stats.delayed) == (0, 0, 0)
    assert broker.receive(queue, 10, 0) == []


@pytest.mark.timeout(30)
def test_list_queues_by_prefix_and_delete(broker: Broker, unique_queue: Callable[..., str]) -> None:
    prefix = unique_queue()
    names = [f"{prefix}-a", f"{prefix}-b"]
    for name in [*names, unique_queue()]:
        broker.ensure_queue(name)

    assert broker.list_queues(prefix) == names
    assert set(names) <= set(broker.list_queues())

    broker.delete_queue(names[0])

    assert broker.list_queues(prefix) == names[1:]


@pytest.mark.timeout(30)
def test_ensure_queue_is_idempotent(broker: Broker, queue: str) -> None:
    broker.send(queue, OutgoingMessage("kept"))

    broker.ensure_queue(queue, QueueSettings(visibility_timeout=30))
    broker.ensure_queue(queue, QueueSettings(visibility_timeout=60))

    assert [m.body for m in broker.receive(queue, 10, 2)] == ["kept"]


@pytest.mark.timeout(30)
def test_missing_queue_raises_queue_does_not_exist(
    broker: Broker, unique_queue: Callable[..., str]
) -> None:
    missing = unique_queue()

    with pytest.raises(QueueDoesNotExist) as sent:
        broker.send(missing, OutgoingMessage("x"))
    with pytest.raises(QueueDoesNotExist) as received:
        broker.receive(missing, 1, 0)
    with pytest.raises(QueueDoesNotExist):
        broker.stats(missing)

    assert sent.value.queue == received.value.queue == missing


@pytest.mark.timeout(30)
def test_oversized_body_is_refused_before_sending(broker: Broker, queue: str) -> None:
    # Two UTF-8 bytes per character: too large in bytes while short enough in characters.
    body = "é" * (broker.max_body_bytes // 2 + 1)

    with pytest.raises(MessageTooLargeError) as error:
        broker.send(queue, OutgoingMessage(body))

    assert error.value.size == len(body.encode()) > broker.max_body_bytes
    assert error.value.limit == broker.max_body_bytes
    assert broker.receive(queue, 10, 0) == []


@pytest.mark.timeout(30)
def test_body_at_the_limit_is_accepted(broker: Broker, queue: str) -> None:
    body = "x" * broker.max_body_bytes

    broker.send(queue, OutgoingMessage(body))

    [received] = broker.receive(queue, 1, 2)
    assert received.body == body

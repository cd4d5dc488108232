"""One conformance suite, run against every broker: memory, SQLite, and SQS on moto and fauxqs.

What a broker must do is what SQS does (see ``ebsqs/brokers/base.py``). Where a test server
differs from SQS, the test says so with a strict ``xfail`` naming the server's behaviour, so a
server that gets fixed shows up as an unexpected pass rather than being silently tolerated.
Queues are kept small: moto's server slows down with queue depth (every send rescans the queue).

FIFO tests assert order and exclusivity, never how many messages of a group one receive returns:
fauxqs (like the embedded brokers) hands out one message per group per receive, moto and SQS
may hand out several of a group, in order.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from ebsqs.brokers.base import (
    WORKER_ATTRIBUTES,
    Broker,
    OutgoingMessage,
    QueueSettings,
    ReceivedMessage,
)
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
MOTO_DEDUP_IDS = (
    "moto answers a deduplicated FIFO send with a new message id (the duplicate is still not "
    "delivered); SQS and fauxqs answer with the first message's id"
)
FAUXQS_FAIR_GROUPS = (
    "fauxqs accepts MessageGroupId on a standard queue but does not return it on receive "
    "(SQS fair queues and moto do)"
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
        name = unique_queue(fifo=bool(settings.get("fifo")))
        broker.ensure_queue(name, QueueSettings(**settings))  # type: ignore[arg-type]
        return name

    return make


@pytest.fixture
def queue(make_queue: Callable[..., str]) -> str:
    """A fresh queue with a 30 s visibility timeout."""
    return make_queue(visibility_timeout=30)


@pytest.fixture
def fifo_queue(make_queue: Callable[..., str]) -> str:
    """A fresh FIFO queue (``*.fifo``) with a 30 s visibility timeout."""
    return make_queue(visibility_timeout=30, fifo=True)


def fifo(body: str, group: str = "g", dedup: str | None = None) -> OutgoingMessage:
    """A FIFO message; its deduplication id is its body unless given."""
    return OutgoingMessage(body, group_id=group, dedup_id=dedup or body)


def drain_in_order(broker: Broker, queue: str, last: str, timeout: float = 10) -> list[str]:
    """Receive and ack until the body ``last`` came back; the bodies, in delivery order."""
    bodies: list[str] = []

    def got_last() -> bool:
        batch = broker.receive(queue, 10, 0.5)
        assert broker.ack(batch) == {}
        bodies.extend(m.body for m in batch)
        return last in bodies

    wait_until(got_last, timeout, message=lambda: f"received {bodies}, not {last!r}")
    return bodies


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


# -- FIFO queues -------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_fifo_delivers_each_group_in_send_order(broker: Broker, fifo_queue: str) -> None:
    broker.send_batch(fifo_queue, [fifo(f"a{i}", "a") for i in range(4)] + [fifo("b0", "b")])
    broker.send_batch(fifo_queue, [fifo(f"a{i}", "a") for i in range(4, 6)])

    bodies = drain_in_order(broker, fifo_queue, "a5")

    assert [b for b in bodies if b.startswith("a")] == [f"a{i}" for i in range(6)]


@pytest.mark.timeout(30)
def test_fifo_group_is_blocked_while_one_of_its_messages_is_in_flight(
    broker: Broker, fifo_queue: str
) -> None:
    broker.send_batch(fifo_queue, [fifo(f"a{i}") for i in range(3)])
    [held] = wait_until(lambda: broker.receive(fifo_queue, 1, 0.5), 10, message="nothing came")
    assert held.body == "a0"

    assert broker.receive(fifo_queue, 10, 1) == []  # a1 and a2 wait while a0 is in flight

    assert broker.change_visibility([held], 0) == {}
    assert drain_in_order(broker, fifo_queue, "a2") == ["a0", "a1", "a2"]


@pytest.mark.timeout(30)
def test_fifo_group_held_by_a_visibility_delay_stays_blocked(
    broker: Broker, fifo_queue: str
) -> None:
    """A FIFO message delayed by visibility (ebsqs's FIFO delay) holds its group back."""
    broker.send_batch(fifo_queue, [fifo("a0"), fifo("a1")])
    [held] = wait_until(lambda: broker.receive(fifo_queue, 1, 0.5), 10, message="nothing came")
    assert held.body == "a0"

    assert broker.change_visibility([held], 60) == {}

    assert broker.receive(fifo_queue, 10, 1) == []


@pytest.mark.timeout(30)
def test_fifo_other_groups_are_not_blocked(broker: Broker, fifo_queue: str) -> None:
    broker.send_batch(fifo_queue, [fifo("a0", "a"), fifo("a1", "a"), fifo("b0", "b")])
    [held] = wait_until(lambda: broker.receive(fifo_queue, 1, 0.5), 10, message="nothing came")
    blocked, other = held.body[0], "b" if held.body[0] == "a" else "a"
    received: list[ReceivedMessage] = []

    def other_group_came() -> bool:
        received.extend(broker.receive(fifo_queue, 10, 0.5))
        return any(m.body.startswith(other) for m in received)

    wait_until(other_group_came, 10, message=lambda: f"{other} never came: {received}")
    assert held.body == f"{blocked}0"
    assert not [m.body for m in received if m.body.startswith(blocked)]


@pytest.mark.timeout(30)
def test_fifo_duplicate_dedup_id_within_the_window_is_delivered_once(
    broker: Broker, fifo_queue: str
) -> None:
    broker.send(fifo_queue, fifo("first", dedup="d"))
    broker.send(fifo_queue, fifo("duplicate", dedup="d"))
    broker.send_batch(fifo_queue, [fifo("again", dedup="d"), fifo("last", dedup="e")])

    assert drain_in_order(broker, fifo_queue, "last") == ["first", "last"]


@pytest.mark.timeout(30)
def test_fifo_duplicate_send_returns_the_first_message_id(
    broker: Broker, broker_kind: str, fifo_queue: str, request: pytest.FixtureRequest
) -> None:
    xfail_on(request, broker_kind, {"sqs-moto": MOTO_DEDUP_IDS})
    first = broker.send(fifo_queue, fifo("first", dedup="d"))

    assert broker.send(fifo_queue, fifo("duplicate", dedup="d")) == first
    assert broker.send_batch(fifo_queue, [fifo("again", dedup="d")]) == [first]


@pytest.mark.timeout(30)
def test_fifo_send_without_dedup_id_dedups_on_the_body(broker: Broker, fifo_queue: str) -> None:
    """ensure_queue gives FIFO queues content-based deduplication (SQS: the body's SHA-256)."""
    for body in ("same", "same", "other"):
        broker.send(fifo_queue, OutgoingMessage(body, group_id="g"))

    received: list[ReceivedMessage] = []

    def got_other() -> bool:
        batch = broker.receive(fifo_queue, 10, 0.5)
        broker.ack(batch)
        received.extend(batch)
        return any(m.body == "other" for m in received)

    wait_until(got_other, 10, message=lambda: f"received {received}")
    assert [m.body for m in received] == ["same", "other"]
    assert received[0].dedup_id == hashlib.sha256(b"same").hexdigest()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("metadata", [True, False], ids=["metadata", "no-metadata"])
def test_group_dedup_id_and_receive_count_come_back(
    broker: Broker, fifo_queue: str, metadata: bool
) -> None:
    message_id = broker.send(fifo_queue, fifo("body", group="orders-7", dedup="d-1"))

    [first] = wait_until(lambda: broker.receive(fifo_queue, 10, 0.5, metadata=metadata), 10)
    assert broker.change_visibility([first], 0) == {}
    [again] = wait_until(lambda: broker.receive(fifo_queue, 10, 0.5, metadata=metadata), 10)

    assert (first.message_id, first.group_id, first.dedup_id) == (message_id, "orders-7", "d-1")
    assert (again.group_id, again.dedup_id) == ("orders-7", "d-1")
    assert (first.receive_count, again.receive_count) == (1, 2)


@pytest.mark.timeout(30)
def test_fifo_per_message_delay_is_refused(broker: Broker, fifo_queue: str) -> None:
    with pytest.raises(BrokerError, match="FIFO queues take no per-message delay"):
        broker.send(fifo_queue, OutgoingMessage("x", delay=5, group_id="g", dedup_id="d"))
    with pytest.raises(BrokerError, match="FIFO queues take no per-message delay"):
        broker.send_batch(
            fifo_queue, [fifo("now"), OutgoingMessage("x", delay=1, group_id="g", dedup_id="e")]
        )

    assert broker.receive(fifo_queue, 10, 1) == []  # nothing of either send went out


@pytest.mark.timeout(30)
def test_fifo_send_without_a_group_is_refused(broker: Broker, fifo_queue: str) -> None:
    with pytest.raises(BrokerError, match="group_id"):
        broker.send(fifo_queue, OutgoingMessage("x", dedup_id="d"))

    assert broker.receive(fifo_queue, 10, 0) == []


# -- standard queues with groups (SQS fair queues) -------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("metadata", [True, False], ids=["metadata", "no-metadata"])
def test_group_id_on_a_standard_queue_is_kept(
    broker: Broker, broker_kind: str, queue: str, metadata: bool
) -> None:
    message_id = broker.send(queue, OutgoingMessage("tenant work", group_id="tenant-42"))

    [received] = wait_until(lambda: broker.receive(queue, 10, 0.5, metadata=metadata), 10)

    assert (received.message_id, received.body) == (message_id, "tenant work")
    assert received.dedup_id is None
    if broker_kind == "sqs-fauxqs":
        pytest.skip(FAUXQS_FAIR_GROUPS)
    assert received.group_id == "tenant-42"


# -- sizes and attributes ----------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_body_limit_is_the_queue_size_set_by_ensure_queue(
    broker: Broker, make_queue: Callable[..., str], unique_queue: Callable[..., str]
) -> None:
    dlq = unique_queue()
    queue = make_queue(max_body_bytes=2048, dead_letter_queue=dlq)

    limit = broker.body_limit(queue)

    assert limit.bytes == 2048
    assert repr(queue) in limit.source
    assert broker.body_limit(dlq).bytes == 2048
    broker.send(queue, OutgoingMessage("x" * 2048))
    with pytest.raises(MessageTooLargeError) as error:
        broker.send(queue, OutgoingMessage("x" * 2049))
    assert (error.value.size, error.value.limit, error.value.source) == (
        2049,
        2048,
        limit.source,
    )
    assert [len(m.body) for m in broker.receive(queue, 10, 2)] == [2048]


@pytest.mark.timeout(30)
def test_body_limit_of_a_missing_queue_is_the_brokers(
    broker: Broker, unique_queue: Callable[..., str]
) -> None:
    missing = unique_queue()

    limit = broker.body_limit(missing)

    assert limit.bytes == broker.max_body_bytes
    assert "does not exist" in limit.source and repr(missing) in limit.source


@pytest.mark.timeout(30)
def test_default_queue_takes_a_mebibyte(broker: Broker, queue: str) -> None:
    assert broker.body_limit(queue).bytes == 1024 * 1024


@pytest.mark.timeout(30)
def test_size_check_counts_attributes(broker: Broker, make_queue: Callable[..., str]) -> None:
    queue = make_queue(max_body_bytes=1024)  # SQS's smallest
    # 1000 + "n" + "Number" + 17 digits = 1024; a String of the same text counts the same.
    at_limit = OutgoingMessage("x" * 1000, attributes={"n": 12345678901234567})
    over = OutgoingMessage("x" * 1000, attributes={"n": "123456789012345678"})

    broker.send(queue, at_limit)
    with pytest.raises(MessageTooLargeError) as error:
        broker.send(queue, over)

    assert (error.value.size, error.value.limit) == (1025, 1024)
    [received] = broker.receive(queue, 10, 2)
    assert dict(received.attributes) == {"n": "12345678901234567"}


@pytest.mark.timeout(30)
def test_number_attributes_round_trip_as_text(broker: Broker, queue: str) -> None:
    attributes: dict[str, str | int] = {"count": 42, "negative": -7, "text": "42"}

    broker.send(queue, OutgoingMessage("numbers", attributes=attributes))

    [received] = broker.receive(queue, 10, 2)
    assert dict(received.attributes) == {"count": "42", "negative": "-7", "text": "42"}


@pytest.mark.timeout(30)
def test_worker_attributes_come_back_without_metadata(broker: Broker, queue: str) -> None:
    size, digest = WORKER_ATTRIBUTES[0], WORKER_ATTRIBUTES[2]
    attributes: dict[str, str | int] = {size: 300_000, digest: "ab" * 32, "other": "x"}
    broker.send(queue, OutgoingMessage("pointer", attributes=attributes))

    [received] = broker.receive(queue, 10, 2, metadata=False)

    assert received.attributes[size] == "300000"
    assert received.attributes[digest] == "ab" * 32

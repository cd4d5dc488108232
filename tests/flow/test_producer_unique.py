"""Unique tasks at the producer: a second send of the same key within the window is dropped and
returns the first task's id; bad key functions fail at ``.delay()``; a failed send gives its
claim back; a store that fails lets sends through."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import pytest

from ebsqs import producer, task
from ebsqs.brokers import OutgoingMessage, QueueSettings
from ebsqs.brokers.memory import MemoryBroker
from ebsqs.envelope import decode
from ebsqs.errors import PartialBatchError, QueueDoesNotExist
from ebsqs.flow.spec import FlowKeyError
from ebsqs.registry import TaskRegistry

pytestmark = pytest.mark.timeout(20)

TEN_MINUTES = dt.timedelta(minutes=10)


@pytest.fixture
def broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MemoryBroker:
    monkeypatch.setenv("EBSQS_BROKER_URL", "memory://flow-producer")
    monkeypatch.setenv("EBSQS_FLOW_STORE", f"sqlite:///{tmp_path / 'flow.sqlite3'}")
    producer.broker_for.cache_clear()
    yield MemoryBroker.named("flow-producer")  # type: ignore[misc]
    producer.broker_for.cache_clear()


def sent(broker: MemoryBroker, queue: str = "default") -> list[tuple[str, tuple[object, ...]]]:
    messages = broker.receive(queue, 10, 0, visibility_timeout=600)
    return sorted((decode(m.body).id, decode(m.body).args) for m in messages)


def test_a_second_send_in_the_window_is_dropped_and_names_the_first(
    broker: MemoryBroker,
) -> None:
    reg = TaskRegistry()
    report = task(name="report", registry=reg, unique_for=TEN_MINUTES)(print)
    first = report.delay(1)
    assert report.delay(1) == first  # dropped: the id of the send that holds the key
    other = report.delay(2)
    ids = report.delay_many([(3,), (3,), (1,)])
    assert ids[1] == ids[0] and ids[2] == first
    assert sent(broker) == sorted([(first, (1,)), (other, (2,)), (ids[0], (3,))])


def test_a_unique_key_function_names_what_is_the_same(broker: MemoryBroker) -> None:
    reg = TaskRegistry()
    sync = task(
        name="sync", registry=reg, unique_for=TEN_MINUTES, unique_key=lambda user, **_: user
    )(print)
    first = sync.delay(user=7, page=1)
    assert sync.delay(user=7, page=2) == first
    assert sync.delay(user=8, page=1) != first
    assert len(sent(broker)) == 2


def test_a_key_function_that_fails_raises_at_delay_and_sends_nothing(
    broker: MemoryBroker,
) -> None:
    reg = TaskRegistry()
    tenant = task(name="tenant", registry=reg, rate_limit=("10/s", lambda account_id, **_: 1))(
        print
    )
    with pytest.raises(FlowKeyError, match="lambda account_id"):
        tenant.delay(other=5)
    broker.ensure_queue("default", QueueSettings())
    assert sent(broker) == []


def test_a_failed_send_gives_its_claim_back(
    broker: MemoryBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EBSQS_AUTO_CREATE_QUEUES", "false")
    reg = TaskRegistry()
    report = task(name="report", registry=reg, unique_for=TEN_MINUTES)(print)
    with pytest.raises(QueueDoesNotExist):
        report.delay(1)
    broker.ensure_queue("default", QueueSettings())
    task_id = report.delay(1)  # not dropped: the failed send held no claim
    assert sent(broker) == [(task_id, (1,))]


def test_fifo_sends_carry_a_dedup_id_from_the_key_when_the_window_covers_sqs_s(
    broker: MemoryBroker,
) -> None:
    reg = TaskRegistry()
    long = task(name="long", registry=reg, unique_for=TEN_MINUTES, queue_name="f.fifo")(print)
    short = task(name="short", registry=reg, unique_for=60, queue_name="g.fifo")(print)
    long.delay(1)
    short_id = short.delay(1)
    received = broker.receive("f.fifo", 10, 0) + broker.receive("g.fifo", 10, 0)
    messages = {decode(m.body).task: m for m in received}
    spec = long.flow
    assert spec is not None
    assert messages["long"].dedup_id == spec.unique_name((1,), {}).rsplit(":", 1)[-1]
    # SQS keeps a dedup id five minutes: a one-minute window must not outlast itself there.
    assert messages["short"].dedup_id == short_id


def test_an_unreachable_store_lets_sends_through(
    broker: MemoryBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EBSQS_FLOW_STORE", "redis://127.0.0.1:9/0")
    reg = TaskRegistry()
    report = task(name="report", registry=reg, unique_for=TEN_MINUTES)(print)
    assert report.delay(1) != report.delay(1)
    assert len(sent(broker)) == 2


def test_a_partly_failed_batch_gives_back_only_the_claims_of_what_was_not_sent(
    broker: MemoryBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = TaskRegistry()
    report = task(name="report", registry=reg, unique_for=TEN_MINUTES)(print)
    real = broker.send_batch

    def second_fails(queue: str, messages: Sequence[OutgoingMessage]) -> list[str]:
        ids = real(queue, [messages[0]])
        raise PartialBatchError("send", failed={1: "throttled"}, succeeded={0: ids[0]})

    monkeypatch.setattr(broker, "send_batch", second_fails)
    with pytest.raises(PartialBatchError) as caught:
        report.delay_many([(1,), (2,)])
    monkeypatch.setattr(broker, "send_batch", real)
    assert "task " in str(caught.value)  # the failure names the task id to send again
    sent_first = report.delay(1)  # sent: its claim holds, this is dropped
    resent = report.delay(2)  # not sent: its claim went back
    messages = sent(broker)
    assert sorted(args for _, args in messages) == [(1,), (2,)]
    assert sent_first in {task_id for task_id, args in messages if args == (1,)}
    assert resent in {task_id for task_id, args in messages if args == (2,)}

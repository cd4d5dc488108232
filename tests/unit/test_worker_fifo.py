"""FIFO queues and message groups in the worker loop and the producer, on the memory broker.

The memory broker keeps SQS's FIFO rules (one message of a group in flight, in send order,
deduplication for five minutes); what needs several messages of one group in a single receive
(SQS's behaviour) is in ``tests/integration/test_fifo_worker.py`` on moto's server.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from ebsqs import producer, task
from ebsqs.brokers import QueueSettings
from ebsqs.brokers.memory import MemoryBroker
from ebsqs.config import Settings
from ebsqs.context import current
from ebsqs.envelope import decode
from ebsqs.errors import ConfigurationError, MessageGroupError
from ebsqs.executors.inline import InlineExecutor
from ebsqs.registry import TaskRegistry
from ebsqs.task import Task
from ebsqs.worker import Worker, WorkerOptions
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(20)

FIFO = "q.fifo"
SETTINGS = Settings(broker_url="memory://fifo", backoff_base=0, auto_create_queues=False)

runs: list[tuple[str, int]] = []


@pytest.fixture
def reg() -> TaskRegistry:
    return TaskRegistry()


@pytest.fixture
def broker() -> Iterator[MemoryBroker]:
    runs.clear()
    producer.broker_for.cache_clear()
    the_broker = MemoryBroker.named("fifo")
    for queue, dlq in ((FIFO, "q-dlq.fifo"), ("q", "q-dlq")):
        the_broker.ensure_queue(
            queue, QueueSettings(dead_letter_queue=dlq, fifo=queue.endswith(".fifo"))
        )
    yield the_broker
    producer.broker_for.cache_clear()


def worker_on(broker: MemoryBroker, reg: TaskRegistry, queue: str = FIFO) -> Worker:
    worker = Worker(
        broker,
        SETTINGS,
        InlineExecutor(registry=reg),
        WorkerOptions(queues=(queue,), wait_seconds=0),
        registry=reg,
    )
    worker.start()
    return worker


def send(t: Task[..., object], *args: object, queue: str = FIFO, **options: Any) -> str:
    """Send ``t(*args)`` as ``.delay()`` would, with these settings and send options."""
    call_options = producer.SendOptions(queue_name=queue, **options)
    [task_id] = producer.send_now(t, [producer.Call(args)], call_options, settings=SETTINGS)
    return task_id


def test_a_fifo_send_carries_a_group_and_the_task_id_as_deduplication_id(
    broker: MemoryBroker, reg: TaskRegistry
) -> None:
    noop = task(name="noop", registry=reg)(lambda key: None)
    by_order = task(name="by_order", registry=reg, group_by=lambda order_id, **_: order_id)(
        lambda order_id: None
    )
    first = send(noop, "x")
    send(by_order, 42)
    send(noop, "y", group_id="custom")
    received = {m.group_id: m for m in broker.receive(FIFO, 10, 0)}
    assert set(received) == {"default", "42", "custom"}
    assert received["default"].dedup_id == first == decode(received["default"].body).id


def test_a_deduplication_id_reused_within_five_minutes_sends_once(
    broker: MemoryBroker, reg: TaskRegistry
) -> None:
    noop = task(name="noop", registry=reg)(lambda key: None)
    send(noop, "first", deduplication_id="order-7")
    send(noop, "second", deduplication_id="order-7")
    [message] = broker.receive(FIFO, 10, 0)
    assert decode(message.body).args == ("first",)


def test_groups_and_deduplication_ids_sqs_would_refuse_fail_at_delay(
    broker: MemoryBroker, reg: TaskRegistry
) -> None:
    noop = task(name="noop", registry=reg)(lambda key: None)
    with pytest.raises(MessageGroupError, match="1 to 128 printable ASCII"):
        send(noop, "x", group_id="has space")
    with pytest.raises(MessageGroupError, match="deduplication id"):
        send(noop, "x", deduplication_id="é")
    broken = task(name="broken", registry=reg, group_by=lambda account_id: account_id)(
        lambda **kwargs: None
    )
    with pytest.raises(MessageGroupError, match="group function failed"):
        send(broken)
    with pytest.raises(ConfigurationError, match="give one"):
        task(name="both", registry=reg, fifo_group="a", tenant="b")(lambda: None)
    assert broker.receive(FIFO, 10, 0) == []


def test_a_fifo_retry_keeps_its_place_counts_attempts_and_dead_letters_in_its_group(
    broker: MemoryBroker, reg: TaskRegistry
) -> None:
    @task(name="flaky", registry=reg, max_retries=2, retry_on=(ValueError,))
    def flaky(key: str) -> None:
        runs.append((key, current().attempt))
        if key == "poison":
            raise ValueError("always")

    send(flaky, "poison")
    send(flaky, "after")
    worker = worker_on(broker, reg)
    wait_until(lambda: worker.loop_once() or ("after", 1) in runs, 10, interval=0)
    # Three runs of the poison message, attempts from its receive count, then the next one.
    assert runs == [("poison", 1), ("poison", 2), ("poison", 3), ("after", 1)]
    [letter] = broker.receive("q-dlq.fifo", 10, 0)
    assert letter.group_id == "default"
    assert letter.attributes["ebsqs-reason"] == "retries exhausted"
    assert letter.attributes["ebsqs-attempts"] == "3"


def test_a_delayed_fifo_message_waits_invisible_and_holds_its_group(
    broker: MemoryBroker, reg: TaskRegistry
) -> None:
    @task(name="record", registry=reg)
    def record(key: str) -> None:
        runs.append((key, current().attempt))

    sent = time.time()
    send(record, "later", delay=2)
    send(record, "next")
    worker = worker_on(broker, reg)
    for _ in range(5):
        worker.loop_once()
    assert runs == []  # "later" is parked, and "next" waits behind it
    wait_until(lambda: worker.loop_once() or len(runs) == 2, 10, interval=0.05)
    assert runs == [("later", 1), ("next", 1)]  # the wait was no attempt
    assert time.time() - sent >= 2


def test_a_fair_queue_tenant_travels_with_retries(broker: MemoryBroker, reg: TaskRegistry) -> None:
    @task(
        name="per_tenant",
        registry=reg,
        max_retries=1,
        retry_on=(ValueError,),
        tenant=lambda account_id, **_: f"acct-{account_id}",
    )
    def per_tenant(account_id: int) -> None:
        runs.append((str(account_id), current().attempt))
        raise ValueError("again")

    send(per_tenant, 7, queue="q")
    [first] = broker.receive("q", 10, 0)
    assert first.group_id == "acct-7" and first.dedup_id is None
    broker.change_visibility([first], 0)
    worker = worker_on(broker, reg, queue="q")
    wait_until(lambda: worker.loop_once() or len(runs) == 2, 10, interval=0)
    [letter] = broker.receive("q-dlq", 10, 0)
    assert letter.group_id == "acct-7"  # the retry, and then its dead letter, kept the tenant
    assert runs == [("7", 1), ("7", 2)]


def test_a_fifo_redrive_keeps_the_group_and_a_fixed_deduplication_id(
    broker: MemoryBroker, reg: TaskRegistry
) -> None:
    from ebsqs.brokers import OutgoingMessage
    from ebsqs.cli import redrive

    broker.send(
        "q-dlq.fifo",
        OutgoingMessage("body", attributes={"ebsqs-reason": "failed"}, group_id="G", dedup_id="x"),
    )
    assert redrive(broker, "q-dlq.fifo", FIFO, None) == 1
    [back] = broker.receive(FIFO, 10, 0)
    assert back.group_id == "G" and back.body == "body"
    assert back.dedup_id is not None and back.dedup_id.endswith(":redrive")
    assert "ebsqs-reason" not in back.attributes  # the reasons stay behind

"""The middleware seam: before start (run, defer, reject), around the task, after the outcome."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator

import pytest

from ebsqs import middleware, producer, task
from ebsqs.brokers import OutgoingMessage, QueueSettings
from ebsqs.brokers.memory import MemoryBroker
from ebsqs.config import Settings
from ebsqs.envelope import Envelope, decode, encode
from ebsqs.errors import QueueDoesNotExist
from ebsqs.executors.execution import Job, Outcome, OutcomeKind
from ebsqs.executors.inline import InlineExecutor
from ebsqs.executors.thread import ThreadExecutor
from ebsqs.middleware import RUN, Decision, Middleware, defer, reject
from ebsqs.registry import TaskRegistry
from ebsqs.worker import Worker, WorkerOptions

pytestmark = pytest.mark.timeout(10)


class Recorder(Middleware):
    """Records every call, with the thread it came from; decides by task name."""

    def __init__(self, decisions: dict[str, Decision] | None = None) -> None:
        self.decisions = decisions or {}
        self.calls: list[tuple[str, str, str]] = []

    def _record(self, event: str, job: Job) -> None:
        self.calls.append((event, job.envelope.task, threading.current_thread().name))

    def before_start(self, job: Job) -> Decision:
        self._record("before_start", job)
        return self.decisions.get(job.envelope.task, RUN)

    def task_started(self, job: Job) -> None:
        self._record("task_started", job)

    def task_finished(self, job: Job, outcome: Outcome) -> None:
        self._record(f"task_finished:{outcome.kind}", job)

    def after_outcome(self, job: Job, outcome: Outcome) -> None:
        self._record(f"after_outcome:{outcome.kind}", job)


@pytest.fixture(autouse=True)
def registered() -> Iterator[list[Middleware]]:
    saved = list(middleware.MIDDLEWARE)
    middleware.MIDDLEWARE.clear()
    yield middleware.MIDDLEWARE
    middleware.MIDDLEWARE[:] = saved


@pytest.fixture
def broker() -> MemoryBroker:
    b = MemoryBroker()
    b.ensure_queue("q", QueueSettings(dead_letter_queue="q-dlq"))
    b.ensure_queue("q-dlq", QueueSettings())
    return b


def worker_on(broker: MemoryBroker, reg: TaskRegistry, executor: object = None) -> Worker:
    worker = Worker(
        broker,
        Settings(broker_url="memory://unused"),
        executor or InlineExecutor(registry=reg),  # type: ignore[arg-type]
        WorkerOptions(queues=("q",), wait_seconds=0),
        registry=reg,
    )
    worker.start()
    return worker


def send(broker: MemoryBroker, name: str) -> None:
    broker.send("q", OutgoingMessage(encode(Envelope(task=name))))


def test_hooks_run_in_order_and_in_the_right_threads(broker: MemoryBroker) -> None:
    reg = TaskRegistry()
    task(name="ok", registry=reg)(lambda: None)
    recorder = Recorder()
    middleware.add(recorder)
    middleware.add(recorder)  # once only
    send(broker, "ok")
    worker = worker_on(broker, reg, ThreadExecutor(concurrency=1, registry=reg))
    try:
        for _ in range(20):
            worker.loop_once()
            if len(recorder.calls) == 4:
                break
    finally:
        worker.drain()
    events = [(event, thread) for event, _, thread in recorder.calls]
    loop = threading.current_thread().name
    assert events == [
        ("before_start", loop),
        ("task_started", "ebsqs-task-0"),
        ("task_finished:succeeded", "ebsqs-task-0"),
        ("after_outcome:succeeded", loop),
    ]


def test_a_deferred_message_is_released_with_its_delay_and_no_failure(
    broker: MemoryBroker,
) -> None:
    reg = TaskRegistry()
    ran: list[str] = []
    task(name="limited", registry=reg)(lambda: ran.append("limited"))
    recorder = Recorder({"limited": defer(60, "rate limit")})
    middleware.add(recorder)
    send(broker, "limited")
    worker = worker_on(broker, reg)
    worker.loop_once()
    worker.drain()
    assert ran == []
    stats = worker.counters.tasks["limited"]
    assert (stats.deferred, stats.failed, stats.dead_lettered) == (1, 0, 0)
    queue = broker.stats("q")
    assert (queue.visible, queue.in_flight) == (0, 1)  # hidden for its delay, not deleted
    [stored] = broker._queues["q"].messages.values()
    assert stored.visible_at - broker._clock() > 50
    assert broker.stats("q-dlq").visible == 0


def test_a_rejected_message_is_dead_lettered_with_the_reason_and_never_runs(
    broker: MemoryBroker,
) -> None:
    reg = TaskRegistry()
    ran: list[str] = []
    task(name="banned", registry=reg)(lambda: ran.append("banned"))
    task(name="ok", registry=reg)(lambda: ran.append("ok"))
    middleware.add(Recorder({"banned": reject("tenant suspended")}))
    send(broker, "banned")
    send(broker, "ok")
    worker = worker_on(broker, reg)
    for _ in range(3):
        worker.loop_once()
    worker.drain()
    assert ran == ["ok"]
    [letter] = broker.receive("q-dlq", 10, 0)
    assert letter.attributes["ebsqs-reason"] == "rejected"
    assert letter.attributes["ebsqs-error"] == "tenant suspended"
    assert letter.attributes["ebsqs-task"] == "banned"
    assert worker.counters.tasks["banned"].dead_lettered == 1
    assert broker.stats("q").visible == broker.stats("q").in_flight == 0


def test_the_first_middleware_that_does_not_say_run_decides(broker: MemoryBroker) -> None:
    reg = TaskRegistry()
    task(name="t", registry=reg)(lambda: None)
    first, second = Recorder({"t": defer(5, "first")}), Recorder({"t": reject("second")})
    middleware.add(first)
    middleware.add(second)
    send(broker, "t")
    worker = worker_on(broker, reg)
    worker.loop_once()
    worker.drain()
    assert worker.counters.tasks["t"].deferred == 1
    assert [event for event, _, _ in second.calls] == []


def test_after_outcome_sees_failures_before_they_are_settled(broker: MemoryBroker) -> None:
    reg = TaskRegistry()

    def boom() -> None:
        raise ValueError("no")

    task(name="boom", registry=reg)(boom)
    seen: list[tuple[OutcomeKind, int]] = []

    class Observer(Middleware):
        def after_outcome(self, job: Job, outcome: Outcome) -> None:
            # Not settled yet: nothing is dead-lettered at this point.
            seen.append((outcome.kind, broker.stats("q-dlq").visible))

    middleware.add(Observer())
    send(broker, "boom")
    worker = worker_on(broker, reg)
    worker.loop_once()
    worker.drain()
    assert seen == [(OutcomeKind.FAILED, 0)]
    assert broker.stats("q-dlq").visible == 1


def test_a_send_waits_for_a_middleware_that_sends_later() -> None:
    reg = TaskRegistry()
    later: list[object] = []

    class Later(Middleware):
        def send_later(self, *, on_commit: bool):  # type: ignore[no-untyped-def]
            return later.append if on_commit else None

    middleware.add(Later())
    noop = task(name="noop", registry=reg)(lambda x: None)
    task_id = noop.delay_on_commit(1)
    assert len(later) == 1 and isinstance(task_id, str)
    with pytest.raises(TypeError, match="argument"):
        noop.delay_on_commit(object())  # checked now, not when it is sent
    assert len(later) == 1


def test_before_send_folds_every_middleware_over_each_new_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EBSQS_BROKER_URL", "memory://sends")
    producer.broker_for.cache_clear()
    seen: list[tuple[str, str, object]] = []

    class Stamp(Middleware):
        def __init__(self, name: str) -> None:
            self.name = name

        def before_send(self, envelope: Envelope, queue: str) -> Envelope:
            seen.append((self.name, queue, envelope.trace))
            return dataclasses.replace(envelope, trace={**(envelope.trace or {}), self.name: "1"})

    middleware.add(Stamp("first"))
    middleware.add(Stamp("second"))
    noop = task(name="noop", registry=TaskRegistry())(lambda x: None)
    noop.send_with(queue_name="stamped").delay(1)

    assert seen == [("first", "stamped", None), ("second", "stamped", {"first": "1"})]
    [message] = MemoryBroker.named("sends").receive("stamped", 10, wait_seconds=0)
    assert decode(message.body).trace == {"first": "1", "second": "1"}
    producer.broker_for.cache_clear()


def test_a_keeper_takes_the_encoded_messages_and_the_queue_is_never_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An outbox's seam: the messages it keeps are what would have been sent, and a kept send
    needs no word with the queue (its size limit is not read), so it works while SQS is down."""
    monkeypatch.setenv("EBSQS_BROKER_URL", "memory://kept")
    monkeypatch.setenv("EBSQS_AUTO_CREATE_QUEUES", "false")  # a send to SQS would fail here
    producer.broker_for.cache_clear()
    kept: list[tuple[str, list[OutgoingMessage], list[str]]] = []

    class Keep(Middleware):
        def keeper(self, queue: str) -> middleware.Keeper | None:
            if queue != "kept":
                return None
            return lambda messages, ids: kept.append((queue, list(messages), list(ids)))

    middleware.add(Keep())
    noop = task(name="noop", registry=TaskRegistry())(lambda x: None)
    broker = MemoryBroker.named("kept")
    asked: list[str] = []
    body_limit = broker.body_limit
    monkeypatch.setattr(
        broker, "body_limit", lambda queue: asked.append(queue) or body_limit(queue)
    )
    ids = noop.send_with(queue_name="kept", delay=30).delay_many([(1,), (2,)])

    [(queue, messages, task_ids)] = kept
    assert queue == "kept" and task_ids == ids and asked == []
    assert [decode(m.body).args for m in messages] == [(1,), (2,)]
    assert all(m.delay == 30 for m in messages)
    with pytest.raises(QueueDoesNotExist):
        noop.send_with(queue_name="other").delay(3)  # not kept: sent, and the queue is missing
    assert asked == ["other"]
    producer.broker_for.cache_clear()

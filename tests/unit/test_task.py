"""@task, .delay() and friends, against the memory broker."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator

import pytest

from ebsqs import MaxRetriesReachedException, SerializationError, producer, task
from ebsqs.brokers.memory import MemoryBroker
from ebsqs.config import load_settings
from ebsqs.eager import EagerTaskFailed
from ebsqs.envelope import decode
from ebsqs.errors import ConfigurationError, MessageTooLargeError
from ebsqs.producer import SendOptions
from ebsqs.registry import TaskRegistry, registry
from ebsqs.task import Task

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> Iterator[MemoryBroker]:
    monkeypatch.setenv("EBSQS_BROKER_URL", "memory://tasks")
    yield MemoryBroker.named("tasks")


@pytest.fixture(autouse=True)
def clean_registry() -> Iterator[None]:
    before = dict(registry._tasks)
    yield
    registry._tasks.clear()
    registry._tasks.update(before)


def bodies(broker: MemoryBroker, queue: str) -> list[dict[str, object]]:
    """The envelopes waiting in a queue, as dicts."""
    envelopes = [decode(m.body) for m in broker.receive(queue, 10, 0)]
    return [{name: getattr(e, name) for name in e.__slots__} for e in envelopes]


def test_calling_a_task_runs_it_here() -> None:
    @task(queue_name="q")
    def add(a: int, b: int) -> int:
        return a + b

    assert add(2, 3) == 5
    assert isinstance(add, Task)
    assert add.name.endswith("test_calling_a_task_runs_it_here.<locals>.add")


def test_delay_sends_to_the_task_queue_with_its_retries(broker: MemoryBroker) -> None:
    @task(queue_name="q2", max_retries=3)
    def job(tenant_id: int, headers: list[str] | None = None) -> None: ...

    task_id = job.delay(tenant_id=7, headers=["a"])
    [sent] = bodies(broker, "q2")
    assert sent["kwargs"] == {"tenant_id": 7, "headers": ["a"]}
    assert sent["max_retries"] == 3
    assert isinstance(task_id, str) and len(task_id) == 36


def test_falsy_options_are_honoured(broker: MemoryBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EBSQS_DEFAULT_MAX_RETRIES", "5")

    @task(queue_name="q", max_retries=0)
    def job() -> None: ...

    job.delay()
    assert bodies(broker, "q")[0]["max_retries"] == 0


def test_legacy_keywords_are_send_options_unless_the_function_takes_them(
    broker: MemoryBroker,
) -> None:
    @task(queue_name="q")
    def ping(x: int) -> None: ...

    @task(queue_name="q")
    def takes_delay(delay: int) -> None: ...

    ping.delay(1, queue_name="other")
    assert bodies(broker, "other")[0]["args"] == (1,)
    takes_delay.delay(delay=5)
    assert bodies(broker, "q")[0]["kwargs"] == {"delay": 5}


def test_delay_hides_the_message_for_that_long(broker: MemoryBroker) -> None:
    @task(queue_name="q")
    def later() -> None: ...

    later.delay(delay=300)
    assert broker.stats("q").delayed == 1 and broker.receive("q", 10, 0) == []


def test_delays_past_fifteen_minutes_carry_their_due_time(broker: MemoryBroker) -> None:
    @task(queue_name="q")
    def tomorrow() -> None: ...

    before = time.time()
    tomorrow.send_with(delay=86400).delay()
    tomorrow.send_with(eta=dt.datetime.now(dt.UTC) + dt.timedelta(days=2)).delay()
    stored = list(broker._queues["q"].messages.values())
    dues = sorted(decode(m.body).due or 0 for m in stored)
    assert before + 86400 <= dues[0] < before + 86400 + 5
    assert dues[1] > before + 2 * 86400 - 5
    assert all(m.visible_at - before <= 901 for m in stored)


def test_delay_many_sends_every_call_in_order(broker: MemoryBroker) -> None:
    @task(queue_name="many")
    def item(i: int, tag: str = "") -> None: ...

    ids = item.delay_many([item.call(0), (1,), {"i": 2, "tag": "x"}] + [(i,) for i in range(3, 25)])
    assert len(ids) == 25 and len(set(ids)) == 25
    got = []
    while batch := broker.receive("many", 10, 0):
        got += [decode(m.body) for m in batch]
    assert sorted(e.args[0] if e.args else e.kwargs["i"] for e in got) == list(range(25))


def test_unserialisable_argument_fails_at_delay_and_sends_nothing(broker: MemoryBroker) -> None:
    @task(queue_name="q")
    def job(when: object) -> None: ...

    broker.ensure_queue("q")
    with pytest.raises(SerializationError, match="'when'"):
        job.delay(when=dt.datetime.now())
    with pytest.raises(SerializationError):
        job.delay_many([("ok",), (object(),)])
    assert broker.stats("q").visible == 0


def test_oversized_body_fails_at_delay_with_size_and_limit(broker: MemoryBroker) -> None:
    @task(queue_name="q")
    def job(blob: str) -> None: ...

    broker.ensure_queue("q")
    with pytest.raises(MessageTooLargeError, match=r"\d+ bytes, over the broker's limit of 262144"):
        job.delay("x" * (2 * 1024 * 1024))
    assert broker.stats("q").visible == 0


def test_eager_mode_runs_through_serialisation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EBSQS_EAGER", "1")
    calls: list[int] = []

    @task(queue_name="q")
    def record(x: int) -> None:
        calls.append(x)

    @task(queue_name="q")
    def needs_json(x: object) -> None: ...

    record.delay(4)
    assert calls == [4]
    with pytest.raises(SerializationError):
        needs_json.delay(object())


def test_eager_mode_retries_then_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EBSQS_EAGER", "true")
    runs: list[int] = []

    @task(queue_name="q", max_retries=2)
    def flaky() -> None:
        runs.append(1)
        flaky.retry()

    with pytest.raises(EagerTaskFailed, match="MaxRetriesReached"):
        flaky.delay()
    assert len(runs) == 3


def test_retry_outside_a_task_is_an_error() -> None:
    @task
    def plain() -> None: ...

    with pytest.raises(RuntimeError, match="outside a running task"):
        plain.retry()
    assert MaxRetriesReachedException(3).retries == 3


def test_two_functions_cannot_share_a_name() -> None:
    own = TaskRegistry()
    task(name="dup", registry=own)(lambda: None)
    with pytest.raises(ConfigurationError, match="two tasks are named 'dup'"):

        @task(name="dup", registry=own)
        def other() -> None: ...


def test_send_uses_the_settings_it_is_given(
    broker: MemoryBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    @task(queue_name="q")
    def job(x: int) -> None: ...

    # The environment names memory://tasks; the explicit settings must win (`ebsqs send --broker`).
    elsewhere = MemoryBroker.named("elsewhere")
    settings = load_settings(broker_url="memory://elsewhere", queue_prefix="p-")
    [task_id] = producer.send(job, [job.call(3)], SendOptions(), settings=settings)
    [message] = elsewhere.receive("p-q", 10, 0)
    assert decode(message.body).id == task_id
    assert "q" not in broker._queues or broker.stats("q").visible == 0
    [again] = producer.send_now(job, [job.call(4)], SendOptions(), settings=settings)
    assert decode(elsewhere.receive("p-q", 10, 0)[0].body).id == again

"""@task, .delay() and friends, against the memory broker."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from ebsqs import MaxRetriesReachedException, SerializationError, producer, task
from ebsqs.brokers import OutgoingMessage, QueueSettings
from ebsqs.brokers.checks import MAX_BATCH_BYTES, batch_ranges, message_bytes
from ebsqs.brokers.memory import MemoryBroker
from ebsqs.brokers.sqs import SQSBroker
from ebsqs.config import Settings, load_settings
from ebsqs.eager import EagerTaskFailed
from ebsqs.envelope import decode
from ebsqs.errors import ConfigurationError, MessageTooLargeError, PartialBatchError
from ebsqs.executors.inline import InlineExecutor
from ebsqs.producer import SendOptions
from ebsqs.registry import TaskRegistry, registry
from ebsqs.task import Task
from ebsqs.worker import Worker, WorkerOptions

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
    limit = r"over the limit of 1048576 bytes \(max_body_bytes of memory queue 'q'\)"
    with pytest.raises(MessageTooLargeError, match=rf"is \d+ bytes, {limit}.*large_payload_bucket"):
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


def test_text_is_counted_in_utf8_bytes_so_150_kb_of_euros_fits(broker: MemoryBroker) -> None:
    @task(queue_name="q")
    def note(text: str) -> None: ...

    # A queue whose MaximumMessageSize is the old 256 KiB: its own limit is what counts.
    broker.ensure_queue("q", QueueSettings(max_body_bytes=256 * 1024))
    note.delay("€" * 50_000)  # 150 KB of UTF-8; escaped as \u20ac it was 300 KB, refused
    [message] = broker.receive("q", 10, 0)
    assert decode(message.body).args == ("€" * 50_000,)
    with pytest.raises(MessageTooLargeError, match=r"is 3\d{5} bytes, over the limit of 262144"):
        note.delay("€" * 100_000)


def test_a_signed_delay_with_int_keys_runs_on_a_worker_with_the_key(
    broker: MemoryBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The signature covers the bytes sent, not the Python payload (int keys became strings)."""
    monkeypatch.setenv("EBSQS_SIGNING_KEYS", "k-new, k-old")
    runs: list[object] = []
    own = TaskRegistry()

    @task(queue_name="q", name="signed", registry=own)
    def signed(mapping: dict[str, str]) -> None:
        runs.append(mapping)

    signed.delay({9: "x"})  # type: ignore[dict-item]
    worker = Worker(
        broker,
        Settings(broker_url="memory://tasks", signing_key="k-new"),
        InlineExecutor(registry=own),
        WorkerOptions(queues=("q",), wait_seconds=0),
        registry=own,
    )
    worker.start()
    deadline = time.monotonic() + 5
    while not runs and time.monotonic() < deadline:
        worker.loop_once()
    worker.drain(time.monotonic() + 5)
    assert runs == [{"9": "x"}]
    assert worker.counters.total("succeeded") == 1


def test_signing_settings_read_a_key_list_and_an_age(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EBSQS_SIGNING_KEYS", "new, old,")
    monkeypatch.setenv("EBSQS_SIGNATURE_MAX_AGE", "300")
    settings = load_settings()
    assert (settings.signing_keys, settings.signing_key) == (("new", "old"), "new")
    assert settings.signature_max_age == 300.0
    assert Settings(signing_key="only").signing_keys == ("only",)
    assert Settings(signing_keys=["a", "b"]).signing_keys == ("a", "b")  # type: ignore[arg-type]
    assert settings.replace(signing_keys="c").signing_key == "c"
    assert settings.replace(signing_key="d").signing_keys == ("d",)
    assert Settings().signing_keys == () and Settings().signing_key is None


@pytest.mark.parametrize(
    ("variables", "fragment"),
    [
        ({"EBSQS_SIGNING_KEYS": "a,b", "EBSQS_SIGNING_KEY": "c"}, "not one of signing_keys"),
        ({"EBSQS_SIGNATURE_MAX_AGE": "0"}, r"signature_max_age must be seconds > 0, got 0.0"),
        ({"EBSQS_SIGNATURE_MAX_AGE": "soon"}, r"SIGNATURE_MAX_AGE|signature_max_age.*float"),
    ],
)
def test_bad_signing_settings_are_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], fragment: str
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match=fragment):
        load_settings()


def test_batches_end_at_ten_entries_or_at_the_batch_byte_limit() -> None:
    euros = [OutgoingMessage("€" * 40_000) for _ in range(10)]  # 120 KB each, 40,000 characters
    assert [len(r) for r in batch_ranges(euros)] == [8, 2]  # 9 would be 1,080,000 bytes
    small = [OutgoingMessage("x") for _ in range(25)]
    assert [len(r) for r in batch_ranges(small)] == [10, 10, 5]
    tagged = OutgoingMessage("x" * 1000, attributes={"ebsqs-error": "y" * 1000})
    assert message_bytes(tagged) == 1000 + len("ebsqs-error") + len("String") + 1000
    assert [len(r) for r in batch_ranges([tagged] * 3, max_bytes=4500)] == [2, 1]
    assert [len(r) for r in batch_ranges([OutgoingMessage("x" * 2000)] * 2, 1000)] == [1, 1]
    for messages in (euros, small):
        for batch in batch_ranges(messages):
            assert sum(message_bytes(messages[i]) for i in batch) <= MAX_BATCH_BYTES


@pytest.fixture
def sqs_producer(sqs_env: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[SQSBroker]:
    """The producer's SQS broker, talking to moto's server (fresh for this test)."""
    monkeypatch.setenv("EBSQS_BROKER_URL", "sqs://")
    producer.broker_for.cache_clear()
    the_broker = producer.broker_for("sqs://")
    assert isinstance(the_broker, SQSBroker)
    yield the_broker
    producer.broker_for.cache_clear()


def received_all(the_broker: SQSBroker, queue: str) -> list[str]:
    bodies: list[str] = []
    while batch := the_broker.receive(queue, 10, 0):
        bodies += [message.body for message in batch]
    return bodies


@pytest.mark.timeout(30)
def test_delay_many_splits_batches_at_the_byte_limit_on_sqs(
    sqs_producer: SQSBroker, unique_queue: Callable[..., str]
) -> None:
    """25 bodies of 110 KB: ten in one request would be 1.1 MB, which SQS refuses whole."""
    queue = unique_queue()

    @task(queue_name=queue)
    def blob(i: int, data: str) -> None: ...

    ids = blob.delay_many([blob.call(i, "x" * 110_000) for i in range(25)])
    got = [decode(body) for body in received_all(sqs_producer, queue)]
    assert sorted(e.args[0] for e in got) == list(range(25))
    assert sorted(e.id for e in got) == sorted(ids)


@pytest.mark.timeout(30)
def test_a_permanent_failure_names_the_callers_index_and_task_id_and_nothing_is_resent(
    sqs_producer: SQSBroker, unique_queue: Callable[..., str]
) -> None:
    queue = unique_queue()
    requested: list[str] = []

    def spoil(params: dict[str, Any], **_: object) -> None:
        # A real per-entry refusal from the server: moto fails just that entry's DelaySeconds.
        for entry in params["Entries"]:
            requested.append(entry["MessageBody"])
            if '"poison"' in entry["MessageBody"]:
                entry["DelaySeconds"] = 901

    sqs_producer.client.meta.events.register("before-parameter-build.sqs.SendMessageBatch", spoil)

    @task(queue_name=queue)
    def item(i: int, tag: str = "") -> None: ...

    calls = [
        item.call(
            i,
            "poison" if i == 13 else "",
        )
        for i in range(25)
    ]
    calls = [replace(call, task_id=f"task-{i}") for i, call in enumerate(calls)]
    with pytest.raises(PartialBatchError, match=r"1 of 25 failed \(#13: task task-13: ") as error:
        item.delay_many(calls)
    assert set(error.value.failed) == {13} and "DelaySeconds" in error.value.failed[13]
    assert sorted(error.value.succeeded) == [i for i in range(25) if i != 13]
    got = [decode(body) for body in received_all(sqs_producer, queue)]
    assert sorted(e.id for e in got) == sorted(f"task-{i}" for i in range(25) if i != 13)
    assert len(requested) == len(set(requested)) == 25  # every body went out exactly once


def test_a_dead_letter_queue_created_on_demand_gets_no_dead_letter_queue_of_its_own() -> None:
    from ebsqs.brokers.memory import MemoryBroker
    from ebsqs.config import Settings
    from ebsqs.producer import ensure_queue

    broker = MemoryBroker()
    settings = Settings(broker_url="memory://unused")
    ensure_queue(broker, settings, "jobs-dlq")
    ensure_queue(broker, settings, "orders-dlq.fifo")
    assert sorted(broker.list_queues("")) == ["jobs-dlq", "orders-dlq.fifo"]
    ensure_queue(broker, settings, "jobs")
    assert sorted(broker.list_queues("")) == ["jobs", "jobs-dlq", "orders-dlq.fifo"]
    assert settings.is_dead_letter_queue("a-dlq") and not settings.is_dead_letter_queue("a")

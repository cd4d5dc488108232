"""The SQLite broker against real files: SQS semantics, threads, and forked processes."""

from __future__ import annotations

import hashlib
import multiprocessing
import sqlite3
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from ebsqs.brokers.base import (
    DEDUP_WINDOW_SECONDS,
    DEFAULT_MAX_BODY_BYTES,
    BodyLimit,
    OutgoingMessage,
    QueueSettings,
    QueueStats,
    ReceivedMessage,
)
from ebsqs.brokers.sqlite import SCHEMA_VERSION, SQLiteBroker
from ebsqs.errors import (
    BrokerDamaged,
    BrokerError,
    ConfigurationError,
    MessageTooLargeError,
    QueueDoesNotExist,
)
from tests.clock import FakeClock
from tests.fixtures import boot_damage

pytestmark = pytest.mark.timeout(30)

FORK = multiprocessing.get_context("fork")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def broker(tmp_path: Path, clock: FakeClock) -> Iterator[SQLiteBroker]:
    b = SQLiteBroker(str(tmp_path / "b.db"), clock=clock)
    b.ensure_queue("q", QueueSettings(visibility_timeout=30))
    yield b
    b.close()


def send_texts(broker: SQLiteBroker, queue: str, texts: list[str]) -> list[str]:
    return broker.send_batch(queue, [OutgoingMessage(text) for text in texts])


# -- basic operations ----------------------------------------------------------------------------


def test_round_trip(broker: SQLiteBroker, clock: FakeClock) -> None:
    message_id = broker.send("q", OutgoingMessage("hello", attributes={"reason": "why"}))

    [received] = broker.receive("q", 10, 0)

    assert received.message_id == message_id
    assert received.queue == "q"
    assert received.body == "hello"
    assert received.attributes == {"reason": "why"}
    assert received.receive_count == 1
    assert received.sent_at == clock.now
    assert broker.ack([received]) == {}
    assert broker.receive("q", 10, 0) == []
    assert broker.stats("q") == QueueStats("q", 0, 0, 0)


def test_batches_keep_send_order(broker: SQLiteBroker) -> None:
    texts = [f"m{i}" for i in range(10)]
    ids = send_texts(broker, "q", texts)

    received = broker.receive("q", 10, 0)

    assert len(set(ids)) == 10
    assert [m.message_id for m in received] == ids
    assert [m.body for m in received] == texts
    assert broker.ack(received) == {}
    assert broker.stats("q").visible == 0


def test_batch_limits_are_sqs_limits(broker: SQLiteBroker) -> None:
    with pytest.raises(BrokerError):
        send_texts(broker, "q", ["x"] * 11)
    with pytest.raises(BrokerError):
        broker.send_batch("q", [])
    with pytest.raises(BrokerError):
        broker.receive("q", 11, 0)
    with pytest.raises(BrokerError):
        broker.send("q", OutgoingMessage("x", delay=901))
    assert broker.stats("q") == QueueStats("q", 0, 0, 0)


def test_body_over_the_limit_is_refused(tmp_path: Path) -> None:
    broker = SQLiteBroker(str(tmp_path / "b.db"), max_body_bytes=10)
    broker.ensure_queue("q")

    broker.send("q", OutgoingMessage("é" * 5))
    with pytest.raises(MessageTooLargeError) as error:
        broker.send("q", OutgoingMessage("é" * 6))

    assert (error.value.size, error.value.limit) == (12, 10)
    assert error.value.source == "the SQLite broker's limit"


def test_body_limit_is_the_queues_capped_by_the_brokers(tmp_path: Path) -> None:
    path = str(tmp_path / "b.db")
    broker = SQLiteBroker(path, max_body_bytes=4096)
    broker.ensure_queue("small", QueueSettings(max_body_bytes=2048, dead_letter_queue="dlq"))
    broker.ensure_queue("default")

    assert broker.body_limit("small") == BodyLimit(2048, "max_body_bytes of SQLite queue 'small'")
    assert broker.body_limit("dlq").bytes == 2048
    assert broker.body_limit("default") == BodyLimit(4096, "the SQLite broker's limit")
    missing = broker.body_limit("missing")
    assert missing.bytes == 4096 and "'missing' does not exist" in missing.source
    # Kept in the file: another broker object (another process) sees the same limits.
    assert SQLiteBroker(path).body_limit("small").bytes == 2048
    assert SQLiteBroker(path).body_limit("default").bytes == DEFAULT_MAX_BODY_BYTES


def test_size_counts_attributes(broker: SQLiteBroker) -> None:
    broker.ensure_queue("tight", QueueSettings(max_body_bytes=20))
    # 4 + "k" + "String" + 9 = 20; "n" + "Number" + "123456789" counts the same.
    broker.send("tight", OutgoingMessage("body", attributes={"k": "123456789"}))
    broker.send("tight", OutgoingMessage("body", attributes={"n": 123456789}))

    with pytest.raises(MessageTooLargeError) as error:
        broker.send("tight", OutgoingMessage("body", attributes={"k": "1234567890"}))

    assert (error.value.size, error.value.limit) == (21, 20)
    assert "'tight'" in error.value.source
    assert broker.stats("tight").visible == 2


def test_number_attributes_are_stored_as_text(broker: SQLiteBroker) -> None:
    broker.send("q", OutgoingMessage("x", attributes={"count": 3, "text": "3"}))

    [received] = broker.receive("q", 1, 0, metadata=False)

    assert received.attributes == {"count": "3", "text": "3"}


def test_group_id_on_a_standard_queue_is_kept(broker: SQLiteBroker) -> None:
    broker.send_batch("q", [OutgoingMessage("a", group_id="t1"), OutgoingMessage("b")])

    received = broker.receive("q", 10, 0, metadata=False)

    assert [(m.body, m.group_id, m.dedup_id) for m in received] == [
        ("a", "t1", None),
        ("b", None, None),
    ]


def test_a_schema_1_file_is_migrated(tmp_path: Path) -> None:
    path = str(tmp_path / "b.db")
    with sqlite3.connect(path) as conn:
        conn.executescript(_SCHEMA_1)
        conn.execute("INSERT INTO queues VALUES ('old', 30, NULL, 10, 0, 0)")
        conn.execute(
            "INSERT INTO messages (id, queue, body, visible_at, sent_at) "
            "VALUES ('m1', 'old', 'kept', 0, 0)"
        )
        conn.execute("PRAGMA user_version = 1")
    conn.close()
    broker = SQLiteBroker(path)

    with capture_logs() as logs:
        limit = broker.body_limit("old")

    assert limit == BodyLimit(DEFAULT_MAX_BODY_BYTES, "max_body_bytes of SQLite queue 'old'")
    assert [(e["event"], e.get("old")) for e in logs if e["log_level"] != "debug"] == [
        ("sqlite_schema_migrated", 1)
    ]
    assert [m.body for m in broker.receive("old", 1, 0)] == ["kept"]
    broker.ensure_queue("new", QueueSettings(max_body_bytes=2048))
    assert broker.body_limit("new").bytes == 2048
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


#: The tables of schema version 1 (ebsqs before per-queue size limits).
_SCHEMA_1 = """
CREATE TABLE queues (
    name TEXT PRIMARY KEY, visibility_timeout INTEGER NOT NULL, dead_letter_queue TEXT,
    max_receive_count INTEGER NOT NULL, fifo INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL);
CREATE TABLE messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, queue TEXT NOT NULL,
    body TEXT NOT NULL, attributes TEXT NOT NULL DEFAULT '{}', visible_at REAL NOT NULL,
    sent_at REAL NOT NULL, receive_count INTEGER NOT NULL DEFAULT 0, receipt TEXT,
    delayed INTEGER NOT NULL DEFAULT 0, group_id TEXT, dedup_id TEXT);
CREATE INDEX messages_ready ON messages (queue, visible_at, seq);
CREATE INDEX messages_group ON messages (queue, group_id, seq) WHERE group_id IS NOT NULL;
CREATE TABLE fifo_dedup (
    queue TEXT NOT NULL, dedup_id TEXT NOT NULL, message_id TEXT NOT NULL,
    expires_at REAL NOT NULL, PRIMARY KEY (queue, dedup_id));
"""


def test_received_message_is_invisible_until_its_timeout(
    broker: SQLiteBroker, clock: FakeClock
) -> None:
    broker.send("q", OutgoingMessage("x"))
    [first] = broker.receive("q", 1, 0)

    clock.advance(29)
    assert broker.receive("q", 1, 0) == []
    clock.advance(1)
    [again] = broker.receive("q", 1, 0)

    assert again.message_id == first.message_id
    assert again.receive_count == 2
    assert again.receipt != first.receipt


def test_receive_visibility_overrides_the_queue_default(
    broker: SQLiteBroker, clock: FakeClock
) -> None:
    broker.send("q", OutgoingMessage("x"))
    broker.receive("q", 1, 0, visibility_timeout=5)

    clock.advance(5)

    assert len(broker.receive("q", 1, 0)) == 1


def test_change_visibility_zero_releases_at_once(broker: SQLiteBroker) -> None:
    broker.send("q", OutgoingMessage("x"))
    [first] = broker.receive("q", 1, 0)

    assert broker.change_visibility([first], 0) == {}
    [again] = broker.receive("q", 1, 0)

    assert again.message_id == first.message_id
    assert again.receive_count == 2


def test_change_visibility_extends(broker: SQLiteBroker, clock: FakeClock) -> None:
    broker.send("q", OutgoingMessage("x"))
    [first] = broker.receive("q", 1, 0)

    assert broker.change_visibility([first], 120) == {}
    clock.advance(60)
    assert broker.receive("q", 1, 0) == []
    clock.advance(60)
    assert len(broker.receive("q", 1, 0)) == 1


def test_stale_receipt_fails_and_is_reported(broker: SQLiteBroker, clock: FakeClock) -> None:
    broker.send("q", OutgoingMessage("x"))
    [first] = broker.receive("q", 1, 0)
    clock.advance(30)
    [second] = broker.receive("q", 1, 0)

    assert broker.ack([first]) == {first.message_id: "receipt handle is no longer valid"}
    assert first.message_id in broker.change_visibility([first], 0)
    assert broker.ack([second]) == {}
    assert broker.ack([second]) == {second.message_id: "receipt handle is no longer valid"}


def test_ack_reports_each_failure_in_a_batch(broker: SQLiteBroker) -> None:
    send_texts(broker, "q", ["a", "b", "c"])
    received = broker.receive("q", 10, 0)
    forged = ReceivedMessage("q", received[1].message_id, "forged", "b")

    failed = broker.ack([received[0], forged, received[2]])

    assert failed == {forged.message_id: "receipt handle is no longer valid"}
    assert broker.stats("q").in_flight == 1
    assert broker.ack([]) == {}


def test_delay_with_an_injected_clock(broker: SQLiteBroker, clock: FakeClock) -> None:
    broker.send("q", OutgoingMessage("later", delay=60))
    broker.send("q", OutgoingMessage("now"))

    [now] = broker.receive("q", 10, 0)
    assert now.body == "now"
    assert broker.stats("q") == QueueStats("q", 0, 1, 1)
    broker.ack([now])
    clock.advance(59.9)
    assert broker.receive("q", 10, 0) == []
    clock.advance(0.1)
    assert [m.body for m in broker.receive("q", 10, 0)] == ["later"]


def test_redrive_to_the_dead_letter_queue(tmp_path: Path, clock: FakeClock) -> None:
    broker = SQLiteBroker(str(tmp_path / "b.db"), clock=clock)
    broker.ensure_queue("work", QueueSettings(dead_letter_queue="work-dlq", max_receive_count=2))
    message_id = broker.send("work", OutgoingMessage("poison", attributes={"k": "v"}))
    for count in (1, 2):
        [received] = broker.receive("work", 1, 0)
        assert received.receive_count == count
        broker.change_visibility([received], 0)

    with capture_logs() as logs:
        assert broker.receive("work", 1, 0) == []

    [dead] = broker.receive("work-dlq", 1, 0)
    assert (dead.message_id, dead.body, dead.attributes) == (message_id, "poison", {"k": "v"})
    assert broker.stats("work") == QueueStats("work", 0, 0, 0)
    assert [e["event"] for e in logs] == ["message_redriven"]
    assert logs[0]["dead_letter_queue"] == "work-dlq"


def test_redrive_does_not_use_up_the_receive(tmp_path: Path, clock: FakeClock) -> None:
    broker = SQLiteBroker(str(tmp_path / "b.db"), clock=clock)
    broker.ensure_queue("work", QueueSettings(dead_letter_queue="dlq", max_receive_count=1))
    send_texts(broker, "work", ["p1", "p2"])
    broker.change_visibility(broker.receive("work", 2, 0), 0)
    send_texts(broker, "work", ["ok1", "ok2"])

    received = broker.receive("work", 2, 0)

    assert [m.body for m in received] == ["ok1", "ok2"]
    assert broker.stats("dlq").visible == 2


def test_redrive_to_a_deleted_dead_letter_queue_drops(tmp_path: Path, clock: FakeClock) -> None:
    broker = SQLiteBroker(str(tmp_path / "b.db"), clock=clock)
    broker.ensure_queue("work", QueueSettings(dead_letter_queue="dlq", max_receive_count=1))
    broker.send("work", OutgoingMessage("poison"))
    broker.change_visibility(broker.receive("work", 1, 0), 0)
    broker.delete_queue("dlq")

    with capture_logs() as logs:
        assert broker.receive("work", 1, 0) == []

    assert broker.stats("work") == QueueStats("work", 0, 0, 0)
    assert [e["event"] for e in logs] == ["message_dropped"]


def test_stats_counts_visible_in_flight_and_delayed(broker: SQLiteBroker) -> None:
    send_texts(broker, "q", ["a", "b", "c"])
    broker.send("q", OutgoingMessage("d", delay=10))
    broker.receive("q", 1, 0)

    assert broker.stats("q") == QueueStats("q", visible=2, in_flight=1, delayed=1)


def test_purge_deletes_every_message(broker: SQLiteBroker) -> None:
    send_texts(broker, "q", ["a", "b"])
    broker.send("q", OutgoingMessage("c", delay=10))
    broker.receive("q", 1, 0)

    broker.purge("q")

    assert broker.stats("q") == QueueStats("q", 0, 0, 0)
    assert broker.list_queues() == ["q"]


def test_missing_queue(broker: SQLiteBroker) -> None:
    for call in (
        lambda: broker.send("nope", OutgoingMessage("x")),
        lambda: broker.receive("nope", 1, 0),
        lambda: broker.stats("nope"),
        lambda: broker.purge("nope"),
        lambda: broker.delete_queue("nope"),
    ):
        with pytest.raises(QueueDoesNotExist) as info:
            call()
        assert info.value.queue == "nope"
    stray = ReceivedMessage("nope", "id", "receipt", "body")
    assert broker.ack([stray]) == {"id": "receipt handle is no longer valid"}


def test_queues_are_listed_by_prefix_and_deleted(broker: SQLiteBroker) -> None:
    broker.ensure_queue("app-a", QueueSettings(dead_letter_queue="app-a-dlq"))
    broker.ensure_queue("app-b")
    broker.send("app-b", OutgoingMessage("x"))

    assert broker.list_queues("app-") == ["app-a", "app-a-dlq", "app-b"]
    assert broker.list_queues("app_") == []
    broker.delete_queue("app-b")
    assert broker.list_queues("app-") == ["app-a", "app-a-dlq"]
    broker.ensure_queue("app-b")
    assert broker.stats("app-b") == QueueStats("app-b", 0, 0, 0)


def test_ensure_queue_keeps_an_existing_queue(broker: SQLiteBroker, clock: FakeClock) -> None:
    broker.ensure_queue("q", QueueSettings(visibility_timeout=1))
    broker.send("q", OutgoingMessage("x"))
    broker.receive("q", 1, 0)

    clock.advance(1)

    assert broker.receive("q", 1, 0) == []


# -- files, schema, connections ----------------------------------------------------------------


def test_messages_survive_a_new_broker_object(tmp_path: Path) -> None:
    path = str(tmp_path / "deep" / "er" / "b.db")
    first = SQLiteBroker(path)
    first.ensure_queue("q")
    first.send("q", OutgoingMessage("kept"))
    first.close()

    second = SQLiteBroker(path)

    assert [m.body for m in second.receive("q", 1, 0)] == ["kept"]
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_close_then_use_reopens(broker: SQLiteBroker) -> None:
    broker.send("q", OutgoingMessage("x"))
    broker.close()

    assert len(broker.receive("q", 1, 0)) == 1


def test_unopenable_path_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    path = str(tmp_path / "file" / "b.db")

    with pytest.raises(ConfigurationError, match=r"file/b\.db"):
        SQLiteBroker(path).list_queues()


def test_a_file_that_is_not_a_database_is_damaged(tmp_path: Path) -> None:
    path = boot_damage.not_a_database(tmp_path / "b.db")
    before = path.read_bytes()

    with pytest.raises(BrokerDamaged, match="not a database") as raised:
        SQLiteBroker(str(path)).stats("q")

    # A configuration error (a boot failure at start) that names the file and what to do.
    assert isinstance(raised.value, ConfigurationError)
    assert str(path) in str(raised.value) and "backup" in str(raised.value)
    assert isinstance(raised.value.__cause__, sqlite3.DatabaseError)
    assert path.read_bytes() == before  # nothing was written over it


@pytest.mark.parametrize(
    "call",
    [
        lambda b: b.stats("q"),
        lambda b: b.receive("q", 10, 0),
        lambda b: b.send("q", OutgoingMessage("x")),
    ],
    ids=["stats", "receive", "send"],
)
def test_a_malformed_file_is_damaged_in_every_call(tmp_path: Path, call: Any) -> None:
    path = boot_damage.malformed(tmp_path / "b.db")
    broker = SQLiteBroker(str(path))

    with pytest.raises(BrokerDamaged, match="malformed") as raised:
        call(broker)

    # Met after start, it is a broker error like any other: the worker loop backs off.
    assert isinstance(raised.value, BrokerError)
    assert isinstance(raised.value, ConfigurationError)
    assert str(path) in str(raised.value)
    broker.close()


def test_locked_is_not_damaged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A busy database is a passing state, never a reason to stop for good."""
    path = str(tmp_path / "b.db")
    creator = SQLiteBroker(path)
    creator.ensure_queue("q")
    creator.close()
    monkeypatch.setattr("ebsqs.brokers.sqlite.BUSY_TIMEOUT_SECONDS", 0.05)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    broker = SQLiteBroker(path)
    try:
        with pytest.raises(BrokerError) as raised:
            broker.send("q", OutgoingMessage("x"))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        broker.close()

    assert not isinstance(raised.value, BrokerDamaged | ConfigurationError)


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "b.db")
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")

    with pytest.raises(ConfigurationError, match="newer"):
        SQLiteBroker(path).list_queues()


def test_each_thread_has_its_own_connection(broker: SQLiteBroker) -> None:
    seen: list[sqlite3.Connection] = []

    def grab() -> None:
        seen.append(broker._connection())

    threads = [threading.Thread(target=grab) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len({id(conn) for conn in [*seen, broker._connection()]}) == 4


def test_threads_receive_each_message_once(broker: SQLiteBroker) -> None:
    sent = set()
    for start in range(0, 200, 10):
        sent.update(send_texts(broker, "q", [str(i) for i in range(start, start + 10)]))
    got: list[str] = []

    def consume() -> None:
        while batch := broker.receive("q", 10, 0):
            assert broker.ack(batch) == {}
            got.extend(m.message_id for m in batch)

    threads = [threading.Thread(target=consume) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(got) == sorted(sent)


def test_long_poll_returns_when_a_message_arrives(tmp_path: Path) -> None:
    broker = SQLiteBroker(str(tmp_path / "b.db"))
    broker.ensure_queue("q")
    result: list[list[ReceivedMessage]] = []
    waiter = threading.Thread(target=lambda: result.append(broker.receive("q", 1, 10)))
    started = time.monotonic()
    waiter.start()

    broker.send("q", OutgoingMessage("wake"))
    waiter.join(timeout=10)

    assert [m.body for m in result[0]] == ["wake"]
    assert time.monotonic() - started < 5


def test_long_poll_gives_up_after_the_wait(tmp_path: Path) -> None:
    broker = SQLiteBroker(str(tmp_path / "b.db"))
    broker.ensure_queue("q")
    started = time.monotonic()

    assert broker.receive("q", 1, 0.2) == []
    assert 0.2 <= time.monotonic() - started < 2


# -- FIFO --------------------------------------------------------------------------------------


def fifo(body: str, group: str, dedup: str | None = None) -> OutgoingMessage:
    return OutgoingMessage(body, group_id=group, dedup_id=dedup)


def test_fifo_delivers_a_group_in_order_one_at_a_time(broker: SQLiteBroker) -> None:
    broker.ensure_queue("jobs.fifo", QueueSettings(fifo=True))
    broker.send_batch("jobs.fifo", [fifo("a1", "a"), fifo("a2", "a"), fifo("b1", "b")])

    first = broker.receive("jobs.fifo", 10, 0)
    assert [m.body for m in first] == ["a1", "b1"]
    assert broker.receive("jobs.fifo", 10, 0) == []
    broker.change_visibility([first[0]], 0)
    [retry] = broker.receive("jobs.fifo", 10, 0)
    assert retry.body == "a1"
    broker.ack([retry])
    assert [m.body for m in broker.receive("jobs.fifo", 10, 0)] == ["a2"]


def test_fifo_deduplicates_within_the_window(broker: SQLiteBroker, clock: FakeClock) -> None:
    broker.ensure_queue("jobs.fifo", QueueSettings(fifo=True))
    first = broker.send("jobs.fifo", fifo("x", "g", dedup="d1"))

    clock.advance(DEDUP_WINDOW_SECONDS - 1)
    assert broker.send("jobs.fifo", fifo("y", "g", dedup="d1")) == first
    assert broker.stats("jobs.fifo").visible == 1
    clock.advance(1)  # the window counts from the first send, not from the duplicate
    assert broker.send("jobs.fifo", fifo("x", "g", dedup="d1")) != first
    assert broker.stats("jobs.fifo").visible == 2


def test_fifo_deduplicates_within_a_batch(broker: SQLiteBroker) -> None:
    broker.ensure_queue("jobs.fifo", QueueSettings(fifo=True))

    ids = broker.send_batch("jobs.fifo", [fifo("a", "g", "d"), fifo("b", "g", "d")])

    assert ids[0] == ids[1]
    [received] = broker.receive("jobs.fifo", 10, 0)
    assert (received.body, received.group_id, received.dedup_id) == ("a", "g", "d")


def test_fifo_without_dedup_id_deduplicates_on_the_body(
    broker: SQLiteBroker, clock: FakeClock
) -> None:
    broker.ensure_queue("jobs.fifo", QueueSettings(fifo=True))
    first = broker.send("jobs.fifo", fifo("same", "g"))

    assert broker.send("jobs.fifo", fifo("same", "other-group")) == first
    other = broker.send("jobs.fifo", fifo("different", "g"))
    clock.advance(DEDUP_WINDOW_SECONDS)
    later = broker.send("jobs.fifo", fifo("same", "g"))

    assert len({first, other, later}) == 3
    [received] = broker.receive("jobs.fifo", 10, 0)
    assert received.dedup_id == hashlib.sha256(b"same").hexdigest()


def test_fifo_redrive_of_a_group_head_releases_the_next(tmp_path: Path) -> None:
    broker = SQLiteBroker(str(tmp_path / "b.db"))
    broker.ensure_queue(
        "jobs.fifo", QueueSettings(fifo=True, dead_letter_queue="dlq.fifo", max_receive_count=1)
    )
    broker.send_batch("jobs.fifo", [fifo("a1", "a", "1"), fifo("a2", "a", "2")])
    broker.change_visibility(broker.receive("jobs.fifo", 10, 0), 0)

    [received] = broker.receive("jobs.fifo", 10, 0)

    assert received.body == "a2"
    [dead] = broker.receive("dlq.fifo", 10, 0)
    assert (dead.body, dead.group_id) == ("a1", "a")


def test_fifo_rules(broker: SQLiteBroker) -> None:
    with pytest.raises(ConfigurationError, match=r"\.fifo"):
        broker.ensure_queue("jobs", QueueSettings(fifo=True))
    with pytest.raises(ConfigurationError, match=r"\.fifo"):
        broker.ensure_queue("jobs.fifo", QueueSettings(fifo=False))
    with pytest.raises(ConfigurationError, match=r"\.fifo"):
        broker.ensure_queue("jobs.fifo", QueueSettings(fifo=True, dead_letter_queue="dlq"))
    broker.ensure_queue("jobs.fifo", QueueSettings(fifo=True))
    with pytest.raises(BrokerError, match="group_id"):
        broker.send("jobs.fifo", OutgoingMessage("x"))
    with pytest.raises(BrokerError, match="FIFO queues take no per-message delay"):
        broker.send("jobs.fifo", OutgoingMessage("x", delay=5, group_id="g"))
    assert broker.list_queues("jobs") == ["jobs.fifo"]
    assert broker.stats("jobs.fifo").visible == 0


# -- fork ----------------------------------------------------------------------------------------


def _consume_in_child(broker: SQLiteBroker, done: Any, out: Connection) -> None:
    """Runs in a forked child: receive and ack until the parent is done and the queue empty."""
    try:
        ids: list[str] = []
        while True:
            finished = done.is_set()
            batch = broker.receive("q", 10, 0.05)
            if batch:
                failed = broker.ack(batch)
                assert not failed, failed
                ids.extend(m.message_id for m in batch)
            elif finished:
                break
        out.send(("ok", ids))
    except BaseException as exc:  # noqa: BLE001 - a child reports any failure to the parent
        out.send(("error", repr(exc)))
    finally:
        broker.close()


@pytest.mark.timeout(60)
def test_forked_children_receive_every_message_exactly_once(tmp_path: Path) -> None:
    broker = SQLiteBroker(str(tmp_path / "b.db"))
    broker.ensure_queue("q", QueueSettings(visibility_timeout=600))
    broker.send("q", OutgoingMessage("before the fork"))
    [early] = broker.receive("q", 1, 0)
    broker.ack([early])
    done = FORK.Event()
    pipes = [FORK.Pipe(duplex=False) for _ in range(4)]
    children = [
        FORK.Process(target=_consume_in_child, args=(broker, done, writer)) for _, writer in pipes
    ]
    for child in children:
        child.start()

    sent: list[str] = []
    for start in range(0, 400, 10):
        sent += send_texts(broker, "q", [f"m{i}" for i in range(start, start + 10)])
    done.set()
    results = []
    for reader, _ in pipes:
        assert reader.poll(45), "a child reported nothing"
        results.append(reader.recv())
    for child in children:
        child.join(10)

    assert [status for status, _ in results] == ["ok"] * 4, results
    received = [message_id for _, ids in results for message_id in ids]
    assert len(received) == 400
    assert sorted(received) == sorted(sent)
    assert [child.exitcode for child in children] == [0] * 4
    assert broker.stats("q") == QueueStats("q", 0, 0, 0)


def _check_connection_in_child(broker: SQLiteBroker, out: Connection) -> None:
    """Runs in a forked child: report whether it got a connection of its own."""
    try:
        inherited = broker._local.conn
        own = broker._connection()
        try:
            inherited.execute("SELECT 1")
            inherited_closed = False
        except sqlite3.ProgrammingError:
            inherited_closed = True
        broker.send("q", OutgoingMessage("from the child"))
        out.send((own is not inherited, inherited_closed))
    except BaseException as exc:  # noqa: BLE001 - a child reports any failure to the parent
        out.send(repr(exc))


def test_child_does_not_reuse_the_parents_connection(tmp_path: Path) -> None:
    broker = SQLiteBroker(str(tmp_path / "b.db"))
    broker.ensure_queue("q")
    parent_conn = broker._connection()
    reader, writer = FORK.Pipe(duplex=False)
    child = FORK.Process(target=_check_connection_in_child, args=(broker, writer))
    child.start()

    assert reader.poll(20)
    report = reader.recv()
    child.join(10)

    assert report == (True, True)
    # The child closed its copy of the parent's connection; the parent's own still works.
    assert broker._connection() is parent_conn
    assert [m.body for m in broker.receive("q", 1, 0)] == ["from the child"]


def test_parent_closing_its_connection_keeps_the_childs_writes(tmp_path: Path) -> None:
    # Regression: a child that ignored (instead of closing) its inherited connection ran without
    # real file locks, so the parent's close checkpointed and deleted the WAL under it.
    path = str(tmp_path / "b.db")
    broker = SQLiteBroker(path)
    broker.ensure_queue("q")
    parent_closed = FORK.Event()
    reader, writer = FORK.Pipe(duplex=False)
    child = FORK.Process(
        target=_inherit_and_write, args=(broker, parent_closed, writer), daemon=True
    )
    child.start()

    assert reader.poll(20) and reader.recv() == "sent"
    broker.close()
    parent_closed.set()
    assert reader.poll(20) and reader.recv() == "sent"
    child.join(10)

    assert sorted(m.body for m in SQLiteBroker(path).receive("q", 10, 0)) == ["after", "before"]


def _inherit_and_write(broker: SQLiteBroker, parent_closed: Any, out: Connection) -> None:
    """Runs in a forked child: use the inherited broker object around the parent's close."""
    try:
        broker.send("q", OutgoingMessage("before"))
        out.send("sent")
        assert parent_closed.wait(20)
        broker.send("q", OutgoingMessage("after"))
        out.send("sent")
    except BaseException as exc:  # noqa: BLE001 - a child reports any failure to the parent
        out.send(repr(exc))

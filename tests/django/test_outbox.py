"""The durable outbox in-process: rows in the sender's transaction, the relay's batches, delays,
FIFO groups and dedup ids, failures, the lease, SKIP LOCKED, the wake-up, checks and commands.

The memory broker stands for SQS here (the relay sends through the same ``send_messages`` as the
producer); the fault suite (``tests/faults/test_outbox_faults.py``) runs it on fauxqs.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connections, transaction
from django.test import override_settings
from structlog.testing import capture_logs

from ebsqs.brokers import OutgoingMessage
from ebsqs.brokers.memory import MemoryBroker
from ebsqs.config import load_settings
from ebsqs.contrib.django import outbox
from ebsqs.contrib.django.checks import check_outbox
from ebsqs.contrib.django.models import OutboxLease, OutboxMessage
from ebsqs.envelope import decode
from ebsqs.errors import BrokerError, PartialBatchError
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(30)

BROKER = "memory://outbox"


class Rollback(Exception):
    pass


class Recording:
    """The memory broker, with every ``send_batch`` recorded (and failures on demand)."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        self.batches: list[tuple[str, list[OutgoingMessage]]] = []
        self.fail_bodies: set[str] = set()  # entries refused, one by one
        self.down = False  # every call refused
        self.entered = threading.Event()
        self.release: threading.Event | None = None  # hold the first send until set

    def __getattr__(self, name: str) -> Any:
        return getattr(self.broker, name)

    def send_batch(self, queue: str, messages: Sequence[OutgoingMessage]) -> list[str]:
        self.entered.set()
        if self.release is not None:
            assert self.release.wait(10)
        if self.down:
            raise BrokerError("SQS is unreachable (test)")
        failed = {i: "refused (test)" for i, m in enumerate(messages) if m.body in self.fail_bodies}
        good = [m for m in messages if m.body not in self.fail_bodies]
        ids = self.broker.send_batch(queue, good) if good else []  # may create the queue first
        self.batches.append((queue, good))
        if failed:
            it = iter(ids)
            succeeded = {i: next(it) for i in range(len(messages)) if i not in failed}
            raise PartialBatchError("send (test)", failed=failed, succeeded=succeeded)
        return ids


def waiting(queue: str) -> list[dict[str, Any]]:
    """Bodies visible on the test broker's ``queue``, left there."""
    broker = MemoryBroker.named("outbox")
    if queue not in broker.list_queues(queue):
        return []
    taken = []
    while batch := broker.receive(queue, 10, wait_seconds=0, visibility_timeout=60):
        taken += batch
    broker.change_visibility(taken, 0)
    return [json.loads(m.body) for m in taken]


def rows(alias: str) -> list[OutboxMessage]:
    return list(OutboxMessage.objects.using(alias).order_by("id"))


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    MemoryBroker.reset()
    yield
    for alias in connections:
        OutboxMessage.objects.using(alias).all().delete()
        OutboxLease.objects.using(alias).all().delete()
    MemoryBroker.reset()


@pytest.fixture
def outbox_on(db_alias: str) -> Iterator[str]:
    """The outbox on, on each database in turn; returns its alias."""
    ebsqs = {"broker_url": BROKER, "outbox": True, "outbox_database": db_alias}
    with override_settings(EBSQS=ebsqs):
        yield db_alias


@pytest.fixture
def recording() -> Recording:
    return Recording(MemoryBroker.named("outbox"))


def relay_for(alias: str, broker: Recording, **kwargs: Any) -> outbox.Relay:
    return outbox.Relay(load_settings(), alias, broker=broker, max_backoff=60, **kwargs)  # type: ignore[arg-type]


# -- the sending side --------------------------------------------------------------------------


def test_delay_inside_a_transaction_writes_rows_in_it_and_sends_nothing(outbox_on: str) -> None:
    from shop.tasks import record

    with transaction.atomic(using=outbox_on):
        first = record.delay("one")
        second = record.delay_on_commit("two")  # at once too: no waiting for the commit
        inside = [(r.task_id, r.queue) for r in rows(outbox_on)]
        assert inside == [(first, "a"), (second, "a")]
    assert waiting("a") == []
    kept = rows(outbox_on)
    assert [decode(r.body).id for r in kept] == [first, second]
    assert [decode(r.body).args for r in kept] == [("one",), ("two",)]


def test_a_rollback_takes_the_rows_away(outbox_on: str) -> None:
    from shop.tasks import record

    with pytest.raises(Rollback), transaction.atomic(using=outbox_on):
        record.delay("never")
        record.delay_on_commit("never either")
        raise Rollback
    assert rows(outbox_on) == []
    assert waiting("a") == []


def test_outside_a_transaction_the_send_goes_at_once(outbox_on: str) -> None:
    from shop.tasks import record

    task_id = record.delay("now")
    assert rows(outbox_on) == []
    assert [b["id"] for b in waiting("a")] == [task_id]


def test_with_the_outbox_off_nothing_is_kept() -> None:
    from shop.tasks import record

    with override_settings(EBSQS={"broker_url": BROKER}):
        with transaction.atomic():
            task_id = record.delay("plain")
        assert rows("default") == []
        assert [b["id"] for b in waiting("a")] == [task_id]


# -- the relay ---------------------------------------------------------------------------------


def test_relay_sends_in_batches_of_ten_in_order_and_deletes_what_it_sent(
    outbox_on: str, recording: Recording
) -> None:
    from shop.tasks import record

    with transaction.atomic(using=outbox_on):
        ids = record.delay_many([(f"k{i}",) for i in range(25)])
    result = relay_for(outbox_on, recording).drain()

    assert (result.sent, result.failed) == (25, 0)
    assert [len(batch) for _, batch in recording.batches] == [10, 10, 5]
    assert [decode(m.body).id for _, batch in recording.batches for m in batch] == ids
    assert rows(outbox_on) == []
    assert sorted(b["id"] for b in waiting("a")) == sorted(ids)


def test_a_delayed_message_keeps_its_due_time_however_long_it_waited(
    outbox_on: str, recording: Recording
) -> None:
    from shop.tasks import record

    with transaction.atomic(using=outbox_on):
        short = record.send_with(delay=120).delay("short")
        long = record.send_with(delay=7200).delay("long")
    kept = {r.task_id: r for r in rows(outbox_on)}
    assert kept[short].due_at == pytest.approx(kept[short].created_at + 120, abs=1)

    later = time.time() + 50  # the relay sends 50 seconds late
    relay_for(outbox_on, recording, clock=lambda: later).drain()
    sent = {decode(m.body).id: m for _, batch in recording.batches for m in batch}
    assert 68 <= sent[short].delay <= 71  # what was left of the 120 s, not 120 again
    # Past SQS's 15 minutes the body carries the due time and the message hops: its first hop
    # too ends when it would have, 900 s after the call.
    assert 848 <= sent[long].delay <= 851
    assert decode(sent[long].body).due == pytest.approx(kept[long].created_at + 7200, abs=1)


def test_fifo_rows_keep_group_and_dedup_id_and_a_resend_is_identical(
    outbox_on: str, recording: Recording
) -> None:
    from shop.tasks import record

    with transaction.atomic(using=outbox_on):
        a = record.send_with(queue_name="ordered.fifo", group_id="g1").delay("a")
        b = record.send_with(
            queue_name="ordered.fifo", group_id="g2", deduplication_id="order-7"
        ).delay("b")
    kept = rows(outbox_on)
    assert [(r.fifo, r.group_id, r.dedup_id) for r in kept] == [
        (True, "g1", a),
        (True, "g2", "order-7"),
    ]
    # What a crashed relay's successor would send is what it sent: same body, group and id.
    now = time.time()
    assert [outbox.outgoing_of(r, now) for r in kept] == [
        outbox.outgoing_of(r, now + 30) for r in kept
    ]

    relay_for(outbox_on, recording).drain()
    [(queue, batch)] = recording.batches
    assert queue == "ordered.fifo"
    assert [(m.group_id, m.dedup_id, m.delay) for m in batch] == [
        ("g1", a, 0),
        ("g2", "order-7", 0),
    ]
    assert [decode(m.body).id for m in batch] == [a, b]


def test_a_failed_send_keeps_the_row_with_its_error_and_a_backoff(
    outbox_on: str, recording: Recording
) -> None:
    from shop.tasks import record

    with transaction.atomic(using=outbox_on):
        ids = record.delay_many([("ok1",), ("bad",), ("ok2",)])
    bad = rows(outbox_on)[1]
    recording.fail_bodies.add(bad.body)
    before = time.time()
    result = relay_for(outbox_on, recording).drain()

    assert (result.sent, result.failed) == (2, 1)
    [kept] = rows(outbox_on)
    assert kept.task_id == ids[1]
    assert kept.attempts == 1
    assert "refused (test)" in kept.last_error and ids[1] in kept.last_error
    assert before <= kept.next_attempt_at <= time.time() + 1  # jitter: within the first bound
    assert sorted(b["id"] for b in waiting("a")) == sorted([ids[0], ids[2]])


def test_sqs_down_keeps_every_row_then_they_drain(outbox_on: str, recording: Recording) -> None:
    from shop.tasks import record

    with transaction.atomic(using=outbox_on):
        ids = record.delay_many([(f"k{i}",) for i in range(3)])
    recording.down = True
    result = relay_for(outbox_on, recording).drain()
    assert (result.sent, result.failed) == (0, 3)
    assert {r.attempts for r in rows(outbox_on)} == {1}
    assert all("unreachable" in r.last_error for r in rows(outbox_on))

    recording.down = False
    later = time.time() + 61  # past the longest backoff
    assert relay_for(outbox_on, recording, clock=lambda: later).drain().sent == 3
    assert rows(outbox_on) == []
    assert sorted(b["id"] for b in waiting("a")) == sorted(ids)


def test_a_relay_whose_clock_is_behind_the_web_hosts_still_sends_new_rows(
    outbox_on: str, recording: Recording
) -> None:
    from shop.tasks import record

    with transaction.atomic(using=outbox_on):
        task_id = record.delay("skewed")
    behind = time.time() - 300
    assert relay_for(outbox_on, recording, clock=lambda: behind).drain().sent == 1
    assert [b["id"] for b in waiting("a")] == [task_id]


def test_a_failed_fifo_row_holds_back_its_group_only(outbox_on: str, recording: Recording) -> None:
    from shop.tasks import record

    def fifo(group: str) -> Any:
        return record.send_with(queue_name="ordered.fifo", group_id=group)

    with transaction.atomic(using=outbox_on):
        g1 = [fifo("g1").delay(f"g1-{i}") for i in range(2)]
        g2 = fifo("g2").delay("g2-0")
    recording.fail_bodies.add(rows(outbox_on)[0].body)  # g1's first
    relay_for(outbox_on, recording).drain()
    assert {r.task_id for r in rows(outbox_on)} == {g1[0]}  # g1-1 went in the same batch

    # A newer row of g1 waits behind the failed one; g2's does not.
    with transaction.atomic(using=outbox_on):
        g1_late = fifo("g1").delay("g1-late")
        g2_late = fifo("g2").delay("g2-late")
    recording.batches.clear()
    relay_for(outbox_on, recording).drain()
    assert [decode(m.body).id for _, b in recording.batches for m in b] == [g2_late]
    assert {r.task_id for r in rows(outbox_on)} == {g1[0], g1_late}

    recording.fail_bodies.clear()
    recording.batches.clear()
    later = time.time() + 61
    relay_for(outbox_on, recording, clock=lambda: later).drain()
    assert [decode(m.body).id for _, b in recording.batches for m in b] == [g1[0], g1_late]
    assert g2 not in {r.task_id for r in rows(outbox_on)}


def test_on_sqlite_one_relay_holds_the_lease_until_it_expires(recording: Recording) -> None:
    from shop.tasks import record

    with override_settings(EBSQS={"broker_url": BROKER, "outbox": True}):
        with transaction.atomic():
            record.delay("x")
        ahead = [0.0]  # seconds the relays' clock is ahead

        def clock() -> float:
            return time.time() + ahead[0]

        first = relay_for("default", recording, holder="one", clock=clock)
        second = relay_for("default", recording, holder="two", clock=clock)
        assert first.relay_once().sent == 1
        with transaction.atomic():
            record.delay("y")
        assert second.relay_once().leased_elsewhere
        assert len(rows("default")) == 1
        ahead[0] = outbox.LEASE_SECONDS + 1  # the first relay died: its lease runs out
        assert second.relay_once().sent == 1
        with transaction.atomic():
            record.delay("z")
        assert first.relay_once().leased_elsewhere  # back, it finds the lease taken


def test_on_postgres_two_relays_at_once_never_claim_the_same_row(
    pg_alias: str, recording: Recording
) -> None:
    from shop.tasks import record

    with override_settings(
        EBSQS={"broker_url": BROKER, "outbox": True, "outbox_database": pg_alias}
    ):
        with transaction.atomic(using=pg_alias):
            ids = record.delay_many([(f"k{i}",) for i in range(15)])
        held = Recording(recording.broker)
        held.release = threading.Event()
        first = relay_for(pg_alias, held)
        results: list[outbox.PassResult] = []

        def relay_in_thread() -> None:
            try:
                results.append(first.relay_once())
            finally:
                connections[pg_alias].close()

        thread = threading.Thread(target=relay_in_thread)
        thread.start()
        assert held.entered.wait(10)  # the first relay holds its ten rows, mid-send
        second = relay_for(pg_alias, recording).relay_once()
        held.release.set()
        thread.join(10)

    assert (results[0].sent, second.sent) == (10, 5)
    sent = [decode(m.body).id for r in (held, recording) for _, b in r.batches for m in b]
    assert sorted(sent) == sorted(ids)  # every row once, none twice
    assert rows(pg_alias) == []


def test_on_postgres_a_commit_wakes_the_relay_at_once(pg_alias: str) -> None:
    from shop.tasks import record

    with override_settings(
        EBSQS={"broker_url": BROKER, "outbox": True, "outbox_database": pg_alias}
    ):
        waker = outbox.Waker(pg_alias, poll_interval=20)
        woke: list[float] = []

        def wait_in_thread() -> None:
            try:
                waker.wait()  # connects and listens, then waits
                woke.append(time.monotonic())
            finally:
                connections[pg_alias].close()

        try:
            waker.listen()  # listening before the commit, as a relay is
            thread = threading.Thread(target=wait_in_thread)
            thread.start()
            with transaction.atomic(using=pg_alias):
                record.delay("wake")
                committed = time.monotonic()
            thread.join(10)
            assert woke, "the waker did not return"
            assert woke[0] - committed < 1.0  # the notification, not the 20-second poll
        finally:
            waker.close()


def test_on_postgres_a_lost_listener_is_noticed_and_made_again(pg_alias: str) -> None:
    with override_settings(EBSQS={"outbox": True, "outbox_database": pg_alias}):
        waker = outbox.Waker(pg_alias, poll_interval=20)
        try:
            first = waker.listen()
            with connections[pg_alias].cursor() as cursor:  # the server ends its session
                cursor.execute("SELECT pg_terminate_backend(%s)", [first.info.backend_pid])
            started = time.monotonic()
            # The server's goodbye, then the end of the connection, each make the socket
            # readable (no 20-second waits): the end is noticed by the second wait at the latest.
            for _ in range(2):
                waker.wait()
                if waker.listener is None:
                    break
            assert time.monotonic() - started < 5
            assert waker.listener is None
            again = waker.listen()
            assert again is not None and again.info.backend_pid != first.info.backend_pid
        finally:
            waker.close()
            connections[pg_alias].close()


def test_on_psycopg2_the_relay_polls(pg_alias: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` fails
    waker = outbox.Waker(pg_alias, poll_interval=0.05)
    try:
        with capture_logs() as logs:
            assert waker.listen() is None
            waker.wait()  # the poll interval alone
            waker.wait()
        assert [e["event"] for e in logs] == ["outbox_listen_unavailable"]  # said once
    finally:
        waker.close()


def test_run_relay_makes_a_last_pass_when_stopped(outbox_on: str, recording: Recording) -> None:
    from shop.tasks import record

    relay = relay_for(outbox_on, recording)
    waker = outbox.Waker(outbox_on, poll_interval=30)
    stop = threading.Event()

    def run() -> None:
        try:
            outbox.run_relay(relay, waker, stop)
        finally:
            connections[outbox_on].close()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        with transaction.atomic(using=outbox_on):
            task_id = record.delay("last")
        if outbox_on != "postgres":  # no notification elsewhere: the stop's pass sends it
            stop.set()
            waker.nudge()
        wait_until(lambda: waiting("a"), 10, message="nothing relayed")
        assert [b["id"] for b in waiting("a")] == [task_id]
    finally:
        stop.set()
        waker.nudge()
        thread.join(10)
        waker.close()
    assert not thread.is_alive()
    assert rows(outbox_on) == []


def test_a_fork_leaves_the_relay_threads_connections_to_the_master(
    pg_alias: str, recording: Recording
) -> None:
    from shop.tasks import record

    ebsqs = {"broker_url": BROKER, "outbox": True, "outbox_database": pg_alias}
    with override_settings(EBSQS=ebsqs):
        service = outbox.RelayService(load_settings(), outbox.outbox_options())
        service.relay.broker = recording  # type: ignore[assignment]
        service.on_ready(None)  # type: ignore[arg-type] - the thread starts, connects, listens

        def connected() -> bool:
            raw = getattr(service.relay.connection, "connection", None)
            return raw is not None and service.waker is not None and bool(service.waker.listener)

        wait_until(connected, 10, message="the relay did not connect")
        assert service.relay.connection is not None and service.waker is not None
        fds = [service.relay.connection.connection.fileno(), service.waker.listener.fileno()]
        try:
            pid = os.fork()
            if pid == 0:  # the child: its copies of the sockets now lead to /dev/null
                ok = all(os.readlink(f"/proc/self/fd/{fd}") == os.devnull for fd in fds)
                os._exit(0 if ok else 1)
            assert os.waitpid(pid, 0)[1] == 0
            # The master's connections still work: a commit wakes the relay, which sends.
            with transaction.atomic(using=pg_alias):
                task_id = record.delay("after the fork")
            wait_until(lambda: waiting("a"), 10, message="nothing relayed after the fork")
            assert [b["id"] for b in waiting("a")] == [task_id]
        finally:
            service.on_stopping(None, graceful=True)  # type: ignore[arg-type]
            service.on_stopped(None, 0)  # type: ignore[arg-type]
        assert service._thread is not None and not service._thread.is_alive()


# -- settings, checks, commands, the supervisor's list -----------------------------------------


def test_check_warns_when_the_table_is_missing_and_errors_on_a_bad_alias() -> None:
    assert check_outbox() == []  # off
    for wrong in ({"outbox_database": "nope"}, {"outbox_max_backoff": None}):
        with override_settings(EBSQS={"outbox": True, **wrong}):
            assert [m.id for m in check_outbox()] == ["ebsqs.E004"]
    with override_settings(EBSQS={"outbox": True}):
        assert check_outbox() == []
        with connections["default"].schema_editor() as editor:
            editor.delete_model(OutboxMessage)
        try:
            assert [m.id for m in check_outbox()] == ["ebsqs.W005"]
        finally:
            with connections["default"].schema_editor() as editor:
                editor.create_model(OutboxMessage)


def test_manage_py_ebsqs_outbox_relay_once_drains(outbox_on: str, capsys: Any) -> None:
    from shop.tasks import record

    with transaction.atomic(using=outbox_on):
        ids = record.delay_many([(f"k{i}",) for i in range(12)])
    call_command("ebsqs", "outbox", "relay", "--once")
    assert "sent 12, failed 0" in capsys.readouterr().out
    assert sorted(b["id"] for b in waiting("a")) == sorted(ids)
    assert rows(outbox_on) == []


def test_the_supervisor_runs_a_relay_only_with_the_outbox_on() -> None:
    from ebsqs.supervisor.config import QueueSpec, SupervisorConfig
    from ebsqs.supervisor.services import services

    config = SupervisorConfig(apps=(), queues=(QueueSpec("a", 1),), settings=load_settings())
    assert not any(isinstance(s, outbox.RelayService) for s in services(config))
    with override_settings(EBSQS={"outbox": True}):
        assert [type(s) for s in services(config) if isinstance(s, outbox.RelayService)] == [
            outbox.RelayService
        ]

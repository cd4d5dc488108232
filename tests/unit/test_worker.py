"""The worker loop, stepped by hand with loop_once() on the memory broker."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from ebsqs import current, middleware, task
from ebsqs.brokers import OutgoingMessage, QueueSettings
from ebsqs.brokers.memory import MemoryBroker
from ebsqs.config import Settings
from ebsqs.envelope import Envelope, encode
from ebsqs.executors.execution import Job, Outcome
from ebsqs.executors.inline import InlineExecutor
from ebsqs.registry import TaskRegistry
from ebsqs.worker import Worker, WorkerOptions, WorkerState
from tests.clock import FakeClock
from tests.counting import CountingBroker
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(10)

runs: list[tuple[str, object]] = []


@pytest.fixture
def reg() -> TaskRegistry:
    return TaskRegistry()


@pytest.fixture
def broker() -> MemoryBroker:
    b = MemoryBroker()
    return b


@pytest.fixture(autouse=True)
def clear_runs() -> Iterator[None]:
    runs.clear()
    yield


def make_worker(
    broker: MemoryBroker, reg: TaskRegistry, settings: Settings | None = None, **options: object
) -> Worker:
    """A started inline worker on queue ``q`` (by default: no backoff, queues auto-created)."""
    if settings is None:
        settings = Settings(broker_url="memory://unused", backoff_base=0, auto_create_queues=True)
    worker = Worker(
        broker,
        settings,
        InlineExecutor(registry=reg),
        WorkerOptions(queues=("q",), wait_seconds=0, **options),  # type: ignore[arg-type]
        registry=reg,
    )
    worker.start()
    return worker


def started_worker(
    broker: MemoryBroker, reg: TaskRegistry, executor: object, **options: object
) -> Worker:
    """A started worker on queue ``q`` with ``executor`` (no auto-created queues, no backoff)."""
    worker = Worker(
        broker,
        Settings(broker_url="memory://unused"),
        executor,  # type: ignore[arg-type]
        WorkerOptions(queues=("q",), **{"wait_seconds": 0, **options}),  # type: ignore[arg-type]
        registry=reg,
    )
    worker.start()
    return worker


def put(broker: MemoryBroker, *bodies: str) -> None:
    broker.ensure_queue(
        "q",
        __import__("ebsqs.brokers", fromlist=["QueueSettings"]).QueueSettings(
            dead_letter_queue="q-dlq"
        ),
    )
    for body in bodies:
        broker.send("q", OutgoingMessage(body))


def body(name: str, *args: object, max_retries: int = 0, **kwargs: object) -> str:
    return encode(Envelope(task=name, args=args, kwargs=kwargs, max_retries=max_retries))


def receive(worker: Worker) -> None:
    """One receive, taken in by the loop (its messages held and waiting), nothing started."""
    worker._request_messages()
    worker._take_receipts(timeout=5)


def steps(worker: Worker, n: int = 5) -> None:
    """``n`` iterations, then every delete they queued is done (deletes go out on threads)."""
    for _ in range(n):
        worker.loop_once()
    assert worker.flush(timeout=10)


def dead_letters(broker: MemoryBroker) -> list[dict[str, str]]:
    return [dict(m.attributes) for m in broker.receive("q-dlq", 10, 0)]


def test_success_is_acked(broker: MemoryBroker, reg: TaskRegistry) -> None:
    task(name="ok", registry=reg)(lambda x: runs.append(("ok", x)))
    put(broker, *(body("ok", i) for i in range(15)))
    worker = make_worker(broker, reg)
    steps(worker)
    assert sorted(x for _, x in runs) == list(range(15))  # type: ignore[type-var]
    assert broker.stats("q") == broker.stats("q").__class__("q", 0, 0, 0)
    assert worker.counters.total("succeeded") == 15 and worker.state is WorkerState.IDLE


def test_failure_with_retries_runs_max_retries_plus_one_then_dead_letters(
    broker: MemoryBroker, reg: TaskRegistry
) -> None:
    @task(name="boom", registry=reg, retry_on=(ValueError,))
    def boom() -> None:
        runs.append(("boom", None))
        raise ValueError("it broke")

    put(broker, body("boom", max_retries=2))
    worker = make_worker(broker, reg)
    steps(worker, 8)
    assert len(runs) == 3
    [letter] = dead_letters(broker)
    assert letter["ebsqs-error-type"] == "builtins.ValueError"
    assert letter["ebsqs-error"] == "it broke" and letter["ebsqs-attempts"] == "3"
    assert broker.stats("q").visible == broker.stats("q").in_flight == 0


def test_an_exception_not_in_retry_on_dead_letters_at_once(
    broker: MemoryBroker, reg: TaskRegistry
) -> None:
    @task(name="typo", registry=reg, retry_on=(ValueError,))
    def typo() -> None:
        runs.append(("typo", None))
        raise KeyError("nope")

    put(broker, body("typo", max_retries=5))
    steps(make_worker(broker, reg))
    assert len(runs) == 1 and dead_letters(broker)[0]["ebsqs-reason"] == "failed"


def test_retry_call_schedules_the_next_attempt(broker: MemoryBroker, reg: TaskRegistry) -> None:
    @task(name="again", registry=reg)
    def again() -> None:
        from ebsqs import current

        runs.append(("again", current().attempt))
        if current().attempt < 2:
            again.retry(delay=0)

    put(broker, body("again", max_retries=3))
    steps(make_worker(broker, reg))
    assert runs == [("again", 1), ("again", 2)]
    assert dead_letters(broker) == [] and broker.stats("q").visible == 0


def test_bodies_that_must_not_run_are_dead_lettered_unrun(
    broker: MemoryBroker, reg: TaskRegistry
) -> None:
    legacy = json.dumps(
        {
            "func": "subprocess.getoutput",
            "args": ["touch /tmp/x"],
            "kwargs": {},
            "maxRetries": 0,
            "retry": 0,
            "pickle": False,
        }
    )
    sys.modules.pop("this", None)
    put(broker, "{not json", body("not.registered"), legacy, body("this"))
    with capture_logs() as logs:
        steps(make_worker(broker, reg))
    reasons = sorted(letter["ebsqs-error-type"] for letter in dead_letters(broker))
    assert reasons == ["EnvelopeError", "UnknownTaskError", "UnknownTaskError", "UnknownTaskError"]
    assert "this" not in sys.modules  # a task name is never imported
    assert sum(e["event"] == "message_rejected" for e in logs) == 4


def test_a_message_received_early_is_parked_for_up_to_twelve_hours(
    broker: MemoryBroker, reg: TaskRegistry
) -> None:
    task(name="later", registry=reg)(lambda: runs.append(("later", None)))
    due = time.time() + 86400
    put(broker, encode(Envelope(task="later", due=due)))
    steps(make_worker(broker, reg), 2)
    assert runs == []
    [stored] = broker._queues["q"].messages.values()
    assert stored.receive_count == 1  # the same message, kept invisible: no send, no delete
    assert 43190 < stored.visible_at - time.time() <= 43200


def test_a_message_parked_down_to_half_its_receives_is_sent_on_afresh(
    broker: MemoryBroker, reg: TaskRegistry
) -> None:
    """Each park uses a receive, which the redrive policy counts: past half of
    max_receive_count (10), the message is sent on anew and its count starts again."""
    task(name="later", registry=reg)(lambda: runs.append(("later", None)))
    put(broker, encode(Envelope(task="later", due=time.time() + 86400)))
    [stored] = broker._queues["q"].messages.values()
    stored.receive_count = 4  # the next receive is its fifth
    steps(make_worker(broker, reg), 2)
    assert runs == []
    [fresh] = broker._queues["q"].messages.values()
    assert fresh is not stored and fresh.receive_count == 0
    assert 890 < fresh.visible_at - time.time() <= 900


def test_with_parking_off_long_delays_hop_15_minutes_at_a_time(
    broker: MemoryBroker, reg: TaskRegistry
) -> None:
    task(name="later", registry=reg)(lambda: runs.append(("later", None)))
    put(broker, encode(Envelope(task="later", due=time.time() + 86400)))
    settings = Settings(broker_url="memory://unused", backoff_base=0, park_delays=False)
    worker = make_worker(broker, reg, settings)
    steps(worker, 2)
    assert runs == []
    [stored] = broker._queues["q"].messages.values()
    assert stored.receive_count == 0  # a fresh message: hops never count as failed receives
    assert 890 < stored.visible_at - time.time() <= 900
    worker.drain()


@pytest.mark.timeout(30)
def test_a_day_of_delay_costs_at_most_eight_requests_and_never_a_dead_letter(
    reg: TaskRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sent with SQS's longest delay (15 minutes), then parked twice for up to 12 hours: the
    day costs 7 requests, the run's own receive and delete included (hops: 288)."""
    clock = FakeClock(time.time())
    monkeypatch.setattr(time, "time", clock)  # the due time is wall-clock: move both together
    broker = CountingBroker(clock)
    task(name="later", registry=reg)(lambda: runs.append(("later", clock())))
    due = clock() + 86400
    broker.ensure_queue("q", QueueSettings(dead_letter_queue="q-dlq"))
    broker.send("q", OutgoingMessage(encode(Envelope(task="later", due=due)), delay=900))
    worker = make_worker(broker, reg)
    while True:
        steps(worker, 2)
        if runs:
            break
        [stored] = broker._queues["q"].messages.values()
        clock.now = max(clock.now, stored.visible_at) + 0.01  # on to its next receive
        assert clock.now < due + 60, "it never ran"
    worker.drain()
    [(_, ran_at)] = runs
    assert due <= ran_at < due + 60
    assert sum(broker.requests.values()) <= 8, broker.requests
    assert broker.requests["send"] == 1, broker.requests  # never sent on again
    assert broker.stats("q-dlq").visible == 0


def test_prefetch_holds_at_most_concurrency_plus_one_batch(
    broker: MemoryBroker, reg: TaskRegistry
) -> None:
    held: list[int] = []
    worker_ref: list[Worker] = []

    @task(name="peek", registry=reg)
    def peek() -> None:
        held.append(broker.stats("q").in_flight)
        if len(held) == 3:
            worker_ref[0].stop()

    put(broker, *(body("peek") for _ in range(40)))
    worker = make_worker(broker, reg)
    worker_ref.append(worker)
    worker.run()
    assert max(held) <= 1 + 10
    # The stop released every fetched-but-unstarted message at once.
    assert broker.stats("q").visible == 40 - 3 and broker.stats("q").in_flight == 0


def test_keeper_extends_visibility_of_held_messages(
    broker: MemoryBroker, reg: TaskRegistry
) -> None:
    task(name="noop", registry=reg)(lambda: None)
    put(broker, body("noop"))
    worker = make_worker(broker, reg, visibility_timeout=30)
    receive(worker)
    [held] = worker._held.all()
    held.visible_until = time.monotonic() + 1  # about to expire
    worker._keeper.extend_visibility()
    [stored] = broker._queues["q"].messages.values()
    assert stored.visible_at - time.time() > 25
    assert worker.counters.extended == 1


def test_extension_stops_at_the_hard_limit(broker: MemoryBroker, reg: TaskRegistry) -> None:
    task(name="noop", registry=reg)(lambda: None)
    put(broker, body("noop"))
    worker = make_worker(broker, reg, visibility_timeout=30)
    receive(worker)
    [held] = worker._held.all()
    held.visible_until = time.monotonic()
    held.deadline = time.monotonic() - 10  # the hard limit passed long ago
    worker._keeper.extend_visibility()
    assert worker.counters.extended == 0


def test_max_tasks_stops_the_loop(broker: MemoryBroker, reg: TaskRegistry) -> None:
    task(name="ok", registry=reg)(lambda: None)
    put(broker, *(body("ok") for _ in range(30)))
    worker = make_worker(broker, reg, max_tasks=5)
    worker.run()
    assert worker.counters.total("succeeded") == 5
    assert broker.stats("q").visible == 25


def test_task_arguments_are_not_logged_by_default(broker: MemoryBroker, reg: TaskRegistry) -> None:
    task(name="secret", registry=reg)(lambda password: None)
    put(broker, body("secret", password="hunter2"))
    with capture_logs() as logs:
        steps(make_worker(broker, reg), 2)
    [line] = [e for e in logs if e["event"] == "task_succeeded"]
    assert {"task", "task_id", "message_id", "queue", "attempt", "duration"} <= line.keys()
    assert "hunter2" not in repr(logs)


def test_deletes_go_out_ten_per_request(broker: MemoryBroker, reg: TaskRegistry) -> None:
    task(name="ok", registry=reg)(lambda: None)
    put(broker, *(body("ok") for _ in range(25)))
    calls: list[int] = []
    real_ack = broker.ack
    broker.ack = lambda messages: calls.append(len(messages)) or real_ack(messages)  # type: ignore[method-assign]
    worker = make_worker(broker, reg)
    steps(worker, 4)
    assert sum(calls) == 25 and calls[:2] == [10, 10]
    assert broker.stats("q").in_flight == 0


def test_the_keeper_flushes_deletes_that_waited_a_second(
    broker: MemoryBroker, reg: TaskRegistry
) -> None:
    task(name="ok", registry=reg)(lambda: None)
    put(broker, body("ok"))
    worker = make_worker(broker, reg)
    receive(worker)
    worker._start_pending()  # ran, settled, delete queued but not sent
    assert broker.stats("q").in_flight == 1
    worker._settler._oldest_ack -= 5
    worker._settler.flush_acks(older_than=1.0)
    assert worker._settler.wait_acks(timeout=5)
    assert broker.stats("q").in_flight == 0


def test_default_time_limits_apply_per_queue_to_tasks_that_set_none(
    broker: MemoryBroker, reg: TaskRegistry
) -> None:
    task(name="free", registry=reg)(lambda: None)
    task(name="own", registry=reg, time_limit=5)(lambda: None)
    put(broker, body("free"), body("own"))
    settings = Settings(broker_url="memory://unused", time_limit="q=60,*=600", soft_time_limit="50")
    worker = make_worker(broker, reg, settings)
    receive(worker)
    limits = {
        h.job.envelope.task: (h.job.time_limit, h.job.soft_time_limit)
        for h in worker._pending
        if h.job
    }
    assert limits == {"free": (60.0, 50.0), "own": (5, 50.0)}
    assert settings.time_limits_for("other") == (600.0, 50.0)


@pytest.mark.parametrize("spec", ["abc", "q=", "q=-1", "0"])
def test_bad_time_limit_specs_are_configuration_errors(spec: str) -> None:
    from ebsqs.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="queue=seconds"):
        Settings(time_limit=spec)


@pytest.mark.timeout(20)
def test_keeper_settles_a_thread_task_past_its_hard_limit_and_stops_the_worker(
    broker: MemoryBroker, reg: TaskRegistry
) -> None:
    import threading

    from ebsqs.executors.thread import ThreadExecutor

    release = threading.Event()
    task(name="stuck", registry=reg, time_limit=0.3)(lambda: release.wait(10))
    task(name="ok", registry=reg)(lambda: runs.append(("ok", None)))
    put(broker, body("stuck"), body("ok"))
    settings = Settings(broker_url="memory://unused")
    worker = Worker(
        broker,
        settings,
        ThreadExecutor(concurrency=2, registry=reg),
        WorkerOptions(queues=("q",), wait_seconds=0),
        registry=reg,
    )
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while not worker.overran and time.monotonic() < deadline:
            worker.loop_once()
        assert worker.overran and worker.stopping
        [letter] = dead_letters(broker)
        assert letter["ebsqs-error-type"] == "timed_out" and letter["ebsqs-task"] == "stuck"
        assert runs == [("ok", None)]
    finally:
        release.set()
        worker.drain(time.monotonic() + 5)
    assert broker.stats("q").visible == broker.stats("q").in_flight == 0


@pytest.mark.timeout(20)
def test_the_loop_blocks_instead_of_spinning_while_every_slot_is_busy(
    broker: MemoryBroker, reg: TaskRegistry
) -> None:
    import threading

    from ebsqs.executors.thread import ThreadExecutor

    release = threading.Event()
    task(name="slow", registry=reg)(lambda: release.wait(10))
    put(broker, *(body("slow") for _ in range(5)))
    worker = started_worker(
        broker, reg, ThreadExecutor(concurrency=1, registry=reg), wait_seconds=1
    )
    try:
        worker.loop_once()  # receives five, starts one: four wait for the only slot
        assert worker.executor.running() == 1 and len(worker._pending) == 4
        cpu, wall = time.thread_time(), time.monotonic()
        while time.monotonic() - wall < 0.5:
            worker.loop_once()
        assert time.thread_time() - cpu < 0.15, "the loop spun while its only slot was busy"
    finally:
        release.set()
        worker.stop()
        worker.drain(time.monotonic() + 5)


@pytest.mark.timeout(20)
def test_a_sync_task_past_its_hard_limit_under_asyncio_is_settled_once(
    broker: MemoryBroker, reg: TaskRegistry
) -> None:
    """The asyncio executor cannot stop a sync task (it runs in a thread): its capabilities say
    so, the keeper settles the message as timed out, and the message never comes back to run
    a second time."""
    import threading

    from ebsqs.executors.asyncio import AsyncioExecutor

    release = threading.Event()
    started: list[int] = []

    def stuck() -> None:
        started.append(1)
        release.wait(10)

    task(name="stuck", registry=reg, time_limit=0.3)(stuck)
    put(broker, body("stuck"))
    executor = AsyncioExecutor(concurrency=2, registry=reg)
    assert not executor.capabilities.hard_limit_sync and executor.capabilities.hard_limit_async
    worker = Worker(
        broker,
        Settings(broker_url="memory://unused"),
        executor,
        WorkerOptions(queues=("q",), wait_seconds=0),
        registry=reg,
    )
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while not worker.overran and time.monotonic() < deadline:
            worker.loop_once()
        assert worker.overran and worker.stopping
        [letter] = dead_letters(broker)
        assert letter["ebsqs-error-type"] == "timed_out" and letter["ebsqs-task"] == "stuck"
    finally:
        release.set()
        worker.drain(time.monotonic() + 5)
    assert started == [1]
    assert broker.stats("q").visible == broker.stats("q").in_flight == 0


def test_time_outs_are_counted_per_task(broker: MemoryBroker, reg: TaskRegistry) -> None:
    from ebsqs.errors import SoftTimeLimitExceeded

    def slow() -> None:
        raise SoftTimeLimitExceeded("soft time limit of 1 s exceeded")

    task(name="slow", registry=reg)(slow)
    put(broker, body("slow", max_retries=1))
    worker = make_worker(broker, reg)
    steps(worker, 4)
    stats = worker.counters.tasks["slow"]
    assert (stats.timed_out, stats.retried, stats.failed) == (2, 1, 1)


def test_the_loop_reports_a_deadline_from_its_own_thread_before_the_task_starts(
    broker: MemoryBroker, reg: TaskRegistry
) -> None:
    """A task that holds the GIL silences the heartbeat thread: the master must already know
    its deadline. The loop's thread sends a beat carrying it just before the task runs, and
    marks itself blocked (not stalled) while it runs the task."""
    import threading

    from ebsqs.worker import WorkerStatus

    beats: list[tuple[str, WorkerStatus]] = []
    seen_inside: list[WorkerStatus] = []

    def record(status: WorkerStatus) -> None:
        beats.append((threading.current_thread().name, status))

    def limited() -> None:
        seen_inside.extend(status for _, status in beats)
        seen_inside.append(worker.status())

    task(name="limited", registry=reg, time_limit=60)(limited)
    put(broker, body("limited"))
    worker = make_worker(broker, reg, heartbeat=record)
    worker.loop_once()
    *before, inside = seen_inside
    loop_thread = threading.current_thread().name
    [(thread, status)] = [(t, s) for t, s in beats if s.running][:1]
    assert thread == loop_thread
    assert status.running[0].task == "limited" and status.running[0].deadline is not None
    assert status in before  # sent before the task body ran
    assert inside.loop_age is None  # running a task in the loop's thread is not a stall
    assert worker.status().loop_age is not None and worker.status().loop_age < 5
    worker.drain()


def test_a_pulse_counts_only_the_loop_thread_s_blocking() -> None:
    import threading

    from ebsqs.worker.pulse import Pulse

    pulse = Pulse()
    pulse.beat()
    seen: list[float | None] = []

    def elsewhere() -> None:
        with pulse.blocked():  # the keeper's broker calls must not hide a frozen loop
            seen.append(pulse.age())

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join(5)
    assert seen and seen[0] is not None
    with pulse.blocked():
        assert pulse.age() is None
    assert pulse.age() is not None


@pytest.mark.timeout(30)
def test_a_pool_process_that_dies_under_a_task_gets_its_message_redelivered(
    broker: MemoryBroker, reg: TaskRegistry, tmp_path: object
) -> None:
    """Under the process executor a dead pool process is a crash, as a dead child is: the message
    comes back and runs again; nothing is dead-lettered as failed."""
    import os
    import signal
    from pathlib import Path

    from ebsqs.executors.process import ProcessExecutor

    marker = Path(str(tmp_path)) / "died-once"

    def dies_once() -> None:
        if not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)

    task(name="dies_once", registry=reg)(dies_once)
    put(broker, body("dies_once", max_retries=0))
    worker = started_worker(broker, reg, ProcessExecutor(concurrency=1, registry=reg))
    try:
        deadline = time.monotonic() + 20
        stats = worker.counters.task("dies_once")
        while stats.succeeded == 0 and time.monotonic() < deadline:
            worker.loop_once()
    finally:
        worker.drain(time.monotonic() + 5)
    assert (stats.crashed, stats.succeeded, stats.failed, stats.dead_lettered) == (1, 1, 0, 0)
    assert dead_letters(broker) == []


@pytest.mark.timeout(20)
@pytest.mark.parametrize("step", [3600.0, -3600.0])
def test_a_wall_clock_step_neither_overruns_a_task_nor_stops_its_extensions(
    broker: MemoryBroker, reg: TaskRegistry, monkeypatch: pytest.MonkeyPatch, step: float
) -> None:
    """+1 h used to settle a healthy task as overrun; -1 h stopped its extensions so it ran
    again. Deadlines and visibility timers run on the monotonic clock."""
    import threading

    from ebsqs.executors.thread import ThreadExecutor

    release = threading.Event()
    task(name="steady", registry=reg, time_limit=60)(lambda: release.wait(10))
    put(broker, body("steady"))
    worker = started_worker(
        broker, reg, ThreadExecutor(concurrency=1, registry=reg), visibility_timeout=30
    )
    try:
        worker.loop_once()
        [held] = worker._held.all()
        assert held.started_at is not None
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + step)
        held.visible_until = time.monotonic() + 1  # about to expire
        worker._keeper.pass_once()
        assert not worker.overran and worker._held.all() == [held]
        assert worker.counters.extended == 1
    finally:
        monkeypatch.undo()
        release.set()
        worker.drain(time.monotonic() + 5)
    assert worker.counters.tasks["steady"].succeeded == 1


class FailingBroker(MemoryBroker):
    """The memory broker, with receives that fail while ``failing`` is set."""

    failing = True

    def receive(self, *args: object, **kwargs: object):  # type: ignore[no-untyped-def,override]
        from ebsqs.errors import BrokerError

        if self.failing:
            raise BrokerError("RequestThrottled: Request is throttled.")
        return super().receive(*args, **kwargs)  # type: ignore[arg-type]


def test_failing_receives_back_off_count_and_report_degraded_until_one_works(
    reg: TaskRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ebsqs.backoff import Backoff
    from ebsqs.worker import loop

    waits: list[float] = []

    class Recorded:
        def delay(self, failures: int) -> float:
            waits.append(Backoff(0.01, 0.04).delay(failures))
            return waits[-1]

    monkeypatch.setattr(loop, "RECEIVE_BACKOFF", Recorded())
    broker = FailingBroker()
    put(broker)
    worker = make_worker(broker, reg)  # type: ignore[arg-type]
    counters = worker.counters
    wait_until(lambda: worker.loop_once() or counters.receive_errors >= 4, 10, interval=0)
    assert worker.state is WorkerState.DEGRADED
    assert (counters.receive_errors, counters.throttled, counters.kms_errors) == (4, 4, 0)
    # Each failure waited out its backoff before the next receive was asked for.
    assert len(waits) == 4 and all(0 <= w <= 0.04 for w in waits)
    broker.failing = False
    wait_until(lambda: worker.loop_once() or counters.receives == 1, 10, interval=0)
    worker.loop_once()
    assert worker.state is WorkerState.IDLE and counters.receive_errors == 4
    worker.drain()


def test_a_receipt_the_broker_calls_dead_is_not_extended_again(reg: TaskRegistry) -> None:
    clock = [1000.0]
    broker = MemoryBroker(clock=lambda: clock[0])
    import threading

    release = threading.Event()
    task(name="slow", registry=reg)(lambda: release.wait(10))
    put(broker, body("slow"))
    from ebsqs.executors.thread import ThreadExecutor

    worker = started_worker(
        broker, reg, ThreadExecutor(concurrency=1, registry=reg), visibility_timeout=30
    )
    try:
        worker.loop_once()
        [held] = worker._held.all()
        clock[0] += 31  # its visibility lapsed; another consumer received it anew
        assert broker.receive("q", 1, 0)
        with capture_logs() as logs:
            for _ in range(3):
                held.visible_until = time.monotonic()  # due for an extension
                worker._keeper.extend_visibility()
        assert held.lost and worker.counters.extended == 0
        assert [e["event"] for e in logs] == ["message_visibility_lost"]
    finally:
        release.set()
        worker.drain(time.monotonic() + 5)


def test_a_delete_waits_at_most_ack_wait_for_a_full_batch(
    broker: MemoryBroker, reg: TaskRegistry
) -> None:
    """A kill repeats at most the work finished in the last ack_wait: a slow task's delete is
    sent as the next one finishes, not a batch later."""
    task(name="ok", registry=reg)(lambda: None)
    put(broker, *(body("ok") for _ in range(3)))
    worker = make_worker(broker, reg, ack_wait=0.1)
    calls: list[int] = []
    real_ack = broker.ack
    broker.ack = lambda messages: calls.append(len(messages)) or real_ack(messages)  # type: ignore[method-assign]
    settler = worker._settler
    receive(worker)
    [first, *rest] = list(worker._pending)
    worker._pending.clear()
    worker._pending.append(first)
    worker._start_pending()
    assert calls == [] and settler.ack_due_in() is not None  # one delete waits
    settler._oldest_ack -= 0.2  # the first task's delete has waited longer than ack_wait
    worker._pending.extend(rest)
    worker._start_pending()  # the next finished task sends both waiting deletes
    assert settler.wait_acks(timeout=5)
    assert calls[0] == 2


def test_a_worker_will_not_start_without_a_dead_letter_queue_it_may_not_create(
    broker: MemoryBroker, reg: TaskRegistry
) -> None:
    """Else a message that must not run could be neither dead-lettered nor deleted."""
    from ebsqs.brokers import QueueSettings
    from ebsqs.errors import ConfigurationError

    broker.ensure_queue("q", QueueSettings())  # no q-dlq
    worker = Worker(
        broker,
        Settings(broker_url="memory://unused", auto_create_queues=False),
        InlineExecutor(registry=reg),
        WorkerOptions(queues=("q",), wait_seconds=0),
        registry=reg,
    )
    with pytest.raises(ConfigurationError, match=r"no dead-letter queue 'q-dlq'.*queues create q"):
        worker.start()


def test_the_worker_verifies_with_every_rotated_key_and_refuses_old_signatures(
    broker: MemoryBroker, reg: TaskRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    task(name="ok", registry=reg)(lambda: runs.append(("ok", None)))
    old_key_body = encode(Envelope(task="ok"), signing_key="old")
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 3600)
    stale_body = encode(Envelope(task="ok"), signing_key="new")
    monkeypatch.undo()
    put(broker, old_key_body, stale_body)
    settings = Settings(
        broker_url="memory://unused", signing_keys=("new", "old"), signature_max_age=600
    )
    worker = make_worker(broker, reg, settings)
    steps(worker, 2)
    worker.drain()
    assert runs == [("ok", None)]  # signed with the retired key, still accepted
    [letter] = dead_letters(broker)
    assert letter["ebsqs-reason"] == "rejected" and "signature_max_age" in letter["ebsqs-error"]


def test_a_failure_logs_its_traceback_and_its_dead_letter_carries_the_end_of_it(
    broker: MemoryBroker, reg: TaskRegistry
) -> None:
    def deep() -> None:
        try:
            raise KeyError("why: " + "x" * 3000)  # a long cause: over one attribute's 1000
        except KeyError as exc:
            raise ValueError("the bottom") from exc

    task(name="deep", registry=reg)(deep)
    put(broker, body("deep"))
    worker = make_worker(broker, reg)
    with capture_logs() as logs:
        worker.loop_once()
    worker.drain()
    [failed] = [e for e in logs if e["event"] == "task_failed"]
    assert "Traceback" in failed["traceback"] and "ValueError: the bottom" in failed["traceback"]
    [letter] = dead_letters(broker)
    trace = letter["ebsqs-traceback"]
    assert trace.rstrip().endswith("ValueError: the bottom") and 1000 < len(trace) <= 4000


def test_backing_off_after_a_failed_receive_is_not_a_stalled_loop(
    reg: TaskRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = FailingBroker()
    put(broker)
    worker = make_worker(broker, reg)  # type: ignore[arg-type]
    ages: list[float | None] = []
    monkeypatch.setattr(
        worker._stopping, "wait", lambda t: ages.append(worker.status().loop_age) or False
    )
    wait_until(lambda: worker.loop_once() or ages, 10, interval=0)  # the failure comes back
    assert worker.counters.receive_errors == 1 and ages[0] is None
    worker.drain()


def test_a_dead_letter_at_the_size_limit_keeps_its_body_and_drops_the_traceback(
    broker: MemoryBroker, reg: TaskRegistry
) -> None:
    """The body was accepted by the queue; its dead-letter copy must fit the dead-letter queue
    too, even with the reasons attached (SQS counts attributes toward the limit)."""

    @task(name="deep", registry=reg)
    def deep(padding: str) -> None:
        def recurse(n: int) -> None:
            if n == 0:
                raise ValueError("deep failure " + "e" * 900)
            recurse(n - 1)

        recurse(50)  # a long traceback

    limit = 6000
    broker.ensure_queue("q", QueueSettings(dead_letter_queue="q-dlq", max_body_bytes=limit))
    message_body = body("deep", "p" * 4900)
    broker.send("q", OutgoingMessage(message_body))
    steps(make_worker(broker, reg), 3)
    [letter] = broker.receive("q-dlq", 10, 0)
    assert letter.body == message_body
    assert letter.attributes["ebsqs-reason"] == "failed"
    assert "left out" in letter.attributes["ebsqs-traceback"]
    assert broker.stats("q").visible + broker.stats("q").in_flight == 0


class Outage(Exception):
    """What the environment-failure tests raise: a middleware calls it the environment's."""


class RedeliverOutages(middleware.Middleware):
    def classify(self, job: Job, outcome: Outcome) -> Outcome:
        if outcome.error_type and outcome.error_type.endswith("Outage"):
            return dataclasses.replace(outcome, redeliver=True)
        return outcome


@pytest.fixture
def redelivering() -> Iterator[None]:
    hook = RedeliverOutages()
    middleware.add(hook)
    yield
    middleware.MIDDLEWARE.remove(hook)


def test_an_environment_failure_is_redelivered_without_an_attempt_then_dead_lettered(
    broker: MemoryBroker, reg: TaskRegistry, redelivering: None
) -> None:
    """No retries of its own, yet it runs on each delivery the queue allows (three here), every
    run its first attempt; on the last one ebsqs dead-letters it, with the reason."""

    @task(name="needs_db", registry=reg)
    def needs_db() -> None:
        runs.append(("needs_db", current().attempt))
        raise Outage("the database went away")

    put(broker, body("needs_db"))
    worker = Worker(
        broker,
        Settings(broker_url="memory://unused", backoff_base=0, max_receive_count=3),
        InlineExecutor(registry=reg),
        WorkerOptions(queues=("q",), wait_seconds=0),
        registry=reg,
    )
    worker.start()
    steps(worker, 8)
    assert runs == [("needs_db", 1)] * 3
    [letter] = dead_letters(broker)
    assert letter["ebsqs-reason"] == "redelivered on each of its 3 deliveries"
    assert letter["ebsqs-error-type"].endswith("Outage")
    totals = worker.counters.totals()
    assert (totals["redelivered"], totals["failed"], totals["dead_lettered"]) == (3, 1, 1)


@pytest.mark.timeout(30)
def test_held_never_exceeds_what_can_run_plus_one_batch_while_receives_overlap(
    broker: MemoryBroker, reg: TaskRegistry
) -> None:
    """Receives overlap the tasks (two may be in flight), yet what the worker holds (received,
    not settled) and what it asked for stay within concurrency + 10."""
    import threading

    from ebsqs.executors.thread import ThreadExecutor

    class Distant(MemoryBroker):
        """Each receive takes a round trip of 20 ms, as SQS's do."""

        def receive(self, *args: object, **kwargs: object):  # type: ignore[no-untyped-def,override]
            time.sleep(0.02)
            return super().receive(*args, **kwargs)  # type: ignore[arg-type]

    broker = Distant()
    task(name="brief", registry=reg)(lambda: time.sleep(0.002))
    put(broker, *(body("brief") for _ in range(300)))
    worker = started_worker(broker, reg, ThreadExecutor(concurrency=4, registry=reg))
    samples: list[tuple[int, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((len(worker._held), worker._receiver.in_flight))
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        wait_until(
            lambda: worker.loop_once() or worker.counters.total("succeeded") == 300, 20, interval=0
        )
    finally:
        done.set()
        sampler.join(5)
    worker.drain()
    assert max(held for held, _ in samples) <= 4 + 10, max(samples)
    assert max(flying for _, flying in samples) == 2, "receives never overlapped"
    assert broker.stats("q").visible == 0 and broker.stats("q").in_flight == 0


def test_the_worker_reports_the_text_of_what_last_went_wrong(
    broker: MemoryBroker, reg: TaskRegistry
) -> None:
    def bad(address: str) -> None:
        raise ValueError(f"no such address\n(second line: {address})")

    task(name="bad", registry=reg)(bad)
    put(broker, body("bad", "a@example.invalid"))
    worker = make_worker(broker, reg)
    assert worker.status().last_error is None
    steps(worker, 2)
    assert worker.status().last_error == "ValueError: no such address"
    put(broker, "not an envelope")
    steps(worker, 2)
    assert worker.status().last_error.startswith("rejected ")  # type: ignore[union-attr]
    worker.drain()


def test_a_task_that_hung_a_process_runs_last_and_alone_once_it_comes_back(
    broker: MemoryBroker, reg: TaskRegistry
) -> None:
    """Issue item 10.1: a message that came back, whose task hung a process of this host (its
    id is in the suspects) and cannot be stopped by the inline executor (no time limit), may
    hold the GIL again: nothing waits behind it while it runs."""
    task(name="ok", registry=reg)(lambda x: runs.append(("ok", x)))

    def came_back(*keys_and_ids: tuple[str, str]) -> None:
        put(broker, *(encode(Envelope(task="ok", args=(k,), id=i)) for k, i in keys_and_ids))
        received = broker.receive("q", 10, 0)
        broker.change_visibility(received, 0)  # as after a crash: received twice

    # "redelivered" came back too, but never hung a process.
    came_back(("suspect", "hung-1"), ("redelivered", "other-1"))
    put(broker, *(body("ok", n) for n in range(3)))
    worker = make_worker(broker, reg, suspects=frozenset({"hung-1"}))
    receive(worker)
    assert [held.message.receive_count for held in worker._pending] == [2, 2, 1, 1, 1]
    assert not worker._wants_messages(), "a receive was asked for behind a suspect"

    worker._start_pending()
    assert runs == [("ok", "redelivered"), ("ok", 0), ("ok", 1), ("ok", 2), ("ok", "suspect")]

    runs.clear()
    limited = make_worker(
        broker, reg, Settings(broker_url="memory://x", time_limit="60"),
        suspects=frozenset({"hung-2"}),
    )  # fmt: skip
    came_back(("limited", "hung-2"))
    put(broker, body("ok", "after"))
    receive(limited)
    limited._start_pending()  # with a hard limit, the master stops it in time: order kept
    assert runs == [("ok", "limited"), ("ok", "after")]


class _Loaded(MemoryBroker):
    """A broker on a busy host: ``slow`` of every four receives wait ``seconds`` for the CPU,
    the others answer at once. Records the thread each receive ran in."""

    def __init__(self, slow: int, seconds: float = 0.012) -> None:
        super().__init__()
        self.slow, self.seconds, self.calls = slow, seconds, 0
        self.threads: list[str] = []

    def receive(self, *args: object, **kwargs: object):  # type: ignore[no-untyped-def,override]
        import threading

        self.calls += 1
        self.threads.append(threading.current_thread().name)
        if self.calls % 4 < self.slow:
            time.sleep(self.seconds)  # the latency being simulated, not a synchronisation
        return super().receive(*args, **kwargs)  # type: ignore[arg-type]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("slow", "near"), [(3, True), (4, False)])
def test_a_broker_is_near_when_some_of_its_answers_are_fast(
    reg: TaskRegistry, slow: int, near: bool
) -> None:
    """Three answers in four slowed to 20 ms by a busy CPU still leave the broker near: the loop
    receives and deletes itself (no thread hand-offs). Only when none comes back fast is it
    far, and the receives go to the receiver threads."""
    broker = _Loaded(slow, seconds=0.02)  # past the far line of a broker on this host
    task(name="brief", registry=reg)(lambda: None)
    put(broker, *(body("brief") for _ in range(200)))
    worker = make_worker(broker, reg)
    wait_until(
        lambda: worker.loop_once() or worker.counters.total("succeeded") == 200, 20, interval=0
    )
    worker.drain()
    later = broker.threads[len(broker.threads) // 2 : -2]  # past the first window, not the drain
    in_loop = sum(name == "MainThread" for name in later)
    assert worker._settler.deletes_here is near
    if near:
        assert in_loop == len(later), broker.threads
    else:
        assert in_loop == 0, broker.threads


@pytest.mark.timeout(30)
def test_answers_between_the_near_and_far_lines_keep_the_verdict(reg: TaskRegistry) -> None:
    """A near broker whose answers then all take 11 ms (a busy host: past the near line of a
    broker on this host, 8 ms, short of its far line, 16) stays near: the loop keeps receiving
    and deleting itself."""

    class Busier(_Loaded):
        def receive(self, *args: object, **kwargs: object):  # type: ignore[no-untyped-def,override]
            self.slow = 4 if self.calls >= 3 else 0  # the first three answer at once
            return super().receive(*args, **kwargs)

    broker = Busier(0, seconds=0.011)
    task(name="brief", registry=reg)(lambda: None)
    put(broker, *(body("brief") for _ in range(300)))
    worker = make_worker(broker, reg)
    wait_until(
        lambda: worker.loop_once() or worker.counters.total("succeeded") == 300, 20, interval=0
    )
    worker.drain()
    assert worker._near is True and worker._settler.deletes_here is True
    assert all(name == "MainThread" for name in broker.threads[3:-2]), broker.threads


@pytest.mark.parametrize(
    ("url", "here"),
    [
        ("http://127.0.0.1:4566", True),
        ("http://localhost:9324", True),
        ("http://[::1]:4566", True),
        ("https://sqs.eu-west-1.amazonaws.com", False),
        ("http://10.0.0.5:9324", False),
    ],
)
def test_a_broker_at_a_loopback_address_is_on_this_host(url: str, here: bool) -> None:
    from ebsqs.worker.loop import _on_this_host

    class At:
        endpoint_url = url

    assert _on_this_host(At()) is here  # type: ignore[arg-type]
    assert _on_this_host(MemoryBroker()) is True

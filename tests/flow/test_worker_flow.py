"""Flow control in the worker loop, stepped by hand with ``loop_once()`` on the memory broker.

The store is a host store in the test's folder (``EBSQS_FLOW_STORE=sqlite:///...``), read by the
middleware when the worker starts, as in a real worker.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from ebsqs import task
from ebsqs.brokers import OutgoingMessage, QueueSettings
from ebsqs.brokers.memory import MemoryBroker
from ebsqs.config import Settings
from ebsqs.envelope import Envelope, encode
from ebsqs.errors import ConfigurationError
from ebsqs.executors.execution import Job, Outcome, OutcomeKind
from ebsqs.executors.inline import InlineExecutor
from ebsqs.flow.middleware import FlowControl
from ebsqs.flow.store import HostStore
from ebsqs.registry import TaskRegistry
from ebsqs.worker import Worker, WorkerOptions
from tests.clock import FakeClock

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def reg() -> TaskRegistry:
    return TaskRegistry()


@pytest.fixture
def store_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "flow.sqlite3"
    monkeypatch.setenv("EBSQS_FLOW_STORE", f"sqlite:///{path}")
    return path


def make_worker(broker: MemoryBroker, reg: TaskRegistry, **settings: object) -> Worker:
    worker = Worker(
        broker,
        Settings(broker_url="memory://unused", backoff_base=0, **settings),  # type: ignore[arg-type]
        InlineExecutor(registry=reg),
        WorkerOptions(queues=("q",), wait_seconds=0),
        registry=reg,
    )
    worker.start()
    return worker


def put(broker: MemoryBroker, *envelopes: Envelope) -> None:
    broker.ensure_queue("q", QueueSettings(dead_letter_queue="q-dlq", max_receive_count=10))
    for envelope in envelopes:
        broker.send("q", OutgoingMessage(encode(envelope)))


def steps(worker: Worker, n: int = 3) -> None:
    for _ in range(n):
        worker.loop_once()
    assert worker.flush(timeout=10)


def deferrals(logs: list[dict[str, object]]) -> list[object]:
    return [e["delay"] for e in logs if e["event"] == "task_deferred"]


def test_a_rate_limit_defers_each_task_to_its_own_turn(reg: TaskRegistry, store_path: Path) -> None:
    ran: list[int] = []
    task(name="paced", registry=reg, rate_limit="2/s")(ran.append)
    broker = MemoryBroker()
    put(broker, *(Envelope(task="paced", args=(i,)) for i in range(7)))
    worker = make_worker(broker, reg)
    with capture_logs() as logs:
        steps(worker)
    assert len(ran) == 1  # the first runs now; the others wait for their turns
    # Turns 0.5 s apart, each released until its own (whole seconds, rounded up): spread out,
    # not a herd that comes back at once.
    assert deferrals(logs) == [1, 1, 2, 2, 3, 3]
    assert worker.counters.total("deferred") == 6
    assert worker.counters.total("failed") == 0 and broker.stats("q").in_flight == 6


def test_a_full_concurrency_limit_defers_and_any_outcome_gives_the_slot_back(
    reg: TaskRegistry, store_path: Path
) -> None:
    def fail(i: int) -> None:
        raise ValueError(i)

    task(name="single", registry=reg, concurrency_limit=1)(fail)
    store = HostStore(store_path)
    assert store.acquire("running:single", 1, "elsewhere", 60, time.time())
    broker = MemoryBroker()
    put(broker, Envelope(task="single", args=(1,)))
    worker = make_worker(broker, reg)
    with capture_logs() as logs:
        steps(worker)
    assert len(deferrals(logs)) == 1 and 1 <= int(deferrals(logs)[0]) <= 3  # type: ignore[call-overload]
    assert worker.counters.total("failed") == 0
    store.release("running:single", "elsewhere")
    put(broker, Envelope(task="single", args=(2,)))
    steps(worker)
    assert worker.counters.total("failed") == 1  # it ran (and failed: not the limiter's doing)
    # Its lease went back with the failure: another holder gets the only slot.
    assert store.acquire("running:single", 1, "next", 60, time.time())


def test_a_crash_gives_the_slot_back(reg: TaskRegistry, store_path: Path) -> None:
    task(name="single", registry=reg, concurrency_limit=1)(print)
    flow = FlowControl(reg)
    job = Job(key="m1", envelope=Envelope(task="single", args=(1,)), queue="q")
    assert flow.before_start(job).action == "run"
    assert flow.before_start(Job(key="m2", envelope=job.envelope, queue="q")).action == "defer"
    flow.after_outcome(job, Outcome(key="m1", kind=OutcomeKind.CRASHED))
    assert flow.before_start(Job(key="m3", envelope=job.envelope, queue="q")).action == "run"


def test_a_duplicate_of_a_completed_unique_task_is_skipped(
    reg: TaskRegistry, store_path: Path
) -> None:
    ran: list[int] = []
    task(name="once", registry=reg, unique_for=dt.timedelta(minutes=10))(ran.append)
    broker = MemoryBroker()
    first = Envelope(task="once", args=(1,))
    put(broker, first)
    worker = make_worker(broker, reg)
    steps(worker)
    # An outbox relay that crashed after sending and before deleting sends the same envelope.
    put(broker, first, Envelope(task="once", args=(1,)))
    with capture_logs() as logs:
        steps(worker)
    assert ran == [1, 1]  # the second is another task (its own id): the producer's to drop
    assert worker.counters.total("skipped") == 1
    assert [e["task_id"] for e in logs if e["event"] == "task_skipped"] == [first.id]
    assert broker.stats("q").visible == 0 and broker.stats("q").in_flight == 0


def test_a_key_function_that_fails_on_a_message_dead_letters_it(
    reg: TaskRegistry, store_path: Path
) -> None:
    task(name="tenant", registry=reg, rate_limit=("1/s", lambda account_id, **_: account_id))(print)
    broker = MemoryBroker()
    put(broker, Envelope(task="tenant", args=(), kwargs={"other": 1}))
    worker = make_worker(broker, reg)
    steps(worker)
    letters = broker.receive("q-dlq", 10, 0)
    assert len(letters) == 1 and "rate key function failed" in letters[0].attributes["ebsqs-error"]


def test_an_unreachable_store_fails_open(
    reg: TaskRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EBSQS_FLOW_STORE", "redis://127.0.0.1:9/0")  # the discard port
    ran: list[int] = []
    task(name="limited", registry=reg, rate_limit="1/m", concurrency_limit=1)(ran.append)
    broker = MemoryBroker()
    put(broker, *(Envelope(task="limited", args=(i,)) for i in range(3)))
    worker = make_worker(broker, reg)
    with capture_logs() as logs:
        steps(worker)
    assert sorted(ran) == [0, 1, 2]  # the queue keeps moving without its limiter
    warnings = [e for e in logs if e["event"] == "flow_store_unavailable"]
    assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"


def test_a_message_deferred_again_and_again_is_sent_anew_before_its_receives_run_out(
    reg: TaskRegistry, store_path: Path
) -> None:
    ran: list[int] = []
    task(name="single", registry=reg, concurrency_limit=1)(ran.append)
    store = HostStore(store_path)
    assert store.acquire("running:single", 1, "elsewhere", 3600, time.time())
    clock = FakeClock()
    broker = MemoryBroker(clock=clock)
    broker.ensure_queue("q", QueueSettings(dead_letter_queue="q-dlq", max_receive_count=4))
    envelope = Envelope(task="single", args=(1,))
    broker.send("q", OutgoingMessage(encode(envelope)))
    worker = make_worker(broker, reg, max_receive_count=4)
    message_ids = set()
    counts = []
    for _ in range(8):  # far more deferrals than the queue allows receives
        with capture_logs() as logs:
            steps(worker, 1)
        message_ids |= {e["message_id"] for e in logs if e["event"] == "task_deferred"}
        counts += [e for e in logs if e["event"] == "task_deferred"]
        clock.advance(5)
    assert len(counts) == 8 and not ran
    assert len(message_ids) >= 3  # sent anew every second receive (half of 4)
    assert broker.stats("q-dlq").visible == 0
    store.release("running:single", "elsewhere")
    steps(worker, 2)
    assert ran == [1] and broker.stats("q").visible + broker.stats("q").in_flight == 0


def test_a_running_task_s_lease_is_renewed_and_a_silent_one_runs_out(
    reg: TaskRegistry, store_path: Path
) -> None:
    task(name="single", registry=reg, concurrency_limit=1)(print)
    flow = FlowControl(reg)
    job = Job(key="m1", envelope=Envelope(task="single", args=(1,)), queue="q")
    now = time.time()
    assert flow.before_start(job).action == "run"
    store = HostStore(store_path)
    flow._leases.renew(now + 50)  # what the renewal thread does every 20 s
    assert not store.acquire("running:single", 1, "other", 60, now + 100)  # renewed to now+110
    assert store.acquire("running:single", 1, "other", 60, now + 111)  # not renewed since


def test_a_bad_flow_store_stops_the_worker_at_start(
    reg: TaskRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EBSQS_FLOW_STORE", "memcached://nowhere")
    task(name="paced", registry=reg, rate_limit="1/s")(print)
    with pytest.raises(ConfigurationError, match="flow_store"):
        make_worker(MemoryBroker(), reg)


def test_keyed_limits_hold_back_only_their_own_key(reg: TaskRegistry, store_path: Path) -> None:
    ran: list[int] = []
    task(name="tenant", registry=reg, rate_limit=("1/m", lambda account_id, **_: account_id))(
        ran.append
    )
    broker = MemoryBroker()
    put(broker, *(Envelope(task="tenant", args=(account,)) for account in (1, 1, 2, 3, 2)))
    worker = make_worker(broker, reg)
    with capture_logs() as logs:
        steps(worker)
    assert ran == [1, 2, 3]  # each tenant's first call; its second waits a minute, no other's
    assert deferrals(logs) == [60, 60]

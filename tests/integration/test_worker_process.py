"""Acceptance of the single-process worker, with real processes.

Tasks run in real ``ebsqs worker`` subprocesses against a local SQS server over HTTP (and the
SQLite broker); they count their own executions in a file (``tests/fixtures/worker_tasks.py``).
Which server for what: fauxqs for the 1,000-message run (moto's server slows to ~13 msg/s at
that depth), moto for small single-consumer queues.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from ebsqs import MessageTooLargeError, SerializationError
from ebsqs.brokers import OutgoingMessage
from ebsqs.envelope import Envelope, decode, encode
from ebsqs.worker.settle import ATTEMPTS, ERROR, ERROR_TYPE, REASON, SOURCE, TASK
from tests.fixtures import worker_tasks
from tests.integration.processes import Backend
from tests.waiting import wait_until

# -- 2. exactly once ---------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["fauxqs", "sqlite"], indirect=True)
def test_1000_tasks_sent_with_delay_many_each_run_exactly_once(
    backend: Backend, unique_queue: Callable[..., str]
) -> None:
    queue = unique_queue()
    backend.create(queue)
    labels = [f"task-{i}" for i in range(1000)]

    ids = worker_tasks.record.send_with(queue_name=queue).delay_many((label,) for label in labels)

    assert len(set(ids)) == 1000
    with backend.worker(queue) as worker:
        wait_until(
            lambda: len(backend.executions()) >= 1000,
            timeout=90,
            interval=0.2,
            message=lambda: f"{len(backend.executions())} of 1000 ran; {worker.describe()}",
        )
        wait_until(
            lambda: backend.counts(queue) == (0, 0, 0),
            timeout=10,
            message=lambda: f"queue not drained: {backend.counts(queue)}",
        )
        assert worker.stop() == 0, worker.describe()
    assert Counter(backend.executions()) == Counter(labels)
    assert backend.counts(backend.dead_letter_queue(queue)) == (0, 0, 0)
    assert len(worker.events("task_succeeded")) == 1000


# -- 3. retries and dead letters ---------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["moto", "sqlite"], indirect=True)
def test_always_failing_task_runs_three_times_then_is_dead_lettered_once(
    backend: Backend, unique_queue: Callable[..., str]
) -> None:
    queue = unique_queue()
    dead = backend.dead_letter_queue(queue)
    backend.create(queue)

    task_id = worker_tasks.always_fails.send_with(queue_name=queue).delay("doomed")

    with backend.worker(queue) as worker:
        wait_until(
            lambda: backend.counts(dead)[0] == 1 and backend.counts(queue) == (0, 0, 0),
            timeout=30,
            message=lambda: (
                f"dlq {backend.counts(dead)}, queue {backend.counts(queue)}; {worker.describe()}"
            ),
        )
        assert worker.stop() == 0, worker.describe()
    assert backend.executions() == [f"doomed attempt={n}" for n in (1, 2, 3)]
    [letter] = backend.dead_letters(queue)
    assert letter.attributes[REASON] == "retries exhausted"
    assert letter.attributes[ERROR_TYPE] == "tests.fixtures.worker_tasks.Boom"
    assert letter.attributes[ERROR] == "always fails: doomed"
    assert letter.attributes[ATTEMPTS] == "3"
    assert letter.attributes[TASK] == worker_tasks.always_fails.name
    assert letter.attributes[SOURCE] == backend.settings.physical_queue(queue)
    envelope = decode(letter.body)
    assert (envelope.id, envelope.attempt, envelope.args) == (task_id, 3, ("doomed",))
    assert backend.counts(queue) == (0, 0, 0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["moto", "sqlite"], indirect=True)
def test_task_failing_once_runs_twice_and_leaves_nothing_behind(
    backend: Backend, unique_queue: Callable[..., str]
) -> None:
    queue = unique_queue()
    dead = backend.dead_letter_queue(queue)
    backend.create(queue)

    worker_tasks.fails_once.send_with(queue_name=queue).delay("flaky")

    with backend.worker(queue) as worker:
        wait_until(
            lambda: len(worker.events("task_succeeded")) == 1,
            timeout=30,
            message=worker.describe,
        )
        wait_until(
            lambda: backend.counts(queue) == (0, 0, 0),
            timeout=10,
            message=lambda: f"queue not drained: {backend.counts(queue)}",
        )
        assert worker.stop() == 0, worker.describe()
    assert backend.executions() == ["flaky attempt=1", "flaky attempt=2"]
    assert backend.counts(queue) == (0, 0, 0)
    assert backend.counts(dead) == (0, 0, 0)
    [retried] = worker.events("task_retried")
    assert retried["error_type"] == "tests.fixtures.worker_tasks.Boom"


# -- 4. bodies that must never run -------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["moto", "sqlite"], indirect=True)
def test_untrusted_bodies_are_dead_lettered_and_never_run_or_imported(
    backend: Backend, unique_queue: Callable[..., str], tmp_path: Path
) -> None:
    queue = unique_queue()
    physical = backend.settings.physical_queue(queue)
    backend.create(queue)
    pwned = Path(f"/tmp/pwned-{uuid.uuid4().hex}")
    canary = tmp_path / "canary-imported"
    legacy = {
        "id": str(uuid.uuid4()),
        "groupId": None,
        "queue": None,
        "kwargs": {},
        "maxRetries": 1,
        "retry": 0,
        "retryId": None,
        "pickle": False,
    }
    bodies = {
        "malformed": '{"v": 1, "task": ',
        # Importable and already imported by the worker, but not a registered task.
        "unregistered": encode(
            Envelope(task="tests.fixtures.worker_tasks._record", args=("unregistered ran",))
        ),
        "shell": json.dumps({**legacy, "func": "subprocess.getoutput", "args": [f"touch {pwned}"]}),
        "import": json.dumps({**legacy, "func": "tests.fixtures.import_canary.run", "args": []}),
    }
    for body in bodies.values():
        backend.broker.send(physical, OutgoingMessage(body))
    worker_tasks.record.send_with(queue_name=queue).delay("sentinel")

    try:
        with backend.worker(queue, IMPORT_CANARY_FILE=str(canary)) as worker:
            wait_until(
                lambda: (
                    len(worker.events("message_rejected")) == 4
                    and backend.executions() == ["sentinel"]
                    and backend.counts(queue) == (0, 0, 0)
                ),
                timeout=30,
                message=lambda: f"queue {backend.counts(queue)}; {worker.describe()}",
            )
            assert worker.stop() == 0, worker.describe()
        assert not pwned.exists(), "subprocess.getoutput ran"
        assert not canary.exists(), "a module named by a message was imported"
        assert backend.executions() == ["sentinel"]
        letters = {letter.body: letter.attributes for letter in backend.dead_letters(queue)}
        assert sorted(letters) == sorted(bodies.values())
        assert {a[REASON] for a in letters.values()} == {"rejected"}
        assert letters[bodies["malformed"]][ERROR_TYPE] == "EnvelopeError"
        for kind in ("unregistered", "shell", "import"):
            assert letters[bodies[kind]][ERROR_TYPE] == "UnknownTaskError", kind
        assert "subprocess.getoutput" in letters[bodies["shell"]][ERROR]
    finally:
        pwned.unlink(missing_ok=True)


# -- 5. refused at .delay() --------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", ["moto"], indirect=True)
def test_unsendable_arguments_fail_at_delay_and_send_nothing(
    backend: Backend, unique_queue: Callable[..., str]
) -> None:
    queue = unique_queue()
    backend.create(queue)
    physical = backend.settings.physical_queue(queue)
    bound = worker_tasks.record.send_with(queue_name=queue)

    with pytest.raises(SerializationError, match=r"positional argument 0 cannot be sent as JSON"):
        bound.delay(dt.datetime.now())  # type: ignore[arg-type]
    with pytest.raises(SerializationError, match=r"argument 'label'.*datetime"):
        bound.delay(label=dt.datetime.now())  # type: ignore[arg-type]
    with pytest.raises(MessageTooLargeError) as too_large:
        bound.delay("x" * (2 * 1024 * 1024))
    # One bad call in a batch: the good ones are not sent either.
    with pytest.raises(SerializationError):
        bound.delay_many([("fine",), (dt.datetime.now(),)])

    error = too_large.value
    assert error.limit == 1024 * 1024  # the queue's MaximumMessageSize, read from it
    assert "MaximumMessageSize of SQS queue" in error.source
    assert error.size > 2 * 1024 * 1024
    assert f"{error.size} bytes" in str(error) and f"{error.limit} bytes" in str(error)
    assert backend.counts(physical) == (0, 0, 0)


# -- 6. SIGTERM --------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["moto", "sqlite"], indirect=True)
def test_sigterm_finishes_the_running_task_and_releases_prefetched_messages(
    backend: Backend, unique_queue: Callable[..., str]
) -> None:
    queue = unique_queue()
    backend.create(queue)
    physical = backend.settings.physical_queue(queue)
    worker_tasks.slow.send_with(queue_name=queue).delay_many((f"slow-{i}", 3.0) for i in range(6))

    # A visibility timeout of 60 s: only an explicit release can make messages visible soon.
    with backend.worker(queue, "--visibility-timeout", "60") as worker:
        started = wait_until(
            lambda: [line for line in backend.executions() if line.startswith("start ")],
            timeout=20,
            message=worker.describe,
        )
        worker.terminate()
        assert worker.wait(timeout=15) == 0, worker.describe()
        counts_at_exit = backend.counts(physical)

    label = started[0].removeprefix("start ")
    assert backend.executions() == [f"start {label}", f"done {label}"]
    assert counts_at_exit == (5, 0, 0)
    assert len(worker.events("task_succeeded")) == 1
    released = worker.events("messages_released")
    assert sum(e["count"] for e in released if e["reason"] == "draining") == 5, released


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["fauxqs", "sqlite"], indirect=True)
def test_sigterm_lets_a_long_poll_finish_and_releases_what_it_brings(
    backend: Backend, unique_queue: Callable[..., str]
) -> None:
    """Messages a poll brings after SIGTERM are released at once, not left to wait out their
    visibility timeout (30.6 s was seen for a poll cut short); the stop waits at most --wait."""
    queue = unique_queue()
    backend.create(queue)
    physical = backend.settings.physical_queue(queue)
    with backend.worker(queue, "--wait", "5", "--visibility-timeout", "60") as worker:
        wait_until(lambda: worker.events("worker_started"), timeout=20, message=worker.describe)
        started = time.monotonic()
        worker.terminate()
        # Sent while the idle worker's poll is outstanding: the poll returns them.
        worker_tasks.record.send_with(queue_name=queue).delay_many([("late",)] * 5)
        code = worker.wait(timeout=15)
        took = time.monotonic() - started
    assert code == 0, worker.describe()
    assert took < 5 + 3, f"the stop took {took:.1f} s"
    assert backend.executions() == []
    released = worker.events("messages_released")
    assert sum(e["count"] for e in released if e["reason"] == "draining") == 5, released
    found = wait_until(
        lambda: backend.broker.receive(physical, 10, wait_seconds=1, visibility_timeout=60), 10
    )
    assert len(found) + len(backend.broker.receive(physical, 10, 1, 60)) == 5

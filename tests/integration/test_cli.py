"""The ``ebsqs`` command line, run as real processes against moto's server and SQLite.

Mistakes (bad flags, unknown queues) get a one-line ``Error:`` and a non-zero exit, never a
traceback; ``queues create``, ``dlq redrive``, ``dlq peek`` and ``send`` do what they say.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections import Counter
from collections.abc import Callable

import pytest

from ebsqs.brokers import OutgoingMessage
from ebsqs.brokers.sqs import SQSBroker
from ebsqs.worker.settle import ERROR, ERROR_TYPE, REASON
from tests.integration.processes import APP, Backend

RECORD = "tests.fixtures.worker_tasks.record"


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, says: str) -> None:
    """Exit ``code``; stderr is one ``Error:`` line saying ``says``.

    Besides it, stderr may hold click's usage hint and the worker's JSON log lines, nothing else.
    """
    stderr = result.stderr
    assert result.returncode == code, f"exit {result.returncode}\n{stderr}"
    assert "Traceback" not in stderr + result.stdout, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and not _is_log_line(line)]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1, stderr
    assert says in errors[0], stderr
    assert all(line.startswith(("Usage: ", "Try ")) for line in lines if line not in errors), stderr


def _is_log_line(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


# -- mistakes ----------------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["worker", "--bogus"], 2, "No such option"),
        (["worker", "--app", APP], 2, "Missing option '--queues'"),
        (["worker", "--queues", "q", "--concurrency", "0"], 2, "'--concurrency'"),
        (["worker", "--queues", "q", "--wait", "21"], 2, "'--wait'"),
        (["worker", "--queues", "q", "--executor", "nope"], 1, "unknown executor 'nope'"),
        (["worker", "--queues", "q", "--broker", "redis://x"], 1, "unknown broker URL"),
        (["worker", "--queues", "q", "--app", "no_such_module"], 3, "no_such_module"),
        (["send", RECORD, "--args", "{"], 2, "--args: not JSON"),
        (["send", RECORD, "--kwargs", "[]"], 2, "--kwargs: must be a JSON dict"),
        (["send", "no.such.task", "--app", APP], 2, "no task 'no.such.task'"),
        (["queues", "frobnicate"], 2, "No such command 'frobnicate'"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else None,
)
def test_bad_flags_give_a_one_line_error_and_no_traceback(
    backend: Backend, args: list[str], code: int, says: str
) -> None:
    assert_one_line_error(backend.run(*args), code, says)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", ["moto", "sqlite"], indirect=True)
@pytest.mark.parametrize(
    "command",
    [
        ["queues", "stats", "{queue}"],
        ["queues", "purge", "{queue}", "--yes"],
        ["dlq", "redrive", "{queue}"],
        ["dlq", "peek", "{queue}"],
        ["worker", "--app", APP, "--queues", "{queue}"],
    ],
    ids=lambda command: " ".join(command[:2]),
)
def test_unknown_queues_give_a_one_line_error(
    backend: Backend, unique_queue: Callable[..., str], command: list[str]
) -> None:
    queue = unique_queue()
    args = [part.format(queue=queue) for part in command]

    # Workers create missing queues unless told not to.
    result = backend.run(*args, EBSQS_AUTO_CREATE_QUEUES="false")

    assert_one_line_error(result, 1, "does not exist")
    assert result.stdout == ""
    assert queue not in backend.broker.list_queues(queue)


# -- queues and dead letters -------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", ["moto"], indirect=True)
def test_queues_create_makes_the_queue_and_its_dead_letter_queue_with_redrive(
    backend: Backend, unique_queue: Callable[..., str]
) -> None:
    queue = unique_queue()

    result = backend.run("queues", "create", queue)

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{queue} (dead letters: {queue}-dlq)\n"
    assert backend.broker.list_queues(queue) == [queue, f"{queue}-dlq"]
    assert isinstance(backend.broker, SQSBroker)
    client = backend.broker.client
    dlq_url = client.get_queue_url(QueueName=f"{queue}-dlq")["QueueUrl"]
    dlq_arn = client.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    url = client.get_queue_url(QueueName=queue)["QueueUrl"]
    attributes = client.get_queue_attributes(QueueUrl=url, AttributeNames=["RedrivePolicy"])
    policy = json.loads(attributes["Attributes"]["RedrivePolicy"])
    assert policy["deadLetterTargetArn"] == dlq_arn
    assert int(policy["maxReceiveCount"]) == backend.settings.max_receive_count
    # Creating again is harmless.
    assert backend.run("queues", "create", queue).returncode == 0


@pytest.mark.timeout(30)
def test_queues_create_on_sqlite_lists_both_queues(
    backend: Backend, unique_queue: Callable[..., str]
) -> None:
    queue = unique_queue()

    assert backend.run("queues", "create", queue).returncode == 0

    listed = backend.run("queues", "list", "--prefix", queue)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == [queue, f"{queue}-dlq"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", ["moto", "sqlite"], indirect=True)
def test_dlq_redrive_moves_dead_letters_back(
    backend: Backend, unique_queue: Callable[..., str]
) -> None:
    queue = unique_queue()
    dead = backend.dead_letter_queue(queue)
    backend.create(queue)
    bodies = [f"dead letter {i}" for i in range(3)]
    backend.broker.send_batch(dead, [OutgoingMessage(body) for body in bodies])

    first = backend.run("dlq", "redrive", queue, "--max", "2")
    rest = backend.run("dlq", "redrive", queue)

    assert first.returncode == 0 and rest.returncode == 0, first.stderr + rest.stderr
    assert first.stdout == f"moved 2 message(s) from {dead} to {queue}\n"
    assert rest.stdout == f"moved 1 message(s) from {dead} to {queue}\n"
    assert backend.counts(dead) == (0, 0, 0)
    moved = backend.broker.receive(queue, 10, wait_seconds=0)
    assert sorted(message.body for message in moved) == bodies


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", ["moto"], indirect=True)
def test_dlq_peek_shows_why_and_leaves_the_dead_letters(
    backend: Backend, unique_queue: Callable[..., str]
) -> None:
    queue = unique_queue()
    dead = backend.dead_letter_queue(queue)
    backend.create(queue)
    attributes = {REASON: "retries exhausted", ERROR_TYPE: "app.Boom", ERROR: "it broke"}
    [message_id] = backend.broker.send_batch(dead, [OutgoingMessage("{}", attributes=attributes)])

    result = backend.run("dlq", "peek", queue)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(message_id)
    assert "reason=retries exhausted" in result.stdout
    assert "error=app.Boom: it broke" in result.stdout
    assert backend.counts(dead) == (1, 0, 0)


# -- send --------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["moto", "sqlite"], indirect=True)
def test_send_by_task_name_is_run_by_a_worker(
    backend: Backend, unique_queue: Callable[..., str]
) -> None:
    queue = unique_queue()
    backend.create(queue)

    # With --app the task is looked up (and its signature applies); without, the name is sent.
    with_app = backend.run("send", RECORD, "--app", APP, "--args", '["with app"]', "--queue", queue)
    by_name = backend.run("send", RECORD, "--kwargs", '{"label": "by name"}', "--queue", queue)

    assert with_app.returncode == 0 and by_name.returncode == 0, with_app.stderr + by_name.stderr
    task_ids = {with_app.stdout.strip(), by_name.stdout.strip()}
    assert all(uuid.UUID(task_id) for task_id in task_ids)
    assert backend.counts(queue) == (2, 0, 0)
    with backend.worker(queue, "--max-tasks", "2") as worker:
        assert worker.wait(timeout=30) == 0, worker.describe()
    assert Counter(backend.executions()) == Counter(["with app", "by name"])
    assert {event["task_id"] for event in worker.events("task_succeeded")} == task_ids
    assert backend.counts(queue) == (0, 0, 0)


@pytest.mark.timeout(30)
def test_send_with_delay_is_not_visible_at_once(
    backend: Backend, unique_queue: Callable[..., str]
) -> None:
    queue = unique_queue()
    backend.create(queue)

    result = backend.run("send", RECORD, "--args", '["later"]', "--delay", "60", "--queue", queue)

    assert result.returncode == 0, result.stderr
    assert backend.counts(queue) == (0, 0, 1)
    assert backend.broker.receive(queue, 10, wait_seconds=0) == []

"""The ``ebsqs`` command line, run as real processes against moto's server and SQLite.

Mistakes (bad flags, unknown queues) get a one-line ``Error:`` and a non-zero exit, never a
traceback; ``queues create``, ``dlq redrive``, ``dlq peek`` and ``send`` do what they say.
"""

from __future__ import annotations

import json
import signal
import subprocess
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from ebsqs.brokers import OutgoingMessage, from_url
from ebsqs.brokers.sqs import SQSBroker
from ebsqs.envelope import decode
from ebsqs.worker.settle import ERROR, ERROR_TYPE, REASON
from tests import servers
from tests.integration.processes import APP, EBSQS, Backend
from tests.waiting import wait_until

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
        (
            ["worker", "--queues", "q", "--time-limit", "60", "--soft-time-limit", "90"],
            2,
            "--soft-time-limit: the soft limit (90 s) is over the hard limit (60 s",
        ),
        (
            [
                "supervise",
                "--queues",
                "q",
                "--time-limit",
                "a=60,*=600",
                "--soft-time-limit",
                "a=90",
            ],
            2,
            "the soft limit for queue a (90 s) is over the hard limit (60 s",
        ),
        (["worker", "--queues", "q", "--time-limit", "soon"], 2, "'--time-limit'"),
        (["systemd-unit", "--app", APP], 2, "the unit names no queues"),
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


@pytest.mark.timeout(60)
def test_send_reaches_the_broker_its_flag_names(
    moto_server: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    unique_queue: Callable[..., str],
) -> None:
    """``--broker sqs://`` for a registered task: the message is on SQS, not in ./ebsqs.sqlite3."""
    servers.apply_sqs_env(monkeypatch, moto_server)
    queue = unique_queue()
    broker = from_url("sqs://")
    broker.ensure_queue(queue)
    # No EBSQS_* setting at all: only the flag can point the command at SQS.
    env = {k: v for k, v in servers.subprocess_env(moto_server).items() if "EBSQS" not in k}
    env["PYTHONPATH"] = str(servers.ROOT)  # --app imports the fixtures from the checkout
    args = ["send", RECORD, "--app", APP, "--broker", "sqs://", "--queue", queue]

    result = subprocess.run(
        [*EBSQS, *args, "--args", '["over sqs"]'],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    task_id = result.stdout.strip()
    [message] = wait_until(
        lambda: broker.receive(queue, 10, wait_seconds=1), 20, message="nothing arrived"
    )
    envelope = decode(message.body)
    assert (envelope.id, envelope.task, envelope.args) == (task_id, RECORD, ("over sqs",))
    assert not (tmp_path / "ebsqs.sqlite3").exists()
    assert list(tmp_path.iterdir()) == []


def blocked(tmp_path: Path, name: str) -> str:
    """A path under a regular file: no one (not even root) can create it."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    return str(blocker / name)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("flag", ["--pidfile", "--status-file"])
def test_supervise_refuses_an_unwritable_pidfile_or_status_file_at_start(
    backend: Backend, tmp_path: Path, flag: str
) -> None:
    path = blocked(tmp_path, "ebsqs.pid" if flag == "--pidfile" else "status.json")

    result = backend.run("supervise", "--app", APP, "--queues", "q", flag, path)

    assert_one_line_error(result, 2, f"{flag}: cannot write {path}: Not a directory")
    assert "master_started" not in result.stderr  # refused before anything started


class Supervisor:
    """An ``ebsqs supervise`` subprocess writing JSON log lines to a file."""

    def __init__(self, backend: Backend, *args: str) -> None:
        self.log_path = backend.tmp_path / "supervise.log"
        status_file = str(backend.tmp_path / "status.json")
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [*EBSQS, "supervise", "--log-format", "json", "--status-file", status_file, *args],
                cwd=servers.ROOT,
                env=backend.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def events(self) -> list[str]:
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                found.append(json.loads(line).get("event"))
            except (ValueError, AttributeError):
                continue
        return found

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=20)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("app", [[], ["--app", APP]], ids=["without app", "with app"])
def test_supervise_without_app_warns(backend: Backend, app: list[str]) -> None:
    supervisor = Supervisor(backend, *app, "--queues", "q", "--workers", "1", "--wait", "1")
    try:
        events = wait_until(
            lambda: "supervisor_ready" in supervisor.events() and supervisor.events(),
            30,
            message=lambda: supervisor.log_path.read_text(),
        )
    finally:
        assert supervisor.stop() == 0
    assert ("app_not_given" in events) is (not app)

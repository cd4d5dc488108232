"""Errors at boot that no restart can fix stop the supervisor: exit code 3, one line.

A refused identity or permission on SQS, and a damaged SQLite file, are met by the queue check
in ``Worker.start``. They must come out as one of the child's boot errors (``BOOT_ERRORS``), so
the child exits with ``ExitCode.BOOT`` and the master stops instead of restarting children
forever. SQS refusals are crafted in-process with botocore's ``before-send`` hook (no emulator
checks credentials); the damaged files are real files on disk.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ebsqs import executors
from ebsqs.brokers import Broker
from ebsqs.brokers.base import QueueSettings
from ebsqs.brokers.sqlite import SQLiteBroker
from ebsqs.brokers.sqs import SQSBroker
from ebsqs.config import Settings
from ebsqs.errors import BrokerAccessDenied, BrokerDamaged, ExitCode
from ebsqs.supervisor.child import BOOT_ERRORS
from ebsqs.worker import Worker, WorkerOptions
from tests.fixtures import boot_damage
from tests.integration.processes import EBSQS, sqlite_env
from tests.integration.test_sqs_broker import Hook, crafted_refusal
from tests.servers import ROOT

DAMAGES = {"not-a-database": boot_damage.not_a_database, "malformed": boot_damage.malformed}


def start_worker(broker: Broker, queue: str, **settings: bool) -> None:
    """Build a worker on ``queue`` and start it, as a child does at boot."""
    worker = Worker(
        broker,
        Settings(**settings),
        executors.create("inline", 1),
        WorkerOptions(queues=(queue,), wait_seconds=0),
    )
    worker.start()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("refused", "json_type", "query_code"),
    [
        ("GetQueueAttributes", "AccessDeniedException", "AccessDenied"),
        ("GetQueueAttributes", "UnrecognizedClientException", "InvalidClientTokenId"),
        ("CreateQueue", "AccessDeniedException", "AccessDenied"),
    ],
    ids=["stats-denied", "unknown-key", "create-denied"],
)
def test_sqs_refusal_at_start_is_a_boot_error(
    sqs_env: str,
    unique_queue: Callable[..., str],
    refused: str,
    json_type: str,
    query_code: str,
) -> None:
    queue = unique_queue()
    broker = SQSBroker()
    if refused != "CreateQueue":
        broker.ensure_queue(queue, QueueSettings())  # it exists: the check asks for its stats
    hook = Hook(broker, refused, lambda _: crafted_refusal(json_type, query_code))

    with pytest.raises(BOOT_ERRORS) as raised:
        start_worker(broker, queue, auto_create_queues=True)

    assert isinstance(raised.value, BrokerAccessDenied)
    assert len(hook.requests) == 1
    broker.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_sqlite_file_at_start_is_a_boot_error(tmp_path: Path, damage: str) -> None:
    path = DAMAGES[damage](tmp_path / "broker.db")
    before = path.read_bytes()
    broker = SQLiteBroker(str(path))

    with pytest.raises(BOOT_ERRORS) as raised:
        start_worker(broker, "q", auto_create_queues=True)

    assert isinstance(raised.value, BrokerDamaged)
    assert str(path) in str(raised.value)
    broker.close()
    # Left as it was for whoever recovers it (opening may switch the header to WAL mode).
    assert path.read_bytes()[boot_damage.PAGE :] == before[boot_damage.PAGE :]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("damage", DAMAGES)
def test_supervise_on_a_damaged_sqlite_file_stops_with_exit_code_3(
    tmp_path: Path, damage: str
) -> None:
    path = DAMAGES[damage](tmp_path / "broker.db")
    started = time.monotonic()

    done = subprocess.run(
        [
            *EBSQS,
            "supervise",
            "--queues",
            "q",
            "--workers",
            "1",
            "--log-format",
            "json",
            "--status-file",
            str(tmp_path / "status.json"),
        ],
        cwd=ROOT,
        env=sqlite_env(path),
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )

    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    names = [event["event"] for event in events]
    assert done.returncode == ExitCode.BOOT, done.stderr[-2000:]
    assert time.monotonic() - started < 10
    [failure] = [event for event in events if event["event"] == "child_boot_failed"]
    assert failure["error_type"] == "BrokerDamaged"
    assert str(path) in failure["error"]
    assert "\n" not in failure["error"] and "exception" not in failure  # one line, no traceback
    assert "child_restarted" not in names

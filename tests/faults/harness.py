"""The fault suite's rig: fauxqs behind the chaos proxy, real ``ebsqs`` processes, the ledger.

The processes talk to SQS through the proxy; the test itself (creating queues, sending, reading
the dead-letter queue) talks to fauxqs directly, so a fault it programs never hides the evidence.
Processes are started with :mod:`tests.integration.processes`' environment helpers, each in a
session of its own so cleanup kills its whole tree, and nothing else, by its process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from ebsqs.brokers import OutgoingMessage, QueueSettings, ReceivedMessage
from ebsqs.brokers.base import is_fifo
from ebsqs.brokers.sqs import SQSBroker
from ebsqs.config import Settings
from ebsqs.envelope import Envelope, decode, encode
from ebsqs.errors import EnvelopeError
from ebsqs.task import Task
from tests import servers
from tests.faults.ledger import Ledger
from tests.faults.proxy import ChaosProxy
from tests.fixtures import ledger_tasks
from tests.integration.processes import EBSQS, WorkerProcess, sqs_env
from tests.waiting import wait_until

APP = "tests.fixtures.ledger_tasks"
NOOP = ledger_tasks.noop
SLEEP = ledger_tasks.sleep
POISON = ledger_tasks.poison
HOG = ledger_tasks.hog
HOG_FOREVER = ledger_tasks.hog_forever
LEAK = ledger_tasks.leak
LIMITED = ledger_tasks.limited
#: Messages a worker may hold beyond what runs (one receive batch), and the most finished
#: tasks one crash may leave undeleted: the bound on extra runs per kill.
BATCH = 10


def keys(prefix: str, count: int) -> list[str]:
    """``count`` ledger keys: ``prefix0000``, ``prefix0001``..."""
    return [f"{prefix}{i:04}" for i in range(count)]


class EbsqsProcess(WorkerProcess):
    """``ebsqs supervise`` or ``ebsqs worker`` in a session of its own; output to ``log_path``.

    Leaving the ``with`` block (or :meth:`kill_all`) SIGKILLs the process group it leads, so
    children orphaned by a killed master go too.
    """

    def __init__(
        self, command: str, args: Sequence[str], env: dict[str, str], log_path: Path
    ) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [*EBSQS, command, "--log-format", "json", *args],
            cwd=servers.ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.process.pid

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill what is left of the process group and close the log."""
        self.kill_all()
        self._log.close()

    def kill_all(self) -> None:
        """SIGKILL the process group this process leads (only it and what it started)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def children(self) -> list[int]:
        """Pids of this process's live children (a master's workers)."""
        try:
            found = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        return [child.pid for child in found if _alive(child.pid)]

    def group(self) -> list[int]:
        """Live pids of this process's session (it, its children, their pool processes)."""
        members = []
        for process in psutil.process_iter(["pid"]):
            with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
                if os.getsid(process.pid) == self.pid and _alive(process.pid):
                    members.append(process.pid)
        return members


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


@dataclass
class DeadLetters:
    """Every letter of a dead-letter queue, received once each and held in flight for 10 min."""

    broker: SQSBroker
    queue: str
    letters: dict[str, ReceivedMessage] = field(default_factory=dict)

    def poll(self) -> dict[str, ReceivedMessage]:
        """Receive what arrived since the last poll; return every letter, by message id."""
        while batch := self.broker.receive(self.queue, 10, wait_seconds=0, visibility_timeout=600):
            for message in batch:
                self.letters[message.message_id] = message
        return dict(self.letters)

    def by_key(self) -> dict[str, ReceivedMessage]:
        """Every letter whose body names a ledger key, by key (hostile bodies name none)."""
        found = {}
        for message in self.poll().values():
            with contextlib.suppress(EnvelopeError, IndexError):
                found[key_of(message)] = message
        return found

    def keys(self) -> set[str]:
        return set(self.by_key())


def key_of(message: ReceivedMessage) -> str:
    """The ledger key a message carries (its first argument)."""
    return str(decode(message.body).args[0])


@dataclass
class Rig:
    """One test's fauxqs queue, chaos proxy, ledger and processes.

    Attributes:
        broker: a client straight to fauxqs, for the test's own sends and checks.
        proxy: the chaos proxy the processes talk through.
        queue: the queue under test (its dead-letter queue is ``queue + "-dlq"``).
        ledger: what the tasks wrote.
    """

    broker: SQSBroker
    proxy: ChaosProxy
    queue: str
    tmp_path: Path
    ledger: Ledger
    started: list[EbsqsProcess] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)
    dead_letters: DeadLetters = field(init=False)

    def __post_init__(self) -> None:
        self.dead_letters = DeadLetters(self.broker, self.dead_letter_queue)

    @property
    def dead_letter_queue(self) -> str:
        """The queue's dead-letter queue (``q-dlq``, or ``q-dlq.fifo`` for ``q.fifo``)."""
        return Settings().dead_letter_queue_of_physical(self.queue)

    def create(self, visibility: int = 30, max_receive_count: int = 10) -> None:
        """Create the queue and its dead-letter queue with a redrive policy."""
        self.broker.ensure_queue(
            self.queue,
            QueueSettings(
                visibility_timeout=visibility,
                dead_letter_queue=self.dead_letter_queue,
                max_receive_count=max_receive_count,
                fifo=is_fifo(self.queue),
            ),
        )

    def env(self, endpoint: str | None = None, **extra: str) -> dict[str, str]:
        """A process environment: SQS through the proxy (or ``endpoint``), the ledger named,
        retries without backoff."""
        return sqs_env(
            endpoint or self.proxy.endpoint,
            **{ledger_tasks.LEDGER_ENV: str(self.ledger.path), "EBSQS_BACKOFF_BASE": "0"},
            **extra,
        )

    def start(
        self, command: str, *flags: str, endpoint: str | None = None, **env: str
    ) -> EbsqsProcess:
        """Start ``ebsqs supervise`` / ``ebsqs worker`` on the queue (1-second long polls)."""
        number = len(self.started) + 1
        process = EbsqsProcess(
            command,
            ["--app", APP, "--queues", self.queue, "--wait", "1", *flags],
            self.env(endpoint, **env),
            self.tmp_path / f"{command}-{number}.log",
        )
        self.started.append(process)
        return process

    def send(self, keys: Iterable[str], task: Task[..., Any] = NOOP, **kwargs: Any) -> list[str]:
        """Send one message per key (``task(key, **kwargs)``), ten per request; return them.

        The envelopes carry the task's name and ``max_retries``, as ``task.delay`` would.
        """
        keys = list(keys)
        retries = task.max_retries or 0  # None: the default, which is no retry
        bodies = [
            encode(Envelope(task=task.name, args=(key,), kwargs=kwargs, max_retries=retries))
            for key in keys
        ]
        for start in range(0, len(bodies), 10):
            batch = [OutgoingMessage(body) for body in bodies[start : start + 10]]
            self.broker.send_batch(self.queue, batch)
        self.sent += keys
        return keys

    def lost(self) -> set[str]:
        return self.ledger.lost(self.sent, self.dead_letters.keys())

    def wait_settled(self, timeout: float) -> None:
        """Wait until every key sent finished or was dead-lettered."""
        wait_until(
            lambda: not self.lost(),
            timeout,
            interval=0.1,
            message=lambda: self.describe(),
        )

    def wait_finished(self, count: int, timeout: float) -> None:
        """Wait until at least ``count`` finish lines are in the ledger."""
        wait_until(
            lambda: len(self.ledger.entries("finish")) >= count,
            timeout,
            interval=0.05,
            message=lambda: self.describe(),
        )

    def describe(self) -> str:
        """The ledger's summary and each process's last lines, for failure messages."""
        parts = [self.ledger.summary(self.sent, self.dead_letters.keys())]
        parts += [f"requests: {dict(self.proxy.requests)}"]
        parts += [process.describe() for process in self.started]
        return "\n".join(parts)

    def close(self) -> None:
        for process in self.started:
            process.close()

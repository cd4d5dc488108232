"""Running ``ebsqs`` commands as real processes from tests, against a broker both share.

Commands run as ``python -m ebsqs`` from the checkout's root, so ``--app tests.fixtures.x``
imports the test fixtures. Environments are built from scratch for each process: the current
one without ``EBSQS_*`` or AWS variables that could redirect it, plus what the test names.
:func:`open_backend` points this process (producer calls, checks) and the subprocesses at the
same broker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import pytest

from ebsqs import producer
from ebsqs.brokers import Broker, ReceivedMessage, from_url
from ebsqs.config import Settings, load_settings
from tests import servers
from tests.fixtures import worker_tasks

EBSQS = (sys.executable, "-m", "ebsqs")
#: The fixture app of the worker tests (see ``tests/fixtures/worker_tasks.py``).
APP = "tests.fixtures.worker_tasks"


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without ``EBSQS_*`` settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EBSQS_")}
    return {**env, **extra}


def sqs_env(endpoint: str, **extra: str) -> dict[str, str]:
    """An environment that points ``ebsqs`` (``sqs://``) at a local SQS server."""
    return {**clean_env(), **servers.subprocess_env(endpoint), **extra}


def sqlite_env(path: Path, **extra: str) -> dict[str, str]:
    """An environment that points ``ebsqs`` at a SQLite broker file (an absolute path)."""
    return clean_env(EBSQS_BROKER_URL=f"sqlite:///{path.resolve()}", **extra)


def run_ebsqs(
    *args: str, env: dict[str, str], timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run one ``ebsqs`` command to completion; capture its output as text."""
    return subprocess.run(
        [*EBSQS, *args],
        cwd=servers.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class WorkerProcess:
    """An ``ebsqs worker`` subprocess; its stdout and stderr go to ``log_path``.

    Use it as a context manager: leaving the block kills the process if it still runs (only
    this process, by its pid).
    """

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        self.process = subprocess.Popen(
            [*EBSQS, "worker", "--log-format", "json", *args],
            cwd=servers.ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self._log.close()

    def terminate(self) -> None:
        """Send SIGTERM (a graceful drain)."""
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        """The exit code, waiting up to ``timeout`` seconds for it."""
        return self.process.wait(timeout=timeout)

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM, then the exit code."""
        self.terminate()
        return self.wait(timeout)

    def output(self) -> str:
        """Everything the process wrote so far (it writes to the file directly)."""
        return self.log_path.read_text(errors="replace")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines written so far (those named ``name`` if given)."""
        found = []
        for line in self.output().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and (name is None or event.get("event") == name):
                found.append(event)
        return found

    def describe(self) -> str:
        """The exit status and the last lines of output, for failure messages."""
        tail = "\n".join(self.output().splitlines()[-20:])
        return f"worker exit code {self.process.poll()}; last output:\n{tail}"


@dataclass
class Backend:
    """A broker both this process (producer, checks) and worker subprocesses use."""

    name: str
    env: dict[str, str]
    broker: Broker
    settings: Settings
    tmp_path: Path

    @property
    def record_file(self) -> Path:
        return self.tmp_path / "record.txt"

    def executions(self) -> list[str]:
        """Lines the tasks recorded, one per execution."""
        if not self.record_file.exists():
            return []
        return self.record_file.read_text().splitlines()

    def create(self, queue: str) -> None:
        """Create the queue and its dead-letter queue, as ``ebsqs queues create`` does."""
        producer.ensure_queue(self.broker, self.settings, self.settings.physical_queue(queue))

    def dead_letter_queue(self, queue: str) -> str:
        return self.settings.dead_letter_queue(queue)

    def counts(self, queue: str) -> tuple[int, int, int]:
        """(visible, in flight, delayed) of a physical queue."""
        stats = self.broker.stats(queue)
        return stats.visible, stats.in_flight, stats.delayed

    def worker(self, queue: str, *flags: str, **env: str) -> WorkerProcess:
        """Start ``ebsqs worker`` on ``queue`` (retries without backoff, 1 s long polls)."""
        return WorkerProcess(
            ["--app", APP, "--queues", queue, "--wait", "1", *flags],
            {
                **self.env,
                worker_tasks.RECORD_ENV: str(self.record_file),
                "EBSQS_BACKOFF_BASE": "0",
                **env,
            },
            self.tmp_path / "worker.log",
        )

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """Run one ``ebsqs`` command against this broker, to completion."""
        return run_ebsqs(*args, env={**self.env, **env})

    def dead_letters(self, queue: str) -> list[ReceivedMessage]:
        """Every message in ``queue``'s dead-letter queue (left in flight for a minute)."""
        found: list[ReceivedMessage] = []
        while batch := self.broker.receive(
            self.dead_letter_queue(queue), 10, wait_seconds=0, visibility_timeout=60
        ):
            found += batch
        return found


@contextmanager
def open_backend(
    kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Backend]:
    """A :class:`Backend` of ``kind`` (``moto``, ``fauxqs`` or ``sqlite``) for one test.

    This process's environment is changed through ``monkeypatch`` so that ``.delay()`` in the
    test sends where the subprocesses receive.
    """
    for name in [k for k in os.environ if k.startswith("EBSQS_")]:
        monkeypatch.delenv(name)
    if kind == "sqlite":
        env = sqlite_env(tmp_path / "broker.db")
        monkeypatch.setenv("EBSQS_BROKER_URL", env["EBSQS_BROKER_URL"])
    else:
        endpoint: str = request.getfixturevalue(f"{kind}_server")
        servers.apply_sqs_env(monkeypatch, endpoint)
        env = sqs_env(endpoint)
    # The producer keeps one broker per URL, and ``sqs://`` names no endpoint: forget the one
    # a previous test built for another server.
    producer.broker_for.cache_clear()
    settings = load_settings()
    broker = from_url(settings.broker_url)
    try:
        yield Backend(kind, env, broker, settings, tmp_path)
    finally:
        producer.broker_for.cache_clear()
        broker.close()

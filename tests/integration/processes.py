"""Running ``ebsqs`` commands as real processes from tests.

Commands run as ``python -m ebsqs`` from the checkout's root, so ``--app tests.fixtures.x``
imports the test fixtures. Environments are built from scratch for each process: the current
one without ``EBSQS_*`` or AWS variables that could redirect it, plus what the test names.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from tests import servers

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

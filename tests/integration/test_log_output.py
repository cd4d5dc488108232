"""A log output that cannot be written never stops work: real processes, real sinks.

stderr on ``/dev/full`` (every write fails with ENOSPC), or a pipe whose reader closed (every
write fails with EPIPE, as when journald restarts): ``ebsqs worker`` and ``ebsqs supervise``
still run every task, once, and exit 0 on SIGTERM. The tasks count their runs in a ledger file,
with the dropped-line count of the process that ran them.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from tests.fixtures import logout_tasks
from tests.integration.processes import EBSQS, Backend
from tests.servers import ROOT
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

TASKS = 12
QUEUE = "logout"


def command(kind: str, tmp_path: Path) -> list[str]:
    common = ["--app", "tests.fixtures.logout_tasks", "--queues", QUEUE, "--wait", "1"]
    if kind == "supervise":
        extra = ["--workers", "2", "--status-file", str(tmp_path / "status.json")]
    else:
        extra = []
    return [*EBSQS, kind, *common, *extra, "--log-format", "json"]


@contextlib.contextmanager
def full_disk(process_args: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """The process with stderr on /dev/full."""
    with open("/dev/full", "wb") as full:
        yield start(process_args, env, full)


@contextlib.contextmanager
def closed_pipe(process_args: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """The process with stderr on a pipe whose reader closes after the first line."""
    process = start(process_args, env, subprocess.PIPE)
    assert process.stderr is not None
    first = process.stderr.readline()  # logging works, then the reader goes away
    process.stderr.close()
    assert first, "the process wrote nothing before the pipe closed"
    yield process


def start(args: list[str], env: dict[str, str], stderr: IO[bytes] | int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
    )


SINKS = {"dev-full": full_disk, "closed-pipe": closed_pipe}


def ledger(path: Path) -> list[tuple[str, int, int]]:
    """``(key, pid, dropped lines in that process)`` per execution recorded so far."""
    if not path.exists():
        return []
    rows = [line.split() for line in path.read_text().splitlines()]
    return [(key, int(pid), int(dropped)) for key, pid, dropped in rows]


@pytest.mark.parametrize("sink", SINKS)
@pytest.mark.parametrize("kind", ["worker", "supervise"])
def test_unwritable_log_output_never_stops_work(
    backend: Backend, tmp_path: Path, kind: str, sink: str
) -> None:
    backend.create(QUEUE)
    path = tmp_path / "ledger.txt"
    env = {**backend.env, logout_tasks.LEDGER_ENV: str(path)}

    with SINKS[sink](command(kind, tmp_path), env) as process:
        try:
            keys = [f"k{i}" for i in range(TASKS)]
            for key in keys:
                logout_tasks.note.delay(key)

            wait_until(
                lambda: len(ledger(path)) >= TASKS or process.poll() is not None,
                timeout=30,
                message=lambda: f"{len(ledger(path))} of {TASKS} ran; exit {process.poll()}",
            )
            assert process.poll() is None, f"exited with {process.returncode} while logging"
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    runs = ledger(path)
    assert code == 0
    assert sorted(key for key, _, _ in runs) == sorted(keys)  # every task, once
    # Each process counted its own dropped lines: at least the three each task logged.
    assert all(dropped >= 3 for _, _, dropped in runs)
    assert backend.counts(QUEUE) == (0, 0, 0)

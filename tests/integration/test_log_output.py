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
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from tests.fixtures import logging_tasks, logout_tasks
from tests.integration.processes import EBSQS, Backend, WorkerProcess
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


# -- lines go through `logging`: the application's own lines come out too, with the task's ----

APP = "tests.fixtures.logging_tasks"


@pytest.mark.parametrize("executor", ["inline", "thread", "process", "asyncio"])
def test_a_tasks_own_logging_lines_carry_its_context(
    backend: Backend, tmp_path: Path, executor: str
) -> None:
    backend.create("applog")
    args = ["--app", APP, "--queues", "applog", "--wait", "1", "--executor", executor]
    with WorkerProcess(args, backend.env, tmp_path / "worker.log") as worker:
        chosen = logging_tasks.app_async_line if executor == "asyncio" else logging_tasks.app_line
        task_id = chosen.delay("k1")
        lines = wait_until(
            lambda: worker.events("app_line_logged k1"), timeout=20, message=worker.describe
        )
        assert worker.stop() == 0, worker.describe()

    [line] = lines
    assert line["level"] == "info" and line["key"] == "k1" and "timestamp" in line
    assert (line["task"], line["task_id"]) == (chosen.name, task_id)
    assert line["queue"] == "applog" and line["attempt"] == 1 and line["message_id"]
    # The worker's own lines of that task carry the same ids, in the same format.
    [done] = worker.events("task_succeeded")
    assert (done["task_id"], done["message_id"]) == (line["task_id"], line["message_id"])
    # Outside a task, a line has no task context.
    assert all("task_id" not in e for e in worker.events("worker_started"))


PRODUCER = """
import logging, os, sys
from ebsqs import producer
from ebsqs.config import load_settings
from ebsqs.brokers import from_url
from ebsqs.log import get_logger
from tests.fixtures import logging_tasks
if sys.argv[1] == "configured":
    logging.basicConfig(level=logging.INFO)
settings = load_settings()
producer.ensure_queue(from_url(settings.broker_url), settings, settings.physical_queue("applog"))
logging_tasks.app_line.delay("from-a-web-process")
get_logger("ebsqs.producer").warning("a_warning_from_ebsqs")
"""


@pytest.mark.parametrize("configured", [False, True])
def test_a_producer_that_configured_no_logging_prints_nothing(
    backend: Backend, configured: bool
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PRODUCER, "configured" if configured else "bare"],
        cwd=ROOT,
        env=backend.env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert backend.counts(backend.settings.physical_queue("applog"))[0] == 1
    assert done.stdout == ""
    if configured:  # the application's own logging gets ebsqs's lines, as any library's
        assert "queue_ensured" in done.stderr and "a_warning_from_ebsqs" in done.stderr
    else:  # not even the warning, from logging's last-resort handler
        assert done.stderr == ""

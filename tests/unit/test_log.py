"""ebsqs.log: lines that cannot be written are dropped and counted, never raised.

Real sinks: ``/dev/full`` (ENOSPC), a pipe whose reader closed (EPIPE), a closed descriptor
(EBADF), a pipe a reader drains while a long line goes through it, and a fork while another
thread is writing.
"""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
import structlog

from ebsqs import log
from ebsqs.log import Output

pytestmark = pytest.mark.timeout(10)


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
    structlog.contextvars.clear_contextvars()


@pytest.fixture
def dev_full() -> Iterator[IO[str]]:
    with open("/dev/full", "w") as full:
        yield full


@pytest.fixture
def closed_pipe() -> Iterator[IO[str]]:
    read_end, write_end = os.pipe()
    os.close(read_end)
    with os.fdopen(write_end, "w") as writer:
        yield writer


def test_a_full_disk_drops_and_counts_each_line(dev_full: IO[str]) -> None:
    output = Output(dev_full)

    output.info("one")
    output.error("two")

    assert output.dropped == 2


def test_a_pipe_whose_reader_closed_drops_and_counts(closed_pipe: IO[str]) -> None:
    output = Output(closed_pipe)

    output.warning("nobody reads this")

    assert output.dropped == 1


def test_a_closed_descriptor_drops_and_counts(tmp_path: Path) -> None:
    stream = (tmp_path / "log").open("w")
    output = Output(stream)
    stream.close()

    output.critical("after close")

    assert output.dropped == 1


def test_lines_that_can_be_written_are_written_whole(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with path.open("w") as stream:
        output = Output(stream)
        output.info("first")
        output.info("zweite €")

    assert path.read_text() == "first\nzweite €\n"
    assert output.dropped == 0


def test_a_line_longer_than_the_pipe_arrives_whole() -> None:
    read_end, write_end = os.pipe()
    line = "x" * (1 << 20)  # far beyond the pipe's buffer: written in many parts
    received = bytearray()
    reader = threading.Thread(target=lambda: received.extend(b"".join(_read_all(read_end))))
    reader.start()
    with os.fdopen(write_end, "w") as writer:
        output = Output(writer)
        output.info(line)
    reader.join(timeout=5)

    assert received == (line + "\n").encode()
    assert output.dropped == 0


def _read_all(fd: int) -> Iterator[bytes]:
    with os.fdopen(fd, "rb") as reader:
        while chunk := reader.read(65536):
            yield chunk


def test_a_stream_without_a_descriptor_is_written_as_a_stream() -> None:
    stream = io.StringIO()
    output = Output(stream)

    output.info("captured")
    stream.close()
    output.info("after close")

    assert output.dropped == 1


def test_configured_logging_never_raises_and_dropped_lines_counts(
    dev_full: IO[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stderr", dev_full)
    log.configure("json", "info", role="test")
    logger = structlog.get_logger("ebsqs.test")

    logger.info("task_succeeded", task="t")
    logger.debug("below_the_level")  # filtered out: never written, never dropped
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("task_failed")

    assert log.dropped_lines() == 2


def test_dropped_lines_is_zero_when_lines_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "log"
    with path.open("w") as stream:
        monkeypatch.setattr("sys.stderr", stream)
        log.configure("json", "info")
        structlog.get_logger("ebsqs.test").warning("written", n=1)

    assert json.loads(path.read_text())["event"] == "written"
    assert log.dropped_lines() == 0


def test_dropped_lines_is_zero_under_someone_elses_configuration() -> None:
    structlog.configure(logger_factory=structlog.PrintLoggerFactory())

    assert log.dropped_lines() == 0


def test_a_child_forked_while_another_thread_writes_can_log(tmp_path: Path) -> None:
    """The fork copies the lock as the writing thread held it; the child must not wait on it."""
    path = tmp_path / "log"
    with path.open("w") as stream:
        output = Output(stream)
        holding, release = threading.Event(), threading.Event()

        def hold_the_lock() -> None:
            with output._lock:
                holding.set()
                release.wait(5)

        holder = threading.Thread(target=hold_the_lock)
        holder.start()
        holding.wait(5)
        pid = os.fork()
        if pid == 0:  # the child: one line, then leave without pytest's cleanup
            output.info("from the child")
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        release.set()
        holder.join(5)

    assert os.waitstatus_to_exitcode(status) == 0
    assert path.read_text() == "from the child\n"

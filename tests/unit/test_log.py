"""ebsqs.log: lines that cannot be written are dropped and counted, never raised; lines go
through ``logging``, with the running task's context; a process that configured nothing is silent.

Real sinks: ``/dev/full`` (ENOSPC), a pipe whose reader closed (EPIPE), a closed descriptor
(EBADF), a pipe a reader drains while a long line goes through it, and a fork while another
thread is writing.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
import structlog
import structlog.testing

from ebsqs import log
from ebsqs.context import TaskContext, activated
from ebsqs.log import Output, OutputHandler

pytestmark = pytest.mark.timeout(10)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.configure(**saved)
    structlog.contextvars.clear_contextvars()
    root.handlers[:] = handlers
    root.setLevel(level)


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

    output.write("one")
    output.write("two")

    assert output.dropped == 2


def test_a_pipe_whose_reader_closed_drops_and_counts(closed_pipe: IO[str]) -> None:
    output = Output(closed_pipe)

    output.write("nobody reads this")

    assert output.dropped == 1


def test_a_closed_descriptor_drops_and_counts(tmp_path: Path) -> None:
    stream = (tmp_path / "log").open("w")
    output = Output(stream)
    stream.close()

    output.write("after close")

    assert output.dropped == 1


def test_lines_that_can_be_written_are_written_whole(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with path.open("w") as stream:
        output = Output(stream)
        output.write("first")
        output.write("zweite €")

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
        output.write(line)
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

    output.write("captured")
    stream.close()
    output.write("after close")

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
    logging.getLogger().handlers[:] = [logging.StreamHandler(io.StringIO())]

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
            output.write("from the child")
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        release.set()
        holder.join(5)

    assert os.waitstatus_to_exitcode(status) == 0
    assert path.read_text() == "from the child\n"


def _task() -> TaskContext:
    return TaskContext(
        task_name="shop.tasks.record", task_id="t-1", message_id="m-1", queue="a", attempt=2,
        max_retries=3,
    )  # fmt: skip


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_applications_own_lines_come_out_as_json_with_the_tasks_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "log"
    with path.open("w") as stream:
        monkeypatch.setattr("sys.stderr", stream)
        log.configure("json", "info", role="worker")
        app = logging.getLogger("app.views")
        with activated(_task()):
            app.info("charged %s", "alice", extra={"amount": 3})
            log.get_logger("ebsqs.worker.loop").warning("ebsqs_line", n=1)
        app.info("outside")
        app.debug("below the level")

    inside, ours, outside = _lines(path)
    context = {"task": "shop.tasks.record", "task_id": "t-1", "message_id": "m-1", "queue": "a"}
    assert inside.items() >= {**context, "event": "charged alice", "amount": 3}.items()
    assert inside["attempt"] == 2 and inside["level"] == "info" and inside["role"] == "worker"
    assert ours.items() >= {**context, "event": "ebsqs_line", "n": 1, "level": "warning"}.items()
    assert outside["event"] == "outside" and "task_id" not in outside
    assert {"timestamp", "level", "event"} <= inside.keys()


def test_an_event_field_named_like_a_record_attribute_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "log"
    with path.open("w") as stream:
        monkeypatch.setattr("sys.stderr", stream)
        log.configure("json", "info")
        log.get_logger("ebsqs.test").info("child_spawned", name="n", args=[1], process=7)

    [line] = _lines(path)
    assert (line["name"], line["args"], line["process"]) == ("n", [1], 7)


def test_an_ebsqs_line_is_a_plain_record_for_other_handlers() -> None:
    """Sentry's and Django's handlers see the event's name and its fields as attributes."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("ebsqs.test.plain")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        structlog.reset_defaults()  # nobody configured structlog: ebsqs's own chain
        log.get_logger("ebsqs.test.plain").error("task_failed", task_id="t-1", error="boom")
        log.get_logger("ebsqs.test.plain").debug("below_the_level")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)

    [record] = records
    assert record.getMessage() == "task_failed" and record.levelno == logging.ERROR
    assert (record.task_id, record.error) == ("t-1", "boom")  # type: ignore[attr-defined]


def test_a_filter_gives_records_inside_a_task_its_fields() -> None:
    record = logging.makeLogRecord({"msg": "x"})
    with activated(_task()):
        assert log.TaskContextFilter().filter(record)

    assert (record.task_id, record.attempt) == ("t-1", 2)  # type: ignore[attr-defined]


def test_configure_leaves_handlers_alone_when_told_to_keep_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mine = logging.StreamHandler(io.StringIO())
    logging.getLogger().handlers[:] = [mine]
    monkeypatch.setenv(log.HANDLERS_ENV, "keep")

    log.configure("json", "debug")

    assert logging.getLogger().handlers == [mine]
    monkeypatch.delenv(log.HANDLERS_ENV)
    log.configure("json", "debug")
    assert [type(h) for h in logging.getLogger().handlers] == [logging.StreamHandler, OutputHandler]
    log.configure("json", "debug")  # again, as a child after the fork: replaced, not added
    assert len(logging.getLogger().handlers) == 2


def test_a_process_that_configured_nothing_is_silent_even_for_warnings(
    capsys: pytest.CaptureFixture[str],
) -> None:
    structlog.reset_defaults()

    log.get_logger("ebsqs.producer").warning("would_go_to_the_last_resort_handler")

    assert logging.getLogger("ebsqs").handlers[-1].__class__ is logging.NullHandler
    assert capsys.readouterr() == ("", "")


def test_a_record_that_cannot_be_formatted_is_dropped_and_counted(tmp_path: Path) -> None:
    with (tmp_path / "log").open("w") as stream:
        handler = log.handler("json", stream)
        handler.handle(logging.makeLogRecord({"msg": "%d", "args": ("not a number",)}))

    assert handler.output.dropped == 1


def test_an_ebsqs_record_names_its_caller_and_carries_its_exception() -> None:
    """The short way to ``logging`` (ebsqs's own chain) makes the record ``logging`` would."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("ebsqs.test.caller")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        structlog.reset_defaults()
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.get_logger("ebsqs.test.caller").exception("task_failed", task_id="t-1")
        line = _caller_line() + 1
        log.get_logger("ebsqs.test.caller").info("task_succeeded", stack_info=True)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)

    failed, succeeded = records
    assert (failed.levelno, failed.funcName, failed.filename) == (
        logging.ERROR, "test_an_ebsqs_record_names_its_caller_and_carries_its_exception",
        "test_log.py",
    )  # fmt: skip
    assert failed.exc_info is not None and failed.exc_info[0] is RuntimeError
    assert succeeded.lineno == line and succeeded.stack_info is not None
    assert succeeded.stack_info.startswith("Stack (most recent call last):\n")
    assert (
        not hasattr(succeeded, "stack_info_")
        and "stack_info" not in vars(succeeded)["_ebsqs_fields"]
    )


def _caller_line() -> int:
    return sys._getframe(1).f_lineno


def test_json_lines_carry_the_exception_and_a_utc_timestamp_to_the_microsecond(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "log"
    with path.open("w") as stream:
        monkeypatch.setattr("sys.stderr", stream)
        log.configure("json", "info")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.get_logger("ebsqs.test").exception("task_failed", task_id="t-1")

    [line] = _lines(path)
    assert line["level"] == "error" and line["task_id"] == "t-1"
    assert str(line["exception"]).endswith("RuntimeError: boom")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", str(line["timestamp"]))


def test_a_value_that_cannot_be_rendered_drops_its_line_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    circular: list[object] = []
    circular.append(circular)
    path = tmp_path / "log"
    with path.open("w") as stream:
        monkeypatch.setattr("sys.stderr", stream)
        log.configure("json", "info")
        log.get_logger("ebsqs.test").info("circular", value=circular)
        log.get_logger("ebsqs.test").info("plain", value=[1])

    assert [line["event"] for line in _lines(path)] == ["plain"]
    assert log.dropped_lines() == 1


def test_another_structlog_chain_gets_ebsqs_events_at_every_level() -> None:
    with structlog.testing.capture_logs() as events:
        log.get_logger("ebsqs.test").debug("below_any_level", n=1)

    assert events == [{"event": "below_any_level", "n": 1, "log_level": "debug"}]
